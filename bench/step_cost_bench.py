"""Host time per training step against the size of the data: everything a step does outside the model.

Writes synthetic rows of the smallest size in the real layouts (MMR1-SFT-like `messages`, or
MMR1-RL-like `problem` / `answer`; one of 16 toy image files each) as parquet and opens them the way
the stages do (prepare.load_rows: the door, then data.Rows over its memory-mapped Arrow table, a row
read and its images decoded when indexed). Each larger size is that door table repeated to the size
(zero-copy; the door itself takes minutes at 1.6M rows and is a start-up cost, bench/data_bench.py).
Then times the host work of `--steps` steps on rank 0 of 8 at the paper preset's batch sizes with
the toy processor:

  SFT (global batch 32, 4 rows a rank): selection (sft.global_batch + dist.shard), row access (read
  from Arrow, images decoded), prompt building (batches.sft_micro_batches: chat template, processor,
  labels, token-budget plan), logging (one metrics.jsonl line).
  GRPO (512 prompts, 64 a rank, VAS with mix 0.5): sampler (vas.MixedSampler.next_batch + shard),
  row access, prompt building (batches.build_prompts), VAS bookkeeping (--vas-online's per-step
  re-weighting: the step's VPS written into the (P,) array, normalise_weights, update_weights; and
  the logged mean VPS), logging.

Prints one table per stage: the median CPU milliseconds per step of each part and in all, per size
(process CPU time: on a shared machine, wall time would time the other processes too; the sizes
take turns step by step).
Opening the data (the door's cost, paid once) is printed but not part of a step. The first step of
each SFT epoch also builds that epoch's order (sft.epoch_order, about 1 s at 1.6M rows): it is timed
apart, before the steps.

    OMP_NUM_THREADS=1 nice -n 10 python bench/step_cost_bench.py                     # the docs' table
    OMP_NUM_THREADS=1 python bench/step_cost_bench.py --sft-sizes 2000 --rl-sizes 2000 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SFT_BATCH, RL_BATCH, WORLD = 32, 512, 8  # the paper presets' global batches, over 8 ranks
CHUNK = 100_000  # rows per parquet write


def write_images(folder: Path) -> list[str]:
    """16 toy grid images as PNG files; returns their names (relative to `folder`)."""
    import random

    from data import toy

    rng = random.Random(0)
    names = []
    for j in range(16):
        name = f"img{j}.png"
        toy.draw_grid([rng.choice(list(toy.COLORS)) for _ in range(4)]).save(folder / name)
        names.append(name)
    return names


def write_rows(path: Path, kind: str, n: int, images: list[str]) -> Path:
    """n synthetic rows of `kind` ("sft" or "rl") in one parquet file, each with one image file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    if kind == "sft":
        schema = pa.schema([("id", pa.string()), ("messages", pa.list_(message)), ("images", pa.list_(pa.string()))])
    else:
        schema = pa.schema([("id", pa.string()), ("problem", pa.string()), ("answer", pa.string()),
                            ("images", pa.list_(pa.string()))])  # fmt: skip
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, n, CHUNK):
            ids = range(start, min(n, start + CHUNK))
            columns = {"id": [str(i) for i in ids], "images": [[images[i % len(images)]] for i in ids]}
            if kind == "sft":
                columns["messages"] = [
                    [{"role": "user", "content": f"<image>How many red squares are there? (row {i})"},
                     {"role": "assistant", "content": f"I count them one by one. The answer is {i % 5}."}]
                    for i in ids
                ]  # fmt: skip
            else:
                columns["problem"] = [f"<image>How many red squares are there? (row {i})" for i in ids]
                columns["answer"] = [str(i % 5) for i in ids]
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
    return path


def repeated(rows, n: int):
    """`rows` (a door's data.Rows) grown to n rows by repeating its table: zero-copy slices of the
    same memory-mapped Arrow, so a row is read exactly as from a door table of n rows (the door's
    own cost grows with n but is paid once at start-up: bench/data_bench.py)."""
    import pyarrow as pa

    table = pa.concat_tables([rows.table] * -(-n // len(rows))).slice(0, n)
    return type(rows)(
        table, rows.sources, rows.spec, rows.skip_bad_rows, (rows.min_pixels, rows.max_pixels), rows.factor
    )


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)


def clock() -> float:
    """CPU seconds of this process: the host work itself, not the other processes' share of the cores."""
    return time.process_time()


class SFTSteps:
    """The host parts of sft.py's step on rank 0 of WORLD, over one data set; `step(k)` returns the
    seconds of each part."""

    parts = ("selection", "row access", "prompt building", "logging")

    def __init__(self, rows, processor, log_dir: Path):
        import torch

        import sft
        from mmr1 import config, dist

        self.rows, self.processor, self.sft = rows, processor, sft
        self.logger = config.metric_logger(log_dir, None, True)
        self.d8, self.d1 = dist.Dist(0, WORLD, 0, torch.device("cpu")), dist.Dist(0, 1, 0, torch.device("cpu"))
        t0 = clock()
        sft.epoch_order(len(rows), 0, 0)  # the epoch's order, once (the first step of an epoch pays it)
        self.order_ms = 1000 * (clock() - t0)

    def step(self, k: int) -> list[float]:
        from data import toy
        from mmr1 import batches, dist

        t = [clock()]
        batch, _ = dist.shard(self.sft.global_batch(k, len(self.rows), SFT_BATCH, 0), self.d8)
        t.append(clock())
        part = [self.rows[i] for i in batch]
        t.append(clock())
        batches.sft_micro_batches(self.processor, part, toy.TOY_MIN_PIXELS, toy.TOY_MAX_PIXELS, 1024, 16384, 4, self.d1)
        t.append(clock())
        self.logger.log(k + 1, {"train/loss": 1.0, "train/grad_norm": 1.0, "train/lr": 1e-5, "time/step_s": 1.0})
        t.append(clock())
        return [b - a for a, b in zip(t, t[1:])]


class RLSteps:
    """The host parts of grpo.py's step with VAS (mix 0.5, --vas-online) on rank 0 of WORLD, over one
    data set; `step(k)` returns the seconds of each part."""

    parts = ("sampler", "row access", "prompt building", "VAS bookkeeping", "logging")

    def __init__(self, rows, processor, log_dir: Path):
        import numpy as np
        import torch

        import vas
        from mmr1 import chat, config, dist

        self.rows, self.processor, self.vas, self.np = rows, processor, vas, np
        self.d8 = dist.Dist(0, WORLD, 0, torch.device("cpu"))
        self.fmt = chat.PromptFormat(instruction=chat.INSTRUCTIONS.get("recipe", "recipe"))
        self.logger = config.metric_logger(log_dir, None, True)
        self.sampler = vas.MixedSampler(len(rows), RL_BATCH, 0.5, seed=0)
        self.rng = np.random.default_rng(0)
        self.vps = self.rng.random(len(rows))
        self.sampler.update_weights(vas.normalise_weights(self.vps))  # after the initial scoring
        self.metrics = {f"metric/{j}": 0.5 for j in range(40)}  # about as many numbers as a GRPO step logs
        self.order_ms = float("nan")

    def step(self, k: int) -> list[float]:
        from data import toy
        from mmr1 import batches, dist

        np, vas = self.np, self.vas
        t = [clock()]
        global_ids = self.sampler.next_batch()
        prompt_ids, _ = dist.shard(global_ids, self.d8)
        t.append(clock())
        part = [self.rows[i] for i in prompt_ids]
        t.append(clock())
        batches.build_prompts(self.processor, part, self.fmt, toy.TOY_MIN_PIXELS, toy.TOY_MAX_PIXELS)
        t.append(clock())
        # --vas-online: every rank writes the step's gathered VPS (512 prompts) and re-weights the sampler
        self.vps[np.asarray(global_ids)] = self.rng.random(len(global_ids))
        self.sampler.update_weights(vas.normalise_weights(self.vps, self.sampler.weights, 0.0))
        self.metrics["vas/vps_mean"] = float(np.mean(self.vps))
        t.append(clock())
        self.logger.log(k + 1, self.metrics)
        t.append(clock())
        return [b - a for a, b in zip(t, t[1:])]


def measure(stages: dict, steps: int) -> dict[int, dict[str, float]]:
    """Median ms per step of each part, per size; the sizes take turns step by step, so a change of
    the machine's load during the run falls on every size alike."""
    times = {n: [] for n in stages}
    for k in range(steps):
        for n, stage in stages.items():
            times[n].append(stage.step(k))
    out = {}
    for n, stage in stages.items():
        out[n] = {name: median_ms([t[j] for t in times[n]]) for j, name in enumerate(stage.parts)}
        out[n]["total"] = median_ms([sum(t) for t in times[n]])
        if stage.order_ms == stage.order_ms:  # SFT: the epoch's order, built once per epoch
            out[n]["epoch order (once per epoch)"] = stage.order_ms
    return out


def table(title: str, results: dict[int, dict[str, float]], opened: dict[int, float]) -> str:
    """Markdown: one row per part, one column per size (ms per step), and the data's opening time."""
    sizes = list(results)
    lines = [f"| {title}: ms per step (median) | " + " | ".join(f"{n:,} rows" for n in sizes) + " |",
             "| --- |" + " ---: |" * len(sizes)]  # fmt: skip
    for part in results[sizes[0]]:
        lines.append(f"| {part} | " + " | ".join(f"{results[n][part]:.2f}" for n in sizes) + " |")
    lines.append(
        "| (the door on the smallest size, once: s) | "
        + " | ".join(f"{opened[n]:.1f}" if n in opened else "-" for n in sizes)
        + " |"
    )
    first, last = results[sizes[0]]["total"], results[sizes[-1]]["total"]
    lines.append(f"\ntotal per step, largest vs smallest size: {last / first:.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-sizes", default="16000,160000,1600000", help="SFT row counts, comma-separated")
    parser.add_argument("--rl-sizes", default="15000,150000", help="RL prompt counts, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="steps timed per size (the median is printed)")
    parser.add_argument(
        "--model", default="", help="a Qwen2.5-VL folder whose processor builds the prompts (default: the toy)"
    )
    args = parser.parse_args(argv)
    sizes = {kind: [int(x) for x in spec.split(",") if x] for kind, spec in (("sft", args.sft_sizes),
                                                                             ("rl", args.rl_sizes))}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-cache")  # a fresh Arrow cache, removed at the end
        from data import toy
        from mmr1 import modeling, prepare

        if not args.model:
            toy.ensure_toy()
        model = args.model or str(toy.TOY_MODEL_DIR)
        processor = modeling.load_processor(model, toy.TOY_MIN_PIXELS, toy.TOY_MAX_PIXELS)
        images = write_images(tmp)
        out = []
        for kind, stage in (("sft", SFTSteps), ("rl", RLSteps)):
            if not sizes[kind]:
                continue
            stages, opened = {}, {}
            base = min(sizes[kind])
            path = write_rows(tmp / f"{kind}-{base}.parquet", kind, base, images)
            t0 = time.perf_counter()
            door = prepare.load_rows(str(path), kind, min_pixels=toy.TOY_MIN_PIXELS, max_pixels=toy.TOY_MAX_PIXELS)
            opened[base] = time.perf_counter() - t0
            for n in sizes[kind]:
                stages[n] = stage(repeated(door, n), processor, tmp / f"log-{kind}-{n}")
            results = measure(stages, args.steps)
            title = "SFT (batch 32, rank 0 of 8)" if kind == "sft" else "GRPO + VAS (512 prompts, rank 0 of 8)"
            out.append(table(title, results, opened))
            print(out[-1], flush=True)
            del stages
    text = "\n\n".join(out)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
