"""Generation engines behind one interface, shared by sft.py (val accuracy), grpo.py, vas.py, eval.py.

    engine.generate(rows, n, sampling) -> list[Rollout]   # n per row, row-major
    engine.push_weights(model, version)                  # the policy's current weights -> the engine (wakes it)
    engine.sleep()                                       # free the engine's memory while the trainer runs
    engine.close()                                       # before the process group goes

HFEngine runs `model.generate` on the live (possibly FSDP2-sharded) training model; VLLMEngine
(mmr1/vllm_engine.py) is a colocated vLLM engine, imported only when asked for. Both take every
sampling knob from `Sampling` alone, never from the checkpoint's generation_config.json.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import batches, chat, dist, modeling
from .attention import importable


@dataclass
class Sampling:
    """How to sample: the same fields for every engine; nothing else is taken from anywhere."""

    temperature: float = 0.6  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0  # per call; engines derive a per-rank seed from it, so ranks never draw the same samples
    logprobs: bool = False  # return each sampled token's log-prob (training rollouts only: nothing else reads them)


@dataclass
class Rollout:
    """One sampled response."""

    row: int  # index of the prompt in the rows passed to generate()
    token_ids: list[int]  # response tokens, the closing <|im_end|> included when generated
    text: str  # decoded response, special tokens removed
    finish_reason: str  # "stop" (end token) or "length" (hit max_new_tokens)
    # the engine's log-prob of each sampled token, log softmax(logits / T) at the sampling temperature
    # (T = 1 when greedy), one per token_ids; None unless Sampling.logprobs, or where the engine gave
    # none (vLLM dropped the stop token)
    logprobs: list[float] | None = None


class SampledLogprobs:
    """HF logits processor that records the log-prob of each sampled token, (B, steps), at
    `temperature`: it keeps each step's log softmax(scores / T) (B, V) and gathers the sampled token's
    entry at the next step, whose input_ids end with it. HF runs it after suppress_tokens and before
    the temperature / top-p warpers: the distribution the engine samples from, before top-p."""

    def __init__(self, temperature: float):
        self.temperature, self.previous, self.steps = temperature, None, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.gather(input_ids[:, -1:])
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        return scores

    def gather(self, sampled: torch.Tensor) -> None:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, sampled).squeeze(1).cpu())  # (B,)
        self.previous = None

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """(B, steps) log-probs of the generated tokens (B, steps), the last step's gathered here."""
        self.gather(generated[:, -1:])
        return torch.stack(self.steps, 1) if self.steps else torch.zeros(len(generated), 0)


def make_engine(kind: str, model, processor, d: dist.Dist, *, model_path: str, min_pixels: int, max_pixels: int,
                prompt_format: chat.PromptFormat = chat.PromptFormat(), batch_size: int = 32,
                **vllm_options):  # fmt: skip
    """'hf', 'vllm', or 'auto' (vLLM when it imports and a GPU is there, else HF).

    model: the live model (HF engine; may be None for vLLM); model_path: the checkpoint vLLM loads.
    vllm_options: VLLMEngine's gpu_memory_utilization, max_model_len, weights_version, sleep_mode
    (the HF engine has none of them)."""
    unknown = set(vllm_options) - {"gpu_memory_utilization", "max_model_len", "weights_version", "sleep_mode"}
    if unknown:
        raise TypeError(f"make_engine: unknown vLLM option(s) {sorted(unknown)}")
    if kind == "auto":
        kind = "vllm" if d.device.type == "cuda" and importable("vllm") else "hf"
    prompts = dict(min_pixels=min_pixels, max_pixels=max_pixels, prompt_format=prompt_format)
    if kind == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model_path, processor, d, **prompts, **vllm_options)
    return HFEngine(model, processor, d, batch_size=batch_size, **prompts)


VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def forbidden_token_ids(tokenizer) -> list[int]:
    """Vision placeholder ids a response must never contain: a sampled <|image_pad|> would make
    the training forward expect an image that is not there."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def validation_accuracy(engine, rows: list[dict], d: dist.Dist, sampling: Sampling, correct) -> float:
    """Share of `rows` answered right with one sample each, the rows sharded over ranks; every rank
    gets the same value. `correct(texts, rows) -> list[bool | float]` judges the responses (the
    caller's scorer: reward.py's accuracy, or a benchmark's own rule); this module knows no rewards."""
    mine, n_real = dist.shard(rows, d)
    outs = engine.generate(mine, 1, sampling)
    verdicts = correct([o.text for o in outs], [mine[o.row] for o in outs])
    return dist.all_reduce_sum(float(sum(verdicts[:n_real])), d.device).item() / len(rows)


class HFEngine:
    """Batched `model.generate` with left padding on the training model itself."""

    shares_prefill = False  # each of a prompt's n responses is prefilled on its own (FLOP counts, mmr1/perf.py)
    pushes = 0  # weight pushes: none, it generates with the training model

    def __init__(self, model, processor, d: dist.Dist, *, min_pixels: int, max_pixels: int, batch_size: int = 32,
                 prompt_format: chat.PromptFormat = chat.PromptFormat()):  # fmt: skip
        self.model, self.processor, self.d = model, processor, d
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.batch_size, self.prompt_format = batch_size, prompt_format
        self.end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = processor.tokenizer.pad_token_id
        self.forbidden = forbidden_token_ids(processor.tokenizer)

    @torch.no_grad()
    def generate(
        self, rows: list[dict], n: int, sampling: Sampling, prompts: list[batches.Prompt] | None = None
    ) -> list[Rollout]:
        """n sampled responses for each row, ordered row-major (row 0's n first). `prompts`: the
        rows' batches.build_prompts (built here when not given), so a caller that trains on the
        same prompts builds them once. Under torchrun every rank must pass the same number of rows
        (FSDP2 needs every rank in every forward; `synced_gpus` keeps ranks stepping together)."""
        from transformers import GenerationConfig

        if prompts is None:
            prompts = batches.build_prompts(self.processor, rows, self.prompt_format, self.min_pixels, self.max_pixels)
        jobs = [i for i in range(len(rows)) for _ in range(n)]
        was_training = self.model.training
        self.model.eval()
        # generate() fills every knob we leave unset from model.generation_config, which for a real
        # checkpoint holds repetition_penalty 1.05, top_k 1, top_p 0.001, ...: hide it for the call.
        checkpoint_defaults, self.model.generation_config = self.model.generation_config, GenerationConfig()
        out: list[Rollout] = []
        try:
            with torch.random.fork_rng(devices=[self.d.device] if self.d.device.type == "cuda" else []):
                torch.manual_seed(dist.derive_seed(sampling.seed, "rank", self.d.rank))
                for start in range(0, len(jobs), self.batch_size):
                    batch = jobs[start : start + self.batch_size]
                    out += self._generate_batch(prompts, batch, sampling)
        finally:
            self.model.generation_config = checkpoint_defaults
            self.model.train(was_training)
        return out

    def _generate_batch(self, prompts: list[batches.Prompt], batch: list[int], sampling: Sampling) -> list[Rollout]:
        padded = left_padded([prompts[i] for i in batch], self.pad_id, self.processor.image_token_id)
        inputs = {k: v.to(self.d.device) for k, v in padded.items()}
        greedy = sampling.temperature <= 0
        if self.d.enabled and "pixel_values" not in inputs and modeling.generate_encodes_images_first(self.model):
            # FSDP2: a rank with images runs the vision tower in generate() before the prefill; this rank
            # runs it on a blank image at that same place, so the ranks' all-gathers keep their order
            modeling.blank_vision(self.model)
        recorder = SampledLogprobs(1.0 if greedy else sampling.temperature) if sampling.logprobs else None
        with modeling.autocast(self.d.device):  # the one precision context (no weight cache: docs/paper-scale.md)
            generated = self.model.generate(
                **inputs,
                do_sample=not greedy,
                temperature=1.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                top_k=None if greedy else 0,  # 0 = off when sampling; greedy takes no top-k
                repetition_penalty=1.0,  # off
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=self.end_id,
                pad_token_id=self.pad_id,
                use_cache=True,
                synced_gpus=self.d.enabled,  # keep stepping until every rank is done (FSDP2 needs all in each forward)
                suppress_tokens=self.forbidden,
                logits_processor=[recorder] if recorder else [],
            )
        generated = generated[:, inputs["input_ids"].shape[1] :]
        token_logprobs = recorder.finish(generated).tolist() if recorder else [None] * len(generated)  # (B, steps)
        out = []
        for i, ids, logprobs in zip(batch, generated.tolist(), token_logprobs):
            if self.end_id in ids:
                ids, reason = ids[: ids.index(self.end_id) + 1], "stop"
            else:
                reason = "length"
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
            out.append(Rollout(i, ids, text, reason, None if logprobs is None else logprobs[: len(ids)]))
        return out

    def sleep(self) -> None:
        """Nothing to free: the HF engine holds no memory of its own."""

    def push_weights(self, model, version: int | None = None) -> None:
        """Nothing to load: the HF engine generates with the training model itself."""

    def close(self) -> None:
        """Nothing to shut down."""


def left_padded(prompts: list[batches.Prompt], pad_id: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """Generation inputs of prompts: (B, T) ids left-padded with pad_id, attention mask,
    mm_token_type_ids (1 on image tokens), and the prompts' pixel_values / image_grid_thw in order
    (what the processor gives for the same prompts with left padding)."""
    width = max(len(p.ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p.ids) :] = torch.tensor(p.ids, dtype=torch.long)
        mask[b, width - len(p.ids) :] = 1
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == image_token_id).long() * mask}
    pictures = [p for p in prompts if p.pixel_values is not None]
    if pictures:
        out["pixel_values"] = torch.cat([p.pixel_values for p in pictures])
        out["image_grid_thw"] = torch.cat([p.image_grid_thw for p in pictures])
    return out
