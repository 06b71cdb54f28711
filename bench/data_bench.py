"""Startup time and peak memory of sft.py and grpo.py as the data grows (issue 20).

Writes synthetic data in the real layouts at two sizes, ten times apart: an MMR1-RL-like parquet
(`problem` / `answer` / `images` structs of one 672x672 PNG each) and an MMR1-SFT-like JSON array
(ShareGPT `conversations`, image files beside it), runs each stage on the toy model with
`--max-steps 1` in a fresh subprocess with an empty `datasets` cache, and reports the wall time to
the end of that first step (startup: imports, data opening and checking, model, one step, save) and
the process's peak RSS (getrusage of the child). Optionally one large MMR1-SFT-layout file too,
and the door alone on it (`--prepare N`: mmr1/prepare.py's prepare_split on an N-row sft.json with
the paper's --max-length 16384, so every row is tokenised; the JSON -> Arrow cache build, then the
door's checks writing its table, each timed, then the door again, reusing its table).

    OMP_NUM_THREADS=1 python bench/data_bench.py --sizes 300,3000 --sft-large 100000
    OMP_NUM_THREADS=1 python bench/data_bench.py --stages "" --prepare 100000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rl_parquet(path: Path, n: int, seed: int = 0) -> Path:
    """n MMR1-RL-like rows: `<image>` problem, text answer, one 672x672 PNG as a {bytes, path} struct."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data import toy

    rng = random.Random(seed)
    pngs = [
        toy.png_bytes(toy.draw_grid([rng.choice(list(toy.COLORS)) for _ in range(4)]).resize((672, 672)))
        for _ in range(16)
    ]
    with pq.ParquetWriter(str(path), pa.schema([("id", pa.string()), ("problem", pa.string()), ("answer", pa.string()),
            ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))])) as writer:  # fmt: skip
        for start in range(0, n, 500):
            rows = [
                {
                    "id": str(i),
                    "problem": "<image>How many red squares are there?",
                    "answer": str(i % 5),
                    "images": [{"bytes": pngs[i % len(pngs)] + bytes(8) + i.to_bytes(8, "little"), "path": None}],
                }  # fmt: skip
                for i in range(start, min(n, start + 500))
            ]
            writer.write_table(pa.Table.from_pylist(rows, schema=writer.schema))
    return path


def sft_json(folder: Path, n: int, n_images: int = 8, seed: int = 0) -> Path:
    """n MMR1-SFT-like rows in one JSON array `sft.json` (ShareGPT layout), sharing n_images 672x672 image files."""
    from data import toy

    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for k in range(n_images):
        toy.draw_grid([rng.choice(list(toy.COLORS)) for _ in range(4)]).resize((672, 672)).save(
            folder / "images" / f"{k}.png"
        )
    with open(folder / "sft.json", "w") as f:
        f.write("[\n")
        for i in range(n):
            row = {
                "conversations": [
                    {"from": "human", "value": "<image>How many red squares are there?"},
                    {"from": "gpt", "value": f"<think>I count them.</think><answer>\\boxed{{{i % 5}}}</answer>"},
                ],
                "images": [f"images/{i % n_images}.png"],
            }
            f.write(("," if i else "") + json.dumps(row) + "\n")
        f.write("]\n")
    return folder / "sft.json"


def measure(cmd: list[str], cache: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one stage run in a child process with its own datasets cache."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    probe = (
        "import resource, subprocess, sys, time; t = time.time(); "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(p.stderr[-3000:] if p.returncode else ''); "
        "print(p.returncode, time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    rc, wall, kb = out.stdout.split()
    if rc != "0":
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return float(wall), int(kb) / 1e6


PREPARE_PROBE = """
import sys, time
t0 = time.time()
import torch
from mmr1 import data, dist, modeling, prepare
processor = modeling.load_processor(sys.argv[1], 3136, 50176)
one = dist.Dist(0, 1, 0, torch.device("cpu"))
door = prepare.Door("sft", 3136, 50176, 16384)
t1 = time.time()
total = sum(len(s) for s in data.open_sources(sys.argv[2], "sft", "train"))  # the JSON -> Arrow cache
t2 = time.time()
rows = prepare.prepare_split(sys.argv[2], door, processor, one, skip_bad_rows=True)  # fields, text, headers, tokens
t3 = time.time()
prepare.prepare_split(sys.argv[2], door, processor, one, skip_bad_rows=True)  # again: the door's table reused
t4 = time.time()
print(total, total - len(rows), t1 - t0, t2 - t1, t3 - t2, t4 - t3)
"""


def time_prepare(model: Path, spec: Path, cache: Path) -> None:
    """Prints the door's times on `spec` (see the module docstring) as one table."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, "-c", PREPARE_PROBE, str(model), str(spec)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    n, bad, imports, fields, door, again = out.stdout.strip().splitlines()[-1].split()  # after the report line
    print(
        f"| prepare | rows | bad | imports + processor (s) | JSON -> Arrow (s) | door: every check + its table (s) | "
        f"again, cached (s) |\n| --- | --- | --- | --- | --- | --- | --- |\n| sft.json | {int(n):,} | {bad} | "
        f"{float(imports):.1f} | {float(fields):.1f} | {float(door):.1f} | {float(again):.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="300,3000", help="two row counts, the second ten times the first")
    parser.add_argument("--sft-large", type=int, default=0, help="also time one MMR1-SFT-layout file of this many rows")
    parser.add_argument("--stages", default="sft,grpo", help="stages to time ('' = none)")
    parser.add_argument("--prepare", type=int, default=0, help="time the door alone on an N-row MMR1-SFT sft.json")
    args = parser.parse_args()
    from data import toy

    small, large = (int(x) for x in args.sizes.split(","))
    work = Path(tempfile.mkdtemp(prefix="data_bench_"))
    model = toy.build_toy_model(work / "model", seed=0)
    common = ["--model", str(model), "--max-steps", "1", "--max-pixels", "50176", "--save-every", "0"]
    stage_flags = {
        "sft": ["--batch-size", "4", "--micro-batch-size", "4", "--acc-limit", "-1"],
        "grpo": [
            "--rollout-batch-size",
            "4",
            "--group-size",
            "2",
            "--max-response-length",
            "8",
            "--reward-workers",
            "0",
        ],
    }
    if args.prepare:
        folder = work / f"prepare-{args.prepare}"
        folder.mkdir()
        time_prepare(model, sft_json(folder, args.prepare), folder / "hf_cache")
    if not args.stages:
        return
    results: dict[tuple[str, int], tuple[float, float]] = {}
    print("| stage | layout | rows | time to first step (s) | peak RSS (GB) |\n| --- | --- | --- | --- | --- |")
    sizes = [(s, n) for s in args.stages.split(",") for n in (small, large)]
    if args.sft_large:
        sizes.append(("sft", args.sft_large))
    for stage, n in sizes:
        folder = work / f"{stage}-{n}"
        folder.mkdir()
        spec = sft_json(folder, n) if stage == "sft" else rl_parquet(folder / "train.parquet", n)
        cmd = [f"{stage}.py", *common, *stage_flags[stage], "--data", str(spec), "--output-dir", str(folder / "run")]
        wall, rss = results[stage, n] = measure([sys.executable, *cmd], folder / "hf_cache")
        layout = "MMR1-SFT json" if stage == "sft" else "MMR1-RL parquet"
        print(f"| {stage}.py | {layout} | {n:,} | {wall:.1f} | {rss:.2f} |", flush=True)
    stages = args.stages.split(",")
    rss_ratio = max(results[s, large][1] / results[s, small][1] for s in stages)
    time_ratio = max(results[s, large][0] / results[s, small][0] for s in stages)
    print(f"data scale x10: peak RSS {rss_ratio:.2f}, startup {time_ratio:.2f}")


if __name__ == "__main__":
    main()
