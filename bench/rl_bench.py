"""The RL bench: does GRPO improve held-out accuracy over its SFT start? On the `slip` toy, it should.

    python -m data.toy --variant slip                            # once (the script does it when missing)
    OMP_NUM_THREADS=1 python bench/rl_bench.py                   # 5 seeds: SFT seed s, then GRPO seed s, eval
    OMP_NUM_THREADS=1 python bench/rl_bench.py --seeds 0,1,2,3,4,5,6,7,8,9 --parallel 2   # more seeds
    python bench/rl_bench.py --skip-train --plot docs/rl_bench.png  # re-aggregate finished runs, save the plot

The `slip` toy (data/toy.py, docs/rl-bench.md): arith questions counting red squares; in 60% of the
SFT traces of the "multiply by 3" rows the trace adds 3 instead of multiplying, while the RL,
validation and test rows keep the right answers. So after SFT the model counts right and slips on
x3 rows, under greedy decoding too; GRPO's reward is right only without the slip.

Per seed s (everything else at the stage scripts' defaults):
    sft.py  --seed s, 300 steps on data/toy-slip/sft@train -> greedy accuracy on the 200 val prompts
    grpo.py --seed s from that checkpoint, --train-limit 512, --max-steps 30, 16 prompts x 8 responses,
            lr 1e-4, validation GREEDY (--val-temperature 0) on all 200 val prompts every --val-every steps
    eval.py greedy on the 300 test and on the 200 val prompts, SFT and GRPO checkpoints (accuracy,
            slip share, count right)
The headline is the GRPO gain on validation, final minus the SFT start, with a 95% t-interval over
seeds, measured twice: from grpo.py's own curve (step 30 minus step 0) and by eval.py scoring both
checkpoints (in-process, no per-response time limit: grpo.py's step 0 read low once under heavy
load, see docs/rl-bench.md). The issue's bar is a gain of at least +0.15.
Writes <out>/{results.md,results.json,val_curve.png} and one folder and log per stage and seed;
a stage whose output exists is skipped, one another bench process runs (<stage>-seed<s>.pid) waited for.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import toy  # noqa: E402
from mmr1.config import exit_on_input_error, read_jsonl  # noqa: E402

DATA = toy.VARIANT_DATA_DIRS["slip"]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)
TRACE = re.compile(r"I see (\d+) \w+ squares?\. (\d+) ([x+]) (\d+) = (\d+)")  # count, first operation, its result
MIN_GAIN = 0.15  # the bar for "RL visibly learns"


def commands(seed: int, args) -> list[tuple[str, list[str]]]:
    """(stage, argv) of one seed: SFT, GRPO from its checkpoint, eval of both on the test split."""
    run = Path(args.out)
    sft, grpo = run / f"sft-seed{seed}", run / f"grpo-seed{seed}"
    py = sys.executable
    return [
        ("sft", [py, "sft.py", "--model", str(toy.TOY_MODEL_DIR), "--data", f"{DATA / 'sft'}@train",
                 "--val-data", f"{DATA / 'sft'}@val", "--acc-data", f"{DATA / 'rl'}@val", "--output-dir", str(sft),
                 "--seed", str(seed), "--max-steps", str(args.sft_steps), "--save-every", "0"]),
        ("grpo", [py, "grpo.py", "--model", str(sft / "final"), "--data", f"{DATA / 'rl'}@train",
                  "--val-data", f"{DATA / 'rl'}@val", "--train-limit", "512", "--output-dir", str(grpo),
                  "--seed", str(seed), "--max-steps", str(args.steps), "--val-every", str(args.val_every),
                  "--val-limit", "0", "--val-temperature", "0", "--save-every", "0", "--reward-workers", "1",
                  "--engine", "hf", *args.grpo_args.split()]),
    ] + [
        (stage, [py, "eval.py", "--model", f"{sft / 'final'},{grpo / 'final'}", "--benchmarks", "toy",
                 "--bench-data", f"toy={DATA / 'rl' / split}.parquet", "--engine", "hf", "--max-new-tokens", "64",
                 "--min-pixels", "3136", "--max-pixels", "50176", "--output-dir", str(run / f"{stage}-seed{seed}")])
        for stage, split in (("eval", "test"), ("evalval", "val"))
    ]  # fmt: skip


def done(stage: str, seed: int, args) -> bool:
    """Whether a stage of a seed has already finished (its final output exists)."""
    run = Path(args.out)
    if stage.startswith("eval"):
        return (run / f"{stage}-seed{seed}" / "results.json").exists()
    return (run / f"{stage}-seed{seed}" / "final" / "config.json").exists()


def wait_for_other(stage: str, seed: int, args) -> None:
    """If another bench process runs this stage (its pid file names a live process), wait for it:
    so seeds can be added, or the bench restarted, while runs are under way."""
    pid_file = Path(args.out) / f"{stage}-seed{seed}.pid"
    while pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), 0)
        except (ProcessLookupError, ValueError):
            return
        time.sleep(10)


def train_seed(seed: int, args) -> None:
    """Runs the missing stages of one seed in order; each stage's output goes to <out>/<stage>-seed<s>.log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for stage, argv in commands(seed, args):
        wait_for_other(stage, seed, args)
        if done(stage, seed, args):
            continue
        t0 = time.time()
        pid_file = Path(args.out) / f"{stage}-seed{seed}.pid"
        with (Path(args.out) / f"{stage}-seed{seed}.log").open("w") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
            pid_file.write_text(str(proc.pid))
            rc = proc.wait()
        pid_file.unlink(missing_ok=True)
        if rc:
            raise SystemExit(f"error: rl bench: {stage} seed {seed} failed: see {args.out}/{stage}-seed{seed}.log")
        print(f"[rl bench] seed {seed} {stage}: {time.time() - t0:.0f}s", flush=True)


def train_all(args) -> None:
    """Every seed, --parallel seeds at a time (a seed's stages run in order)."""
    from concurrent.futures import ThreadPoolExecutor

    if not (DATA / "rl" / "test.parquet").exists():
        toy.write_toy_data(variant="slip")
    if not (toy.TOY_MODEL_DIR / "config.json").exists():
        toy.build_toy_model()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda s: train_seed(s, args), args.seeds))


def metrics(path: Path) -> list[dict]:
    """The JSON lines of a run's metrics.jsonl."""
    return read_jsonl(path)  # one line naming file and line for a cut or broken file


def slip_stats(records: list[dict], rows: dict[str, dict]) -> dict[str, float]:
    """Greedy accuracy, share of responses that slip (the first result is count + multiplier, not
    the product; judged by the number, since a trained model may write the product after a '+')
    and share that count right, over eval.py's per-row records."""
    acc, slips, counted = [], [], []
    for r in records:
        q = rows[r["id"]]["problem"]
        mul, add = (int(x) for x in re.search(r"multiply by (\d+), then add (\d+)", q).groups())
        m = TRACE.search(r["response"])
        acc.append(r["correct"])
        slips.append(bool(m) and int(m.group(5)) == int(m.group(1)) + mul != int(m.group(1)) * mul)
        counted.append(bool(m) and int(m.group(1)) * mul + add == int(r["gold"]))
    return {"accuracy": float(np.mean(acc)), "slip": float(np.mean(slips)), "count_right": float(np.mean(counted))}


def interval(values) -> tuple[float, float]:
    """(mean, half-width of the 95% t-interval) over seeds."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(T_975[len(v) - 1] * v.std(ddof=1) / math.sqrt(len(v)))


def per_seed(seed: int, args, rows: dict[str, dict]) -> dict:
    """Every number of one seed: SFT greedy val accuracy, the GRPO greedy val curve, and eval.py's
    accuracy and slip share of both checkpoints on val and test (rows: id -> row of both splits)."""
    run = Path(args.out)
    sft_acc = [m["val/accuracy"] for m in metrics(run / f"sft-seed{seed}" / "metrics.jsonl") if "val/accuracy" in m]
    curve = [(m["step"], m["val/accuracy"]) for m in metrics(run / f"grpo-seed{seed}" / "metrics.jsonl")
             if "val/accuracy" in m]  # fmt: skip
    out = {"seed": seed, "sft_val": sft_acc[-1], "steps": [s for s, _ in curve], "val": [a for _, a in curve]}
    for stage, split in (("eval", "test"), ("evalval", "val")):
        for label in ("sft", "grpo"):
            path = run / f"{stage}-seed{seed}" / f"{label}-seed{seed}" / "toy.jsonl"  # eval.py: runs/x/final -> x
            if path.exists():
                out[f"{split}_{label}"] = slip_stats(metrics(path), rows)
    return out


def summarise(args) -> tuple[str, dict]:
    """The per-seed table, the mean ± 95% t-interval row, and the gain verdict (markdown)."""
    import datasets

    rows = {}
    for split in ("val", "test"):
        ds = datasets.load_dataset("parquet", data_files=str(DATA / "rl" / f"{split}.parquet"), split="train")
        rows |= {r["id"]: r for r in ds.remove_columns("images").to_list()}
    seeds = [per_seed(s, args, rows) for s in args.seeds]
    cols = {
        "SFT val (sft.py)": [s["sft_val"] for s in seeds],
        "GRPO val step 0": [s["val"][0] for s in seeds],
        **{f"GRPO val step {st}": [s["val"][i] for s in seeds] for i, st in enumerate(seeds[0]["steps"]) if i},
        "gain (grpo.py val)": [s["val"][-1] - s["val"][0] for s in seeds],
    }
    for split in ("val", "test"):
        if all(f"{split}_grpo" in s for s in seeds):
            for label in ("sft", "grpo"):
                cols[f"{split} acc {label.upper()} (eval.py)"] = [s[f"{split}_{label}"]["accuracy"] for s in seeds]
                cols[f"{split} slip {label.upper()}"] = [s[f"{split}_{label}"]["slip"] for s in seeds]
            if split == "val":
                cols["gain (eval.py val)"] = [s["val_grpo"]["accuracy"] - s["val_sft"]["accuracy"] for s in seeds]
    cols["count right (all evals)"] = [
        min(s[k]["count_right"] for k in ("val_sft", "val_grpo", "test_sft", "test_grpo") if k in s) for s in seeds
    ]
    header = "| seed | " + " | ".join(cols) + " |\n" + "| --- " * (len(cols) + 1) + "|\n"
    lines = [f"| {s['seed']} | " + " | ".join(f"{v[i]:.3f}" for v in cols.values()) + " |" for i, s in enumerate(seeds)]
    stats = {k: interval(v) for k, v in cols.items()}
    lines.append("| mean ± 95% t | " + " | ".join(f"{m:.3f} ± {h:.3f}" for m, h in stats.values()) + " |")
    verdicts = []
    for key in ("gain (grpo.py val)", "gain (eval.py val)"):
        if key not in stats:
            continue
        gain, half = stats[key]
        met = (
            "met by the whole interval"
            if gain - half >= MIN_GAIN
            else "met by the mean"
            if gain >= MIN_GAIN
            else "NOT met"
        )
        verdicts.append(
            f"{key}, final minus SFT start (greedy, 200 val prompts, {len(seeds)} seeds): {gain:+.3f} ± {half:.3f} "
            f"(95% t-interval {gain - half:+.3f} to {gain + half:+.3f}); bar +{MIN_GAIN:.2f}: {met}"
        )
    verdict = "\n".join(verdicts)
    return header + "\n".join(lines) + "\n\n" + verdict + "\n", {"seeds": seeds, "stats": stats, "verdict": verdict}


def plot(args, summary: dict, path: Path) -> Path:
    """Figure 2 style: greedy validation accuracy against GRPO step, one thin line per seed, the
    mean in bold, the SFT start as step 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    seeds = summary["seeds"]
    for s in seeds:
        ax.plot(s["steps"], s["val"], color="tab:blue", alpha=0.3, linewidth=1)
    ax.plot(seeds[0]["steps"], np.mean([s["val"] for s in seeds], 0), color="tab:blue", linewidth=2.5,
            marker="o", label=f"mean of {len(seeds)} seeds")  # fmt: skip
    ax.set_xlabel("GRPO step (0 = the SFT checkpoint)")
    ax.set_ylabel("validation accuracy (greedy, 200)")
    ax.set_title("GRPO on the slip toy")
    ax.set_ylim(0.5, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (SFT seed = GRPO seed)")
    parser.add_argument("--sft-steps", type=int, default=300, help="SFT steps (sft.py's default)")
    parser.add_argument("--steps", type=int, default=30, help="GRPO steps (grpo.py's default)")
    parser.add_argument("--val-every", type=int, default=5, help="GRPO validation every N steps")
    parser.add_argument("--grpo-args", default="", help="extra grpo.py flags, e.g. '--vas' (space-separated)")
    parser.add_argument("--parallel", type=int, default=1, help="seeds run at a time (one thread each)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "rl-bench"), help="runs, table and plot")
    parser.add_argument("--skip-train", action="store_true", help="only aggregate finished runs")
    parser.add_argument("--plot", default="", help="also save the plot here (e.g. docs/rl_bench.png)")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    if not args.skip_train:
        train_all(args)
    table, summary = summarise(args)
    out = Path(args.out)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({"args": vars(args), **summary}, indent=2))
    print(table)
    paths = [plot(args, summary, out / "val_curve.png")] + ([plot(args, summary, Path(args.plot))] if args.plot else [])
    print("plots:", *paths)


if __name__ == "__main__":
    exit_on_input_error(main)  # a broken record file: one line, exit 1
