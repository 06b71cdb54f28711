"""GRPO variants side by side on the slip toy: the baseline against Dr. GRPO, GSPO, DAPO's dynamic
sampling and TIS, a few seeds each, same data, same start, same step count.

    OMP_NUM_THREADS=1 python sft.py --toy slip                 # once: runs/toy-slip-sft/final
    python bench/grpo_variants.py --steps 30 --parallel 1      # 5 arms x 3 seeds, then table + plots
    python bench/grpo_variants.py --steps 30 --skip-train      # re-aggregate finished runs
    python bench/grpo_variants.py --repo ../other-checkout    # run another checkout's grpo.py

Every run is `grpo.py --toy slip --max-steps STEPS --val-every V --seed S --output-dir OUT/<arm>-seed<S>
--engine hf --save-every 0` plus the arm's flags (ARMS below), with OMP_NUM_THREADS=1; nothing else
differs between arms (toy defaults: 16 prompts x 8 responses, T = 0.6, lr 1e-4, greedy validation on
200 slip val prompts). `--save-every 0` only drops the intermediate checkpoints. A run whose final/
exists is skipped, so a killed bench resumes where it was; a run killed half-way starts over.

Reported per arm, mean ± half-width of the 95% t-interval over seeds (t quantiles and the interval
from bench/vas_experiment.py):
- greedy val accuracy at step 0, at the last step, its mean over the run (area under the
  accuracy-vs-step curve / steps, trapezoids between the validation points) and its best;
- generated tokens at the end (`rollout/generated_tokens`: every sampled token, dynamic-sampling
  refills included, validation not), mean `rollout/sampling_rounds`, mean `rollout/zero_var_frac_sampled`;
- generated tokens (and steps) at the first validation point with accuracy >= --target, over the
  seeds that reached it, with the count that did not;
- mean `rollout/logprob_abs_diff` (engine vs trainer log-prob: what TIS corrects) and wall seconds;
- each arm's per-seed difference from `baseline` (the arms share seeds, so a paired difference).
Writes OUT/{results.md,results.json,steps.png,tokens.png}; --docs-dir gets copies of the plots.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.vas_experiment import interval  # noqa: E402  (mean, 95% t half-width) over seeds
from mmr1.config import exit_on_input_error, read_jsonl  # noqa: E402

ARMS = {  # name -> grpo.py flags on top of the shared ones
    "baseline": [],
    "dr-grpo": ["--adv-norm", "none", "--loss-agg", "constant"],
    "gspo": ["--ratio-level", "sequence"],
    "dynamic": ["--dynamic-sampling", "--max-sampling-rounds", "3"],
    "tis": ["--tis-cap", "2"],
}
PER_STEP = ["rollout/sampling_rounds", "rollout/zero_var_frac_sampled", "vas/zero_var_frac", "rollout/logprob_abs_diff"]
BATCH = 16  # prompts (groups) per step: grpo.py's toy default


def run_dir(args, arm: str, seed: int) -> Path:
    """OUT/<arm>-seed<S>: the name scripts/compare_runs.py groups by seed."""
    return Path(args.out) / f"{arm}-seed{seed}"


def start_run(args, arm: str, seed: int) -> subprocess.Popen | None:
    """Starts one grpo.py run in --repo (None if its final/ exists); its output goes to <run>/log.txt."""
    out = run_dir(args, arm, seed)
    if (out / "final").exists():
        return None
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(args.repo) / "grpo.py"), "--toy", "slip", "--max-steps", str(args.steps),
           "--val-every", str(args.val_every), "--seed", str(seed), "--output-dir", str(out),
           "--engine", args.engine, "--save-every", "0", *ARMS[arm]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = (out / "log.txt").open("w")
    return subprocess.Popen(cmd, cwd=args.repo, stdout=log, stderr=subprocess.STDOUT, env=env)


def train_all(args) -> None:
    """Every (seed, arm) run, --parallel at a time, seed-major so a partial bench covers every arm.
    A failed run is reported at the end (the others still run); each success writes <run>/wall_s.txt."""
    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    running: list[tuple[str, int, subprocess.Popen, float]] = []
    failed = []
    while jobs or running:
        while jobs and len(running) < args.parallel:
            arm, seed = jobs.pop(0)
            proc = start_run(args, arm, seed)
            if proc is not None:
                running.append((arm, seed, proc, time.time()))
        time.sleep(5)
        for job in list(running):
            arm, seed, proc, start = job
            if proc.poll() is None:
                continue
            running.remove(job)
            wall = time.time() - start
            if proc.returncode:
                failed.append(str(run_dir(args, arm, seed) / "log.txt"))
                print(f"[grpo variants] {arm} seed {seed}: FAILED (rc {proc.returncode})", flush=True)
                continue
            (run_dir(args, arm, seed) / "wall_s.txt").write_text(f"{wall:.0f}\n")
            print(f"[grpo variants] {arm} seed {seed}: {wall:.0f}s", flush=True)
    if failed:
        raise SystemExit("error: failed runs, see " + ", ".join(failed))


def load_run(run: Path) -> dict:
    """The validation curve (steps, accuracies), the cumulative generated tokens at every logged step
    (step 0 = 0), the per-step metrics of PER_STEP (NaN where missing) and the wall seconds (NaN if unknown)."""
    lines = read_jsonl(run / "metrics.jsonl")  # one line naming file and line for a cut or broken file
    val = [(r["step"], r["val/accuracy"]) for r in lines if "val/accuracy" in r]
    tokens = {0: 0.0} | {r["step"]: r["rollout/generated_tokens"] for r in lines if "rollout/generated_tokens" in r}
    wall = run / "wall_s.txt"
    return {
        "val_steps": np.array([s for s, _ in val]),
        "val": np.array([v for _, v in val], dtype=float),
        "tokens": tokens,
        **{k: np.array([r[k] for r in lines if k in r], dtype=float) for k in PER_STEP},
        "wall_s": float(wall.read_text()) if wall.exists() else float("nan"),
    }


def per_seed(args, arm: str) -> dict[str, np.ndarray]:
    """One value per seed (in --seeds order) for every reported number of one arm; the `to_target`
    entries are NaN for a seed that never reached --target."""
    runs = [load_run(run_dir(args, arm, s)) for s in args.seeds]
    out: dict[str, list[float]] = {k: [] for k in ["val_0", "val_last", "val_mean", "val_best", "tokens",
                                                     "steps_to_target", "tokens_to_target", "wall_s", *PER_STEP]}  # fmt: skip
    for r in runs:
        steps, val = r["val_steps"], r["val"]
        out["val_0"].append(val[0])
        out["val_last"].append(val[-1])
        out["val_mean"].append(np.trapezoid(val, steps) / (steps[-1] - steps[0]))
        out["val_best"].append(val.max())
        out["tokens"].append(r["tokens"][int(steps[-1])])
        hit = np.flatnonzero(val >= args.target)
        first = int(steps[hit[0]]) if len(hit) else None
        out["steps_to_target"].append(float("nan") if first is None else first)
        out["tokens_to_target"].append(float("nan") if first is None else r["tokens"][first])
        out["wall_s"].append(r["wall_s"])
        for k in PER_STEP:
            out[k].append(r[k].mean() if len(r[k]) else float("nan"))
    # groups of the trained batch whose accuracies differ (dynamic sampling's filler counts as zero-variance)
    out["signal_groups"] = [BATCH * (1 - z) for z in out["vas/zero_var_frac"]]
    return {k: np.array(v, dtype=float) for k, v in out.items()}


def cell(values: np.ndarray, spec: str, scale: float = 1.0, signed: bool = False) -> str:
    """'mean ± half-width' of the finite values / scale (the interval over the seeds that have one),
    each number in the format spec (".3f", ".1e"); signed: the mean with its sign (+0.012)."""
    v = values[np.isfinite(values)] / scale
    if len(v) == 0:
        return "-"
    mean, half = interval(v)
    text = f"{mean:{'+' if signed else ''}{spec}}"
    return text if len(v) < 2 else f"{text} ± {half:{spec}}"


def summarise(args) -> tuple[str, dict]:
    """The markdown tables (per arm; paired differences from baseline) and the per-seed numbers behind them."""
    values = {arm: per_seed(args, arm) for arm in args.arms}
    columns = [  # (header, per-seed key, format, scale)
        ("val acc step 0", "val_0", ".3f", 1),
        (f"val acc step {args.steps}", "val_last", ".3f", 1),
        ("mean val acc over the run", "val_mean", ".3f", 1),
        ("best val acc", "val_best", ".3f", 1),
        ("generated tokens (k)", "tokens", ".1f", 1e3),
        ("sampling rounds / step", "rollout/sampling_rounds", ".2f", 1),
        ("zero-variance share (sampled)", "rollout/zero_var_frac_sampled", ".3f", 1),
        ("groups with signal / step (trained)", "signal_groups", ".1f", 1),
        (f"tokens (k) to val >= {args.target}", "tokens_to_target", ".1f", 1e3),
        (f"steps to val >= {args.target}", "steps_to_target", ".1f", 1),
        ("engine-trainer log-prob gap", "rollout/logprob_abs_diff", ".1e", 1),
        ("wall s", "wall_s", ".0f", 1),
    ]
    head = ["arm"] + [c[0] for c in columns[:10]] + ["not reached"] + [c[0] for c in columns[10:]]
    rows = []
    for arm, v in values.items():
        cells = [cell(v[k], spec, scale) for _, k, spec, scale in columns]
        missed = f"{int(np.isnan(v['tokens_to_target']).sum())} / {len(args.seeds)}"
        rows.append([arm] + cells[:10] + [missed] + cells[10:])
    table = "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head)] + rows)
    if "baseline" in values:
        paired = [c for c in columns if c[1] in ("val_last", "val_mean", "val_best", "tokens", "signal_groups")]
        rows = [["arms"] + [c[0] for c in paired], ["---"] * (len(paired) + 1)]
        for arm in [a for a in args.arms if a != "baseline"]:
            cells = [
                cell(values[arm][k] - values["baseline"][k], spec, scale, signed=True) for _, k, spec, scale in paired
            ]
            rows.append([f"{arm} - baseline"] + cells)
        table += (
            "\n\nPaired by seed, difference from `baseline` (mean ± half-width of the 95% t-interval):\n\n"
            + "\n".join("| " + " | ".join(r) + " |" for r in rows)
        )
    return table, {arm: {k: v.tolist() for k, v in per.items()} for arm, per in values.items()}


def plot(args, x_axis: str) -> Path:
    """Greedy val accuracy per arm, mean over seeds with a min-max band, against training steps or
    against generated tokens (the seeds' mean token count at each validation step); the steps figure
    has a second panel with the cumulative generated tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if x_axis == "steps" else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    for arm in args.arms:
        runs = [load_run(run_dir(args, arm, s)) for s in args.seeds]
        steps = runs[0]["val_steps"]
        val = np.stack([r["val"] for r in runs])  # (seeds, validation points)
        tokens = np.array([[r["tokens"][int(s)] for s in steps] for r in runs]) / 1e3  # (seeds, points), k
        x = steps if x_axis == "steps" else tokens.mean(0)
        style = "--" if arm == "tis" else "-"  # TIS is ~a no-op with the HF engine: dashed, so baseline shows under it
        (line,) = axes[0, 0].plot(x, val.mean(0), marker="o", markersize=3, label=arm, linestyle=style)
        axes[0, 0].fill_between(x, val.min(0), val.max(0), alpha=0.12, color=line.get_color())
        if x_axis == "steps":
            every = sorted(runs[0]["tokens"])  # every logged step, 0 included
            cum = np.array([[r["tokens"][s] for s in every] for r in runs]) / 1e3
            axes[0, 1].plot(every, cum.mean(0), label=arm, color=line.get_color(), linestyle=style)
    axes[0, 0].axhline(args.target, color="grey", linewidth=0.8, linestyle=":")
    axes[0, 0].set_title("greedy val accuracy (slip toy)")
    axes[0, 0].set_xlabel("training step" if x_axis == "steps" else "generated tokens (thousands)")
    axes[0, 0].legend(fontsize=8)
    if x_axis == "steps":
        axes[0, 1].set_title("generated tokens (thousands, cumulative)")
        axes[0, 1].set_xlabel("training step")
    fig.suptitle(f"GRPO variants, {len(args.seeds)} seeds (mean, min-max band)", fontsize=10)
    fig.tight_layout()
    path = Path(args.out) / f"{x_axis}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repo",
        default=str(ROOT),
        help="checkout whose grpo.py runs (its cwd; its runs/toy-slip-sft/final is the start)",
    )
    parser.add_argument("--out", default="", help="runs, tables and plots (default: <repo>/runs/grpo-variants)")
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps of every run (--max-steps)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2], help="seeds")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--val-every", type=int, default=5, help="greedy validation every N steps (and at the end)")
    parser.add_argument("--target", type=float, default=0.9, help="val accuracy whose first crossing is reported")
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="rollout engine (CPU: hf)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (one thread each)")
    parser.add_argument(
        "--docs-dir",
        default=str(ROOT / "docs"),
        help="copy the plots here as grpo_variants_{steps,tokens}.png ('' = no)",
    )
    parser.add_argument("--skip-train", action="store_true", help="only aggregate finished runs")
    args = parser.parse_args()
    args.arms = [a for a in args.arms.split(",") if a]
    args.out = args.out or str(Path(args.repo) / "runs" / "grpo-variants")
    if set(args.arms) - set(ARMS):
        raise SystemExit(f"error: unknown arms {sorted(set(args.arms) - set(ARMS))}; choose from {list(ARMS)}")
    if not Path(args.repo, "runs", "toy-slip-sft", "final", "config.json").exists():
        raise SystemExit(f"error: no slip SFT checkpoint in {args.repo}: run `python sft.py --toy slip` there first")
    if not args.skip_train:
        train_all(args)
    table, numbers = summarise(args)
    out = Path(args.out)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "per_seed": numbers}, indent=2))
    print(table)
    plots = [plot(args, "steps"), plot(args, "tokens")]
    if args.docs_dir:
        for p in plots:
            shutil.copy(p, Path(args.docs_dir) / f"grpo_variants_{p.name}")
    print("plots: " + " ".join(map(str, plots)))


if __name__ == "__main__":
    exit_on_input_error(main)  # a broken record file: one line, exit 1
