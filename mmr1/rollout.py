"""Generation engines behind one interface, shared by sft.py (val accuracy), grpo.py, vas.py, eval.py.

    engine.generate(rows, n, sampling) -> list[Rollout]   # n per row, row-major
    engine.push_weights(model, version)                  # the policy's current weights -> the engine (wakes it)
    engine.sleep()                                       # free the engine's memory while the trainer runs
    engine.close()                                       # before the process group goes

HFEngine runs `model.generate` on the live (possibly FSDP2-sharded) training model. VLLMEngine is
a colocated vLLM engine (one per rank, `external_launcher`), imported lazily: the GPU build
(requirements-gpu.txt) on GPUs, the CPU build (scripts/setup_vllm_cpu.sh) anywhere else; the
platform differences live in `vllm_platform_args`. Both take every sampling knob from `Sampling`
alone, never from the checkpoint's generation_config.json.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import warnings
from dataclasses import dataclass

import torch

from . import batches, chat, dist, modeling


@dataclass
class Sampling:
    """How to sample: the same fields for every engine; nothing else is taken from anywhere."""

    temperature: float = 0.6  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0  # per call; engines derive a per-rank seed from it, so ranks never draw the same samples


@dataclass
class Rollout:
    """One sampled response."""

    row: int  # index of the prompt in the rows passed to generate()
    token_ids: list[int]  # response tokens, the closing <|im_end|> included when generated
    text: str  # decoded response, special tokens removed
    finish_reason: str  # "stop" (end token) or "length" (hit max_new_tokens)
    # the engine's log-prob of each sampled token, log softmax(logits / T) at the sampling temperature
    # (T = 1 when greedy), one per token_ids; None where the engine gave none (vLLM dropped the stop token)
    logprobs: list[float] | None = None


class SampledLogprobs:
    """HF logits processor that records the log-prob of each sampled token, (B, steps), at
    `temperature`: at every step it keeps log softmax(scores / T) (one (B, V) at a time, not one per
    step), and at the next step, whose input_ids end with the token sampled from it, gathers that
    token's entry. HF runs custom processors after its own (suppress_tokens) and before the
    temperature / top-p warpers, so scores are the logits with the never-sampled tokens at -inf:
    the distribution the engine samples from, before top-p. Returns scores unchanged."""

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


def make_engine(
    kind: str,
    model,
    processor,
    d: dist.Dist,
    *,
    model_path: str,
    min_pixels: int,
    max_pixels: int,
    prompt_format: chat.PromptFormat = chat.PromptFormat(),
    batch_size: int = 32,
    gpu_memory_utilization: float = 0.75,
    max_model_len: int = 8192,
    weights_version: int | None = 0,
    sleep_mode: bool = True,
):
    """'hf', 'vllm', or 'auto' (vLLM when it imports and a GPU is there, else HF).

    model: the live model (HF engine; may be None for vLLM); model_path: the checkpoint vLLM loads,
    holding weights of `weights_version` (see VLLMEngine.push_weights). sleep_mode: vLLM frees its
    memory between generations (training); evaluation passes False (see VLLMEngine).
    """
    if kind == "auto":
        kind = "vllm" if d.device.type == "cuda" and _vllm_available() else "hf"
    if kind == "vllm":
        return VLLMEngine(
            model_path,
            processor,
            d,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            prompt_format=prompt_format,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            weights_version=weights_version,
            sleep_mode=sleep_mode,
        )
    return HFEngine(
        model,
        processor,
        d,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        batch_size=batch_size,
        prompt_format=prompt_format,
    )


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

    def __init__(
        self,
        model,
        processor,
        d: dist.Dist,
        *,
        min_pixels: int,
        max_pixels: int,
        batch_size: int = 32,
        prompt_format: chat.PromptFormat = chat.PromptFormat(),
    ):
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
        same prompts builds them once.

        Under torchrun every rank must pass the same number of rows (FSDP2 needs every rank in
        every forward; `synced_gpus` keeps ranks stepping together until all are done).
        """
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
        picked = [prompts[i] for i in batch]
        inputs = {
            k: v.to(self.d.device) for k, v in left_padded(picked, self.pad_id, self.processor.image_token_id).items()
        }
        greedy = sampling.temperature <= 0
        if self.d.enabled and "pixel_values" not in inputs and modeling.generate_encodes_images_first(self.model):
            # FSDP2: a rank with images runs the vision tower in generate() before the prefill; this rank
            # runs it on a blank image at that same place, so the ranks' all-gathers keep their order
            modeling.blank_vision(self.model)
        recorder = SampledLogprobs(1.0 if greedy else sampling.temperature)
        with torch.autocast(self.d.device.type, dtype=torch.bfloat16, enabled=self.d.device.type == "cuda"):
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
                logits_processor=[recorder],
            )
        generated = generated[:, inputs["input_ids"].shape[1] :]
        token_logprobs = recorder.finish(generated).tolist()  # (B, steps)
        out = []
        for i, ids, logprobs in zip(batch, generated.tolist(), token_logprobs):
            if self.end_id in ids:
                ids, reason = ids[: ids.index(self.end_id) + 1], "stop"
            else:
                reason = "length"
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
            out.append(Rollout(i, ids, text, reason, logprobs[: len(ids)]))
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


class VLLMEngine:
    """Colocated vLLM, one in-process engine per rank (SPMD under torchrun, no extra processes).

    Written against vllm 0.33.0 (GPU) and run for real in the tests with vllm-cpu 0.32.0, the same
    API: `external_launcher` executor, sleep mode (GPU only), weights pushed from the (FSDP2-sharded)
    training model with `collective_rpc("reload_weights", ...)` one tensor at a time, and only when
    they changed since the last push (`version`).

    sleep_mode=False (evaluation): no sleep / wake. vLLM allows ONE sleep-mode (CuMem) allocator per
    process, so `eval.py --model a,b` building a second sleep-mode engine after closing the first
    dies on its assertion; an engine that never trains beside it needs no sleep mode.
    max_model_len is clamped to the model's max_position_embeddings (vLLM refuses a longer context).
    """

    def __init__(
        self,
        model_path: str,
        processor,
        d: dist.Dist,
        *,
        min_pixels: int,
        max_pixels: int,
        prompt_format: chat.PromptFormat = chat.PromptFormat(),
        gpu_memory_utilization: float = 0.75,
        max_model_len: int = 8192,
        max_images: int = 4,
        cpu_kv_cache_gib: float = 1.0,
        weights_version: int | None = 0,
        sleep_mode: bool = True,
    ):
        try:
            from vllm import LLM
        except ImportError as e:
            raise SystemExit(
                "--engine vllm needs vLLM: pip install -r requirements-gpu.txt (GPU), "
                "or bash scripts/setup_vllm_cpu.sh for its CPU build"
            ) from e
        # external_launcher reads the torchrun variables; a plain one-process `python grpo.py` has none
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.processor, self.d, self.prompt_format = processor, d, prompt_format
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.engine_args = vllm_engine_args(
            model_path,
            d,
            min_pixels,
            max_pixels,
            max_model_len,
            max_images,
            gpu_memory_utilization,
            cpu_kv_cache_gib,
            sleep_mode,
        )
        with kept_rng(d.device):  # vLLM seeds the process's global RNGs with its own seed; keep the run's
            self.llm = LLM(**self.engine_args)
        self.model_runner = model_runner(self.llm, d.device)
        if d.master:
            print(f"[vllm] model runner {self.model_runner} (VLLM_USE_V2_MODEL_RUNNER=0 selects V1)")
        self.sleep_mode = d.device.type == "cuda" and sleep_mode
        self.end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.forbidden = forbidden_token_ids(processor.tokenizer)
        self.asleep = False
        self.version = weights_version  # version of the weights vLLM holds (None: unknown, always push)
        self.pushes = 0  # weight pushes done (the version check skips the rest)

    def generate(
        self, rows: list[dict], n: int, sampling: Sampling, prompts: list[batches.Prompt] | None = None
    ) -> list[Rollout]:
        """n sampled responses for each row, row-major, as HFEngine.generate (the same prompts: vLLM
        takes their text and resized images and expands the image pads itself); each row sampled with
        a seed of its own, so duplicate rows get different responses (as with HFEngine, whose one
        random stream runs through the rows)."""
        from vllm import SamplingParams

        if prompts is None:
            prompts = batches.build_prompts(self.processor, rows, self.prompt_format, self.min_pixels, self.max_pixels)
        requests = [
            {"prompt": p.text, "multi_modal_data": {"image": p.images}} if p.images else {"prompt": p.text}
            for p in prompts
        ]
        greedy = sampling.temperature <= 0
        # One SamplingParams per prompt, each with its own seed (from the call's seed, which carries the
        # step, the rank and the row): vLLM seeds sample k of a request with seed + k, so one shared
        # seed gives duplicate prompts of a call (VAS draws with replacement) identical groups.
        params = [
            SamplingParams(
                n=n,
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                top_k=0,
                repetition_penalty=1.0,
                max_tokens=sampling.max_new_tokens,
                seed=dist.derive_seed(sampling.seed, "rank", self.d.rank, row),
                stop_token_ids=[self.end_id],
                logit_bias={i: -100.0 for i in self.forbidden},
                logprobs=0,  # the sampled token's log-prob alone, "processed" (after temperature): see engine_args
            )
            for row in range(len(rows))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        rollouts = []
        for i, request in enumerate(outputs):
            for completion in request.outputs:
                ids = list(completion.token_ids)
                reason = "stop" if completion.finish_reason == "stop" else "length"
                sampled = getattr(completion, "logprobs", None) or []  # one {token: Logprob} per token
                logprobs = [step[t].logprob for t, step in zip(ids, sampled)]
                if reason == "stop" and (not ids or ids[-1] != self.end_id):
                    ids.append(self.end_id)  # vLLM may drop the stop token; the policy must still learn it
                logprobs = logprobs if len(logprobs) == len(ids) else None  # none for an appended stop token
                rollouts.append(Rollout(i, ids, completion.text, reason, logprobs))
        return rollouts

    def push_weights(self, model, version: int | None = None) -> None:
        """Loads the training model's current weights into vLLM and wakes it for generation.

        Sleep mode (GPU): the weights wake first, the new ones are pushed into them, and only then
        the KV cache, in the memory left. The push sends one full bf16 tensor at a time through
        `collective_rpc("reload_weights")` and drops every cache computed with the old weights; it is
        skipped when `version` (the optimizer step) equals that of the weights vLLM holds.
        """
        if self.asleep:
            torch.cuda.empty_cache()  # the trainer's cached free blocks (activations) back to the driver for vLLM
            self.llm.wake_up(tags=["weights"])
        if version is None or version != self.version:
            self._reload_weights(model, version)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

    def _reload_weights(self, model, version: int | None) -> None:
        """The push itself: (name, full tensor) pairs into vLLM's loader, then the stale caches dropped."""

        def weights():  # (name, full bf16 tensor), one at a time: never the whole model gathered at once
            for name, tensor in model.state_dict().items():
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                yield checkpoint_name(name), full.detach().to(torch.bfloat16)  # fp32 master weights -> bf16

        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights(), "is_checkpoint_format": True})
        # Stale state computed with the old weights: the prefix (KV) cache, and the scheduler's record of
        # cached image encodings. reload_weights empties the worker's encoder cache but not the
        # scheduler's record, and the next request with an image seen before then fails with
        # "Encoder cache miss" (vllm 0.32 CPU and 0.33 GPU alike).
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.version, self.pushes = version, self.pushes + 1

    def sleep(self) -> None:
        """Frees the KV cache and offloads the weights (level 1) while the trainer runs (GPU only)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def close(self) -> None:
        """Shuts the engine down; call it before the process group is destroyed (its teardown
        uses the group)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


def model_runner(llm, device: torch.device) -> str:
    """Which vLLM model runner an engine uses: "V2" or "V1". vllm 0.33 on GPU defaults to V2 where
    Triton imports and the model needs nothing V2 lacks (VllmConfig.use_v2_model_runner);
    VLLM_USE_V2_MODEL_RUNNER=0 forces V1, the runner the CPU build (and so every CPU test) uses."""
    config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    return "V2" if device.type == "cuda" and getattr(config, "use_v2_model_runner", False) else "V1"


@contextlib.contextmanager
def kept_rng(device: torch.device):
    """Restores the global random states (python, numpy, torch CPU and `device`'s CUDA generator) on
    exit: vLLM's engine start seeds them all with its own seed, which would replace a resumed run's
    restored states (and a fresh run's --seed) with the engine's."""
    import random

    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" and torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def vllm_engine_args(
    model_path: str,
    d: dist.Dist,
    min_pixels: int,
    max_pixels: int,
    max_model_len: int,
    max_images: int,
    gpu_memory_utilization: float,
    cpu_kv_cache_gib: float,
    sleep_mode: bool,
) -> dict:
    """Every keyword argument of the `LLM(...)` a VLLMEngine builds (tests check them against the
    installed vLLM's signature).

    mm_processor_kwargs: vLLM's processor resizes images with the CHECKPOINT's pixel range unless
    told the run's, and the trainer's processor uses the run's (--min-pixels/--max-pixels): the
    image token counts would then differ between rollout and update. max_model_len (tokens) is
    clamped to the model's max_position_embeddings.
    """
    return dict(
        model=model_path,
        distributed_executor_backend="external_launcher",
        tensor_parallel_size=1,
        max_model_len=min(max_model_len, max_positions(model_path)),
        limit_mm_per_prompt={"image": max_images, "video": 0},  # no video inputs: vLLM reserves none (default 999)
        mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
        seed=d.rank,
        logprobs_mode="processed_logprobs",
        generation_config="vllm",  # sampling comes from Sampling alone, never the checkpoint's defaults
        **vllm_platform_args(d.device, gpu_memory_utilization, cpu_kv_cache_gib, sleep_mode),
    )


def max_positions(model_path: str) -> int:
    """The longest context (tokens) the checkpoint's text model takes: its max_position_embeddings."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    return int(getattr(config, "text_config", config).max_position_embeddings)


def vllm_platform_args(
    device: torch.device, gpu_memory_utilization: float, cpu_kv_cache_gib: float, sleep_mode: bool = True
) -> dict:
    """The LLM(...) arguments that differ between vLLM's GPU and CPU builds, in one place.

    GPU: sleep mode (weights offloaded and KV cache freed while training), memory as a share of the
    GPU. CPU (vllm-cpu): sleep mode is refused ("not supported on current platform"), so sleep /
    wake are no-ops there; per-request seeds crash when chunked prefill splits a batch ("CPU
    Generator does not use offset"), so it is off; `gpu_memory_utilization` would be read as a
    share of RAM, so the KV cache gets an explicit size instead. The CPU engine also needs
    OMP_NUM_THREADS=1 on a small machine (with 2 threads on 2 cores it ran ~30x slower) and takes
    it from the environment only: it forbids torch.set_num_threads after its thread binding.
    """
    if device.type == "cuda":
        return {"enable_sleep_mode": sleep_mode, "gpu_memory_utilization": gpu_memory_utilization}
    if os.environ.get("OMP_NUM_THREADS") is None:
        warnings.warn(
            "vLLM on CPU: OMP_NUM_THREADS is not set; run with OMP_NUM_THREADS=1 (torchrun sets it), "
            "an in-process CPU engine with more threads than it binds can be ~30x slower",
            stacklevel=3,
        )
    return {
        "enable_sleep_mode": False,
        "enable_chunked_prefill": False,
        "kv_cache_memory_bytes": int(cpu_kv_cache_gib * 2**30),
    }
