"""The VAS study on the toy bench: does Variance-Aware Sampling pay for its extra rollouts?

    python sft.py                                                # once: the shared starting checkpoint
    OMP_NUM_THREADS=1 python bench/vas_experiment.py --condition standard   # 20 runs, 2 at a time
    OMP_NUM_THREADS=1 python bench/vas_experiment.py --condition hard
    python bench/vas_experiment.py --condition standard --skip-train  # re-aggregate finished runs

The protocol (fixed before the runs; docs/vas-study.md holds the same text):
- start: the toy SFT checkpoint (runs/toy-sft/final); every arm and seed starts from it.
- arms (everything not listed is identical: batch 16 prompts x 8 responses, T = 0.6, lr 1e-4):
    uniform         no VAS: a shuffled walk over the pool
    vas             VAS, lambda 0.5, N = 16 scoring rollouts, alpha / beta 0.8 / 0.2, a full
                    re-scoring of the pool every --vas-update-every steps (and before step 1)
    vas-online      as vas, but after the initial scoring the VPS of a prompt is refreshed only
                    from its own training rollouts (--vas-online; no extra generation after the start)
    uniform-budget  uniform, given the same number of generated responses as `vas` by running
                    MORE STEPS of the same size: the extra responses `vas` spends on scoring become
                    training steps. More steps rather than bigger batches, because that is the
                    alternative a practitioner has for the same generation budget without retuning
                    the learning rate or the batch.
- seeds: 0-4 (five per arm); steps: --steps (the uniform curve flattens by then; see the plot).
- primary metric: mean validation accuracy over the run (area under the accuracy-vs-step curve /
  steps, validation every --val-every steps on --val-limit val prompts, one sample at T = 0.5).
  Secondary: final validation accuracy, zero-variance share of the training batches, prompts with
  a reward signal per step (batch x (1 - zero-variance share)), gradient norm, clip fraction.
  Every number is a mean over seeds with a 95% t-interval.
- conditions: `standard` = the first --train-limit prompts of the toy train split; `hard` = a pool
  of the same size in which most prompts start all-right or all-wrong for the SFT model (built by
  scoring the first --hard-candidates train prompts with N = 16 and keeping --hard-mixed-share of
  mixed ones, the rest all-0 or all-1 half and half; its measured zero-variance share is printed
  and saved with the results).
Writes <out>/<condition>/{results.md,results.json,steps.png,tokens.png} and one folder per run.
"""

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmr1.config import exit_on_input_error, read_jsonl  # noqa: E402

ARMS = {  # name -> grpo.py flags on top of the shared ones
    "uniform": [],
    "vas": ["--vas"],
    "vas-online": ["--vas", "--vas-online", "--vas-update-every", "0"],
    "uniform-budget": [],  # and more steps: budget_steps()
}
CURVES = ["val/accuracy", "vas/zero_var_frac", "train/grad_norm", "train/clip_frac"]
BATCH, GROUP = 16, 8  # prompts per step, responses per prompt (grpo.py's toy defaults)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


def budget_steps(args) -> int:
    """Steps of the uniform-budget arm: the steps of `vas` plus its scoring responses in steps.

    `vas` scores the whole pool (P prompts x N) before step 1 and after every T steps short of the
    end, so it generates steps x B x n + refreshes x P x N responses."""
    refreshes = len(range(0, args.steps, args.vas_update_every)) if args.vas_update_every else 1
    return args.steps + math.ceil(refreshes * args.train_limit * args.vas_rollouts / (BATCH * GROUP))


@functools.cache
def start_fingerprint(model: Path) -> str | None:
    """sha256 of the start checkpoint's weights (its *.safetensors files' bytes, in name order); None
    where the folder holds none. Names the SFT start of a run: one made again on another CPU has the
    same recipe but other bits (matmuls round differently), so its runs are not the same runs.
    Read once per process and start (every archived run of a study shares one start)."""
    files = sorted(Path(model).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def archive_run(run: Path, dest: Path) -> Path:
    """Copies a finished run's metrics.jsonl and config.json (not its checkpoint) to `dest`, the small
    committed record, with start.json: the start checkpoint's path and weights' sha256
    (start_fingerprint). Returns `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "config.json"):
        shutil.copy2(run / name, dest / name)
    model = json.loads((run / "config.json").read_text()).get("model", "")
    start = {"model": model, "weights_sha256": start_fingerprint(Path(model)) if model else None}
    (dest / "start.json").write_text(json.dumps(start, indent=1) + "\n")
    return dest


def archived_from(dest: Path, start_sha: str | None) -> bool:
    """Whether `dest` holds a run archived from the start whose weights' sha256 is `start_sha`: a later
    session, on another machine, need not train it again."""
    start = dest / "start.json"
    return start_sha is not None and start.exists() and json.loads(start.read_text())["weights_sha256"] == start_sha


def run_dir(args, arm: str, seed: int) -> Path:
    """The run's folder under --out."""
    return Path(args.out) / args.condition / f"{arm}-seed{seed}"


def record(args, arm: str, seed: int) -> Path:
    """Where the run's metrics are: its folder under --out once finished there (a `final` checkpoint),
    else its folder in --archive."""
    run = run_dir(args, arm, seed)
    return run if (run / "final").exists() or not args.archive else Path(args.archive) / run.name


def run_arm(arm: str, seed: int, data: str, args) -> tuple[str, list[str], Path] | None:
    """One training run as (label, command, output folder); None if it already finished under --out or
    is in --archive from this start (args.start_sha)."""
    out = run_dir(args, arm, seed)
    if (out / "final").exists() or (args.archive and archived_from(Path(args.archive) / out.name, args.start_sha)):
        return None
    steps = budget_steps(args) if arm == "uniform-budget" else args.steps
    cmd = [
        sys.executable,
        str(ROOT / "grpo.py"),
        "--model",
        args.sft_model,
        "--data",
        data,
        "--val-data",
        args.val_data,
        "--output-dir",
        str(out),
        "--seed",
        str(seed),
        "--max-steps",
        str(steps),
        "--train-limit",
        str(args.train_limit),
        "--val-every",
        str(args.val_every),
        "--val-limit",
        str(args.val_limit),
        "--vas-rollouts",
        str(args.vas_rollouts),
        "--vas-update-every",
        str(args.vas_update_every),
        "--vas-mix-ratio",
        "0.5",
        "--save-every",
        "0",
        "--reward-workers",
        "1",
        "--engine",
        args.engine,
        *ARMS[arm],
    ]
    return f"{args.condition} {arm} seed {seed}", cmd, out


def run_jobs(
    jobs: list[tuple[str, list[str], Path]],
    parallel: int,
    tag: str = "vas study",
    on_done: Callable[[Path], None] | None = None,
) -> None:
    """Runs the (label, command, output folder) jobs `parallel` at a time, one thread each, in order;
    each one's stdout and stderr go to <folder>/log.txt; `on_done(folder)`, if given, follows each
    success (so what finished is kept even if the session is cut). Stops with one line at the first failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            label, cmd, out = pending.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = (out / "log.txt").open("w")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((label, out, proc, time.time()))
        time.sleep(2)
        for job in list(running):
            label, out, proc, start = job
            if proc.poll() is not None:
                running.remove(job)
                if proc.returncode:
                    raise SystemExit(f"error: {label} failed: see {out / 'log.txt'}")
                print(f"[{tag}] {label}: {time.time() - start:.0f}s", flush=True)
                if on_done is not None:
                    on_done(out)


def train_all(args, data: str) -> None:
    """Every (seed, arm) run, --parallel at a time, seed-major so a partial study covers every arm."""
    jobs = [run_arm(arm, seed, data, args) for seed in args.seeds for arm in args.arms]
    keep = (lambda out: archive_run(out, Path(args.archive) / out.name)) if args.archive else None
    run_jobs([j for j in jobs if j is not None], args.parallel, on_done=keep)


def archive(args) -> list[Path]:
    """archive_run() of every finished run of the condition under --out into --archive; returns the
    folders written."""
    runs = sorted(Path(args.out, args.condition).glob("*-seed*"))
    return [archive_run(run, Path(args.archive) / run.name) for run in runs if (run / "final").exists()]


def hard_pool(args) -> str:
    """Builds (once) the `hard` pool: --train-limit prompts, mostly all-right or all-wrong for the
    SFT model. Returns its path; prints and saves its measured zero-variance share."""
    import datasets

    folder = Path(args.out) / "hard"
    pool = folder / "pool.parquet"
    if pool.exists():
        return str(pool)
    folder.mkdir(parents=True, exist_ok=True)
    scores = folder / "candidates.parquet"
    subprocess.run([sys.executable, str(ROOT / "vas.py"), "score", "--model", args.sft_model, "--data", args.data,
                    "--limit", str(args.hard_candidates), "--rollouts", "16", "--engine", args.engine, "--out", str(scores),
                    "--reward-workers", "1", "--seed", "1234"], check=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    table = datasets.load_dataset("parquet", data_files=str(scores), split="train").to_list()
    rng = np.random.default_rng(0)
    mixed = [r["index"] for r in table if 0 < r["pass_rate"] < 1]
    zeros = [r["index"] for r in table if r["pass_rate"] == 0]
    ones = [r["index"] for r in table if r["pass_rate"] == 1]
    n_mixed = round(args.hard_mixed_share * args.train_limit)
    n_zero = min(len(zeros), (args.train_limit - n_mixed) // 2)
    n_one = min(len(ones), args.train_limit - n_mixed - n_zero)
    n_mixed = args.train_limit - n_zero - n_one  # whatever all-0 / all-1 prompts are missing
    chosen = [
        int(i) for part, k in ((mixed, n_mixed), (zeros, n_zero), (ones, n_one)) for i in rng.permutation(part)[:k]
    ]
    rows = datasets.load_dataset(
        "parquet", data_files=str(ROOT / "data" / "toy" / "rl" / "train.parquet"), split="train"
    )
    rows.select(sorted(rng.permutation(chosen).tolist())).to_parquet(str(pool))
    info = {"candidates": len(table), "mixed": n_mixed, "all_wrong": n_zero, "all_right": n_one,
            "zero_variance_share": (n_zero + n_one) / args.train_limit,
            "candidates_zero_variance_share": float(np.mean([not 0 < r["pass_rate"] < 1 for r in table]))}  # fmt: skip
    (folder / "pool.json").write_text(json.dumps(info, indent=2))
    print(f"[vas study] hard pool: {info}")
    return str(pool)


def load_run(run: Path) -> dict:
    """Curves (steps, values) per metric and the cumulative generated responses / tokens per step."""
    lines = read_jsonl(run / "metrics.jsonl")  # one line naming file and line for a cut or broken file
    out = {}
    for name in CURVES + ["rollout/generated_tokens", "rollout/generated_responses"]:
        points = [(r["step"], r[name]) for r in lines if name in r]
        out[name] = (np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=float))
    return out


def interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) over seeds."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(T_975[len(v) - 1] * v.std(ddof=1) / math.sqrt(len(v)))


def per_seed(args, arm: str) -> dict[str, np.ndarray]:
    """One value per seed (in args.seeds order) for every reported metric of one arm."""
    runs = [load_run(record(args, arm, s)) for s in args.seeds]
    steps, _ = runs[0]["val/accuracy"]
    val = np.stack([r["val/accuracy"][1] for r in runs])  # (seeds, val points incl. step 0)
    zero = np.array([r["vas/zero_var_frac"][1].mean() for r in runs])
    return {
        "auc_val": np.trapezoid(val, steps, axis=1) / (steps[-1] - steps[0]),
        "final_val": val[:, -1],
        "zero_var": zero,
        "signal_prompts": BATCH * (1 - zero),
        "grad_norm": np.array([r["train/grad_norm"][1].mean() for r in runs]),
        "clip_frac": np.array([r["train/clip_frac"][1].mean() for r in runs]),
        "responses": np.array([r["rollout/generated_responses"][1][-1] for r in runs]),
        "tokens": np.array([r["rollout/generated_tokens"][1][-1] for r in runs]),
        "steps": np.full(len(runs), float(steps[-1])),
    }


def summarise(args) -> tuple[str, dict]:
    """The results table (markdown) and the numbers behind it, then (added after the first runs, so
    not part of the protocol) each arm's per-seed difference from `uniform`: the arms share seeds, so
    they share the step-0 validation sample and the seed-to-seed spread cancels in a paired difference."""
    values = {arm: per_seed(args, arm) for arm in args.arms}
    summary = {arm: {k: interval(v) for k, v in values[arm].items()} for arm in args.arms}
    rows = []
    for arm, e in summary.items():
        f = lambda k, p=3, e=e: f"{e[k][0]:.{p}f} ± {e[k][1]:.{p}f}"  # noqa: E731
        rows.append(
            f"| {arm} | {int(e['steps'][0])} | {f('auc_val')} | {f('final_val')} | {f('zero_var')} | "
            f"{f('signal_prompts', 1)} | {f('grad_norm')} | {f('clip_frac', 4)} | {e['responses'][0]:.0f} |"
        )
    table = (
        "| arm | steps | mean val acc (primary) | final val acc | zero-variance share | prompts with signal / step "
        "| grad norm | clip frac | generated responses |\n" + "| --- " * 9 + "|\n" + "\n".join(rows)
    )
    if "uniform" in values:
        paired = ["auc_val", "final_val", "zero_var", "grad_norm", "clip_frac"]
        digits = {k: 4 if k == "clip_frac" else 3 for k in paired}
        rows = []
        for arm in [a for a in args.arms if a != "uniform"]:
            diff = {k: interval(values[arm][k] - values["uniform"][k]) for k in paired}
            summary[arm]["minus_uniform"] = diff
            cells = [f"{diff[k][0]:+.{digits[k]}f} ± {diff[k][1]:.{digits[k]}f}" for k in paired]
            rows.append(f"| {arm} - uniform | " + " | ".join(cells) + " |")
        table += (
            "\n\nPaired by seed, difference from `uniform` (mean ± half-width of the 95% t-interval):\n\n"
            "| arms | mean val acc | final val acc | zero-variance share | grad norm | clip frac |\n"
            + "| --- " * 6
            + "|\n"
            + "\n".join(rows)
        )
    return table, summary


def plot(args, x_axis: str) -> Path:
    """Figure 2 style: one panel per metric, mean over seeds and a min-max band, per arm; against
    training steps or against generated tokens (training rollouts + VAS scoring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    for arm in args.arms:
        runs = [load_run(record(args, arm, s)) for s in args.seeds]
        for ax, name in zip(axes, CURVES):
            steps, _ = runs[0][name]
            values = np.stack([r[name][1] for r in runs])
            if name != "val/accuracy":  # per-step curves are noisy: moving average of 5
                values = np.stack(
                    [np.convolve(np.pad(v, (2, 2), mode="edge"), np.ones(5) / 5, "valid") for v in values]
                )
            if x_axis == "tokens":
                t_steps, tokens = runs[0]["rollout/generated_tokens"]
                x = np.interp(steps, t_steps, np.mean([r["rollout/generated_tokens"][1] for r in runs], 0)) / 1e6
            else:
                x = steps
            # uniform-budget repeats uniform's seeds, so its first steps are uniform's: dashed, on top
            ax.plot(x, values.mean(0), label=arm, linestyle="--" if arm == "uniform-budget" else "-")
            ax.fill_between(x, values.min(0), values.max(0), alpha=0.15)
            ax.set_title(name)
            ax.set_xlabel("generated tokens (millions)" if x_axis == "tokens" else "training step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"VAS study, {args.condition} pool, {len(args.seeds)} seeds (mean, min-max band)")
    fig.tight_layout()
    path = Path(args.out) / args.condition / f"{x_axis}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--condition", choices=["standard", "hard"], default="standard", help="the training pool")
    parser.add_argument("--sft-model", default=str(ROOT / "runs" / "toy-sft" / "final"), help="shared start")
    parser.add_argument("--data", default=str(ROOT / "data" / "toy" / "rl") + "@train", help="toy train rows")
    parser.add_argument("--val-data", default=str(ROOT / "data" / "toy" / "rl") + "@val", help="validation rows")
    parser.add_argument("--out", default=str(ROOT / "runs" / "vas-study"), help="runs, tables and plots")
    parser.add_argument(
        "--engine", default="hf", choices=["hf", "vllm"], help="rollout engine (on the toy HF is faster)"
    )
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps of every arm but uniform-budget")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2, 3, 4], help="seeds")
    parser.add_argument("--train-limit", type=int, default=64, help="prompts in the training pool (P)")
    parser.add_argument("--val-every", type=int, default=5, help="validation every N steps")
    parser.add_argument("--val-limit", type=int, default=100, help="validation prompts")
    parser.add_argument("--vas-rollouts", type=int, default=16, help="N for VPS scoring (paper: 16)")
    parser.add_argument("--vas-update-every", type=int, default=10, help="T_update of the vas arm")
    parser.add_argument("--hard-candidates", type=int, default=1024, help="train prompts scored to build the hard pool")
    parser.add_argument("--hard-mixed-share", type=float, default=0.2, help="share of mixed prompts in the hard pool")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--skip-train", action="store_true", help="only aggregate finished runs")
    parser.add_argument("--archive", default="", help="also keep each finished run's metrics here (the committed "
                        "record) and skip runs archived from the same --sft-model (default: none)")  # fmt: skip
    args = parser.parse_args()
    args.arms = [a for a in args.arms.split(",") if a]
    if set(args.arms) - set(ARMS):
        raise SystemExit(f"error: unknown arms {sorted(set(args.arms) - set(ARMS))}; choose from {list(ARMS)}")
    if not Path(args.sft_model, "config.json").exists():
        raise SystemExit(f"error: no SFT checkpoint at {args.sft_model}: run `python sft.py` first")
    args.start_sha = start_fingerprint(Path(args.sft_model))
    data = hard_pool(args) if args.condition == "hard" else args.data
    try:
        if not args.skip_train:
            train_all(args, data)
    finally:  # what finished is kept, even when a later run failed
        if args.archive:
            print(f"[vas study] archived {len(archive(args))} finished runs to {args.archive}")
    table, summary = summarise(args)
    folder = Path(args.out) / args.condition
    folder.mkdir(parents=True, exist_ok=True)  # --skip-train from the archive alone
    (folder / "results.md").write_text(table + "\n")
    (folder / "results.json").write_text(json.dumps({"args": vars(args), "arms": summary}, indent=2))
    print(table)
    print(f"plots: {plot(args, 'steps')} {plot(args, 'tokens')}")


if __name__ == "__main__":
    exit_on_input_error(main)  # a broken record file: one line, exit 1
