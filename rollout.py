"""Generation engines behind one interface, shared by sft.py (val accuracy), grpo.py, vas.py, eval.py.

    engine.generate(rows, n, sampling) -> list[Rollout]   # n per row, row-major
    engine.sync_weights(model)                           # after each optimizer step
    engine.sleep() / engine.wake()                       # free / retake rollout memory

HFEngine runs `model.generate` on the live (possibly FSDP2-sharded) training model; it is what
runs on CPU and in the tests. VLLMEngine is a thin colocated vLLM adapter (one engine per rank,
`external_launcher`), imported lazily; vLLM has no CPU kernels, so it only runs on GPUs.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

import common
import reward


@dataclass
class Sampling:
    """How to sample: the same fields for every engine."""

    temperature: float = 0.6  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0  # per call; engines add the rank so ranks never draw the same samples


@dataclass
class Rollout:
    """One sampled response."""

    row: int  # index of the prompt in the rows passed to generate()
    token_ids: list[int]  # response tokens, the closing <|im_end|> included when generated
    text: str  # decoded response, special tokens removed
    finish_reason: str  # "stop" (end token) or "length" (hit max_new_tokens)


def make_engine(kind: str, model, processor, d: common.Dist, **kwargs):
    """'hf', 'vllm', or 'auto' (vLLM when it imports and a GPU is there, else HF)."""
    if kind == "auto":
        kind = "vllm" if d.device.type == "cuda" and _vllm_available() else "hf"
    if kind == "vllm":
        return VLLMEngine(kwargs.pop("model_path"), processor, d, **kwargs)
    kwargs.pop("model_path", None)
    kwargs.pop("gpu_memory_utilization", None)
    kwargs.pop("max_model_len", None)
    return HFEngine(model, processor, d, **kwargs)


VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def forbidden_token_ids(tokenizer) -> list[int]:
    """Vision placeholder ids a response must never contain: a sampled <|image_pad|> would make
    the training forward expect an image that is not there."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def checkpoint_name(name: str) -> str:
    """The on-disk Qwen2.5-VL checkpoint name of an in-memory transformers-5 parameter name
    ('model.visual.x' -> 'visual.x', 'model.language_model.x' -> 'model.x'), the layout that
    `save_pretrained` writes and vLLM's loader reads with is_checkpoint_format=True."""
    for prefix, on_disk in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if name.startswith(prefix):
            return on_disk + name[len(prefix) :]
    return name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401

        return True
    except ImportError:
        return False


def score_rollouts(outs: list[Rollout], rows: list[dict], pool=None, **weights) -> list[dict]:
    """reward.compute_rewards of each rollout against the answer (and choices) of its row.

    With a RewardPool the workers score with a hard timeout; without one, scoring runs in this
    process. `weights`: format_weight / accuracy_weight.
    """
    return reward.compute_rewards(
        [o.text for o in outs],
        [rows[o.row]["answer"] for o in outs],
        [rows[o.row].get("choices") for o in outs],
        workers=0,
        pool=pool,
        **weights,
    )


def accuracy(engine, rows: list[dict], d: common.Dist, sampling: Sampling, pool=None) -> float:
    """Share of `rows` answered right with one sample each, sharded over ranks (every rank gets it)."""
    mine, n_real = common.shard(rows, d)
    scores = score_rollouts(engine.generate(mine, 1, sampling), mine, pool)
    correct = sum(s["accuracy"] for s in scores[:n_real])
    return common.all_reduce_sum(correct, d.device).item() / len(rows)


class HFEngine:
    """Batched `model.generate` with left padding on the training model itself."""

    def __init__(self, model, processor, d: common.Dist, *, min_pixels: int, max_pixels: int, batch_size: int = 32,
                 instruction: str = ""):  # fmt: skip
        self.model, self.processor, self.d = model, processor, d
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.batch_size, self.instruction = batch_size, instruction
        self.end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = processor.tokenizer.pad_token_id
        self.forbidden = forbidden_token_ids(processor.tokenizer)

    @torch.no_grad()
    def generate(self, rows: list[dict], n: int, sampling: Sampling) -> list[Rollout]:
        """n sampled responses for each row, ordered row-major (row 0's n first).

        Under torchrun every rank must pass the same number of rows (FSDP2 needs every rank in
        every forward; `synced_gpus` keeps ranks stepping together until all are done).
        """
        jobs = [i for i in range(len(rows)) for _ in range(n)]
        was_training = self.model.training
        self.model.eval()
        out: list[Rollout] = []
        with torch.random.fork_rng(devices=[self.d.device] if self.d.device.type == "cuda" else []):
            torch.manual_seed(sampling.seed * 1_000_003 + self.d.rank)
            for start in range(0, len(jobs), self.batch_size):
                batch = jobs[start : start + self.batch_size]
                out += self._generate_batch(rows, batch, sampling)
        self.model.train(was_training)
        return out

    def _generate_batch(self, rows: list[dict], batch: list[int], sampling: Sampling) -> list[Rollout]:
        texts = common.prompt_texts(self.processor, [rows[i] for i in batch], self.instruction)
        images = [common.row_images(rows[i], self.min_pixels, self.max_pixels) for i in batch]
        inputs = common.processor_inputs(self.processor, texts, images)
        inputs = {k: v.to(self.d.device) for k, v in inputs.items()}
        greedy = sampling.temperature <= 0
        with torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.d.device.type == "cuda"):
            generated = self.model.generate(
                **inputs,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=self.end_id,
                pad_token_id=self.pad_id,
                use_cache=True,
                synced_gpus=self.d.enabled,  # keep stepping until every rank is done (FSDP2 needs all in each forward)
                suppress_tokens=self.forbidden,
            )
        responses = generated[:, inputs["input_ids"].shape[1] :].tolist()
        out = []
        for i, ids in zip(batch, responses):
            if self.end_id in ids:
                ids, reason = ids[: ids.index(self.end_id) + 1], "stop"
            else:
                reason = "length"
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
            out.append(Rollout(i, ids, text, reason))
        return out

    def sync_weights(self, model) -> None:
        """Nothing to do: the HF engine generates with the training model itself."""

    def sleep(self) -> None:
        """Nothing to free: the HF engine holds no memory of its own."""

    def wake(self, model=None) -> None:
        """Nothing to retake or load: the HF engine is the training model."""


class VLLMEngine:
    """Colocated vLLM, one in-process engine per rank (SPMD under torchrun, no extra processes).

    Written against vllm 0.33.0: `external_launcher` executor, sleep mode, weights pushed from the
    (FSDP2-sharded) training model with `collective_rpc("reload_weights", ...)` one tensor at a time.
    """

    def __init__(self, model_path: str, processor, d: common.Dist, *, min_pixels: int, max_pixels: int,
                 batch_size: int = 0, instruction: str = "", gpu_memory_utilization: float = 0.75,
                 max_model_len: int = 8192, max_images: int = 4):  # fmt: skip
        try:
            from vllm import LLM
        except ImportError as e:
            raise SystemExit("--engine vllm needs vLLM: pip install -r requirements-gpu.txt") from e
        # external_launcher reads the torchrun variables; a plain one-GPU `python grpo.py` has none
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.processor, self.d, self.instruction = processor, d, instruction
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.llm = LLM(
            model=model_path,
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=1,
            enable_sleep_mode=True,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            limit_mm_per_prompt={"image": max_images},
            seed=d.rank,
            logprobs_mode="processed_logprobs",
        )
        self.end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.forbidden = forbidden_token_ids(processor.tokenizer)
        self.asleep = False

    def generate(self, rows: list[dict], n: int, sampling: Sampling) -> list[Rollout]:
        """n sampled responses for each row, row-major, as HFEngine.generate."""
        from vllm import SamplingParams

        texts = common.prompt_texts(self.processor, rows, self.instruction)
        prompts = [
            {"prompt": t, "multi_modal_data": {"image": common.row_images(r, self.min_pixels, self.max_pixels)}}
            if r.get("images")
            else {"prompt": t}
            for t, r in zip(texts, rows)
        ]
        params = SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            seed=sampling.seed * 1_000_003 + self.d.rank,
            stop_token_ids=[self.end_id],
            logit_bias={i: -100.0 for i in self.forbidden},
        )
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        rollouts = []
        for i, request in enumerate(outputs):
            for completion in request.outputs:
                ids = list(completion.token_ids)
                reason = "stop" if completion.finish_reason == "stop" else "length"
                if reason == "stop" and (not ids or ids[-1] != self.end_id):
                    ids.append(self.end_id)  # vLLM may drop the stop token; the policy must still learn it
                rollouts.append(Rollout(i, ids, completion.text, reason))
        return rollouts

    def sync_weights(self, model) -> None:
        """Pushes the training weights into vLLM, one full tensor at a time, then drops stale KV."""

        def weights():  # (name, full bf16 tensor), one at a time: never the whole model gathered at once
            for name, tensor in model.state_dict().items():
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                yield checkpoint_name(name), full.detach().to(torch.bfloat16)  # fp32 master weights -> bf16

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(), "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Frees the KV cache and offloads the weights (level 1) while the trainer runs."""
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self, model=None) -> None:
        """Wakes the weights, loads the current ones from `model` if given, then the KV cache."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        if model is not None:
            self.sync_weights(model)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
