"""End-to-end records of short toy GRPO runs, to pin that the defaults do not move.

    python tests/golden/grpo_defaults.py --repo /path/to/checkout --out record.json

Builds the test suite's toy (tests/conftest.py: model seed 0, SMALL splits) and its short SFT
(`toy_sft`: 150 steps, so rewards vary within groups) with THIS checkout's generator and sft.py,
runs `grpo.py` of the checkout at --repo (one process, OMP_NUM_THREADS=1) for each
entry of RUNS, and records every logged number but the clocks and throughputs, plus a sha256 of
every tensor of final/model.safetensors.
tests/test_grpo_options.py::test_defaults_end_to_end_equal_the_commit_before_the_options records
the current grpo.py and the one of BASELINE (the commit before the GRPO options, unpacked from this
clone's git history by `checkout`) on the same machine and compares them bit for bit: the defaults,
and the paper preset's loss and sampler settings at toy size, train exactly as they did. Both sides
run on the same machine because a stored record is only bit-exact on the CPU that wrote it (two x86
CPUs with different vector units round the same matmuls differently).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SMALL = {"train": 96, "val": 24, "test": 24}  # tests/conftest.py's toy sizes
COMMON = ["--max-steps", "3", "--train-limit", "16", "--rollout-batch-size", "4", "--group-size", "4",
          "--max-response-length", "48", "--val-limit", "8", "--val-every", "1", "--reward-workers", "0",
          "--engine", "hf"]  # fmt: skip
RUNS = {
    "defaults": [],
    # --preset paper needs CUDA; these are its loss and sampler settings (one update, lr 1e-6, k3 0.01,
    # clip 0.2 / 0.2, VAS lambda 0.5, alpha / beta 0.8 / 0.2) at toy size, VAS re-scoring every step
    "paper-settings": [
        "--updates-per-batch",
        "1",
        "--lr",
        "1e-6",
        "--kl-coef",
        "0.01",
        "--vas",
        "--vas-rollouts",
        "2",
        "--vas-update-every",
        "1",
        "--vas-mix-ratio",
        "0.5",
    ],  # fmt: skip
}
CLOCKS = {"time"}
VARYING = ("time/", "perf/")  # wall-clock durations and throughputs
BASELINE = "676a1b5"  # the commit before the GRPO options (issue 30)


def env() -> dict[str, str]:
    """A stage script's environment: one thread (bit-reproducible), no inherited torchrun variables."""
    inherited = {k: v for k, v in os.environ.items() if k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"}}
    return inherited | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def build_toy(folder: Path) -> Path:
    """The test suite's toy model and data under `folder`; returns it."""
    from data import toy

    if not (folder / "model" / "config.json").exists():
        toy.build_toy_model(folder / "model", seed=0)
        toy.write_toy_data(folder / "data", seed=0, sizes=SMALL)
    return folder


def sft_model(toy_dir: Path, out: Path) -> Path:
    """The toy model after 150 SFT steps (batch 8, this checkout's sft.py, one thread, ~6 s): it
    answers in format and right about a quarter of the time, so GRPO groups have signal."""
    if not (out / "final" / "config.json").exists():
        args = [sys.executable, "sft.py", "--model", str(toy_dir / "model"), "--data", f"{toy_dir / 'data' / 'sft'}@train",
                "--val-data", "", "--acc-limit", "-1", "--output-dir", str(out), "--max-steps", "150",
                "--batch-size", "8", "--micro-batch-size", "8", "--save-every", "0"]  # fmt: skip
        proc = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return out / "final"


def checkout(commit: str, dest: Path) -> Path | None:
    """The files of `commit` of this clone unpacked into `dest` (git archive); None where the clone
    lacks that commit (a shallow clone) or git is missing."""
    import io
    import tarfile

    try:
        tar = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit], capture_output=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar.stdout)) as archive:
        archive.extractall(dest, filter="data")
    return dest


def record(repo: Path, toy_dir: Path, model: Path, name: str, out: Path) -> dict:
    """Runs RUNS[name] with repo's grpo.py from `model` into `out`; returns {"metrics": [...],
    "weights": {tensor name: sha256 of its fp32 bytes}}."""
    from safetensors.torch import load_file

    data = toy_dir / "data" / "rl"
    args = [sys.executable, "grpo.py", "--model", str(model), "--data", f"{data}@train",
            "--val-data", f"{data}@val", "--output-dir", str(out), *COMMON, *RUNS[name]]  # fmt: skip
    proc = subprocess.run(args, cwd=repo, env=env(), capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(str(out / "final" / "model.safetensors"))
    return {
        "metrics": [{k: v for k, v in line.items() if k not in CLOCKS and not k.startswith(VARYING)} for line in lines],
        "weights": {k: hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for k, v in sorted(weights.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--repo", type=Path, required=True, help="checkout whose grpo.py is recorded")
    parser.add_argument("--out", type=Path, required=True, help="the JSON record to write")
    parser.add_argument("--work", type=Path, default=Path("/tmp/grpo-golden"), help="scratch folder")
    args = parser.parse_args()
    toy_dir = build_toy(args.work / "toy")
    model = sft_model(toy_dir, args.work / "toy-sft")
    result = {name: record(args.repo.resolve(), toy_dir, model, name, args.work / name) for name in RUNS}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}: {', '.join(RUNS)}")


if __name__ == "__main__":
    main()
