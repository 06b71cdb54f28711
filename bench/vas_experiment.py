"""The VAS experiment on the toy bench: uniform sampling vs VAS (lambda 0.5, 1.0) vs VAS + online
refresh, from one toy SFT checkpoint, several seeds each, same steps; a Figure-2-style plot.

    python sft.py                                   # once: the shared starting checkpoint
    python bench/vas_experiment.py                  # ~30 min on 2 CPU cores; table + plots in runs/vas-experiment
    python bench/vas_experiment.py --skip-train     # re-aggregate finished runs
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARMS = {  # name -> grpo.py flags; everything else is identical across arms
    "uniform": [],
    "vas-0.5": ["--vas", "--vas-mix-ratio", "0.5"],
    "vas-1.0": ["--vas", "--vas-mix-ratio", "1.0"],
    "vas-0.5-online": ["--vas", "--vas-mix-ratio", "0.5", "--vas-online"],
}
CURVES = ["train/grad_norm", "train/clip_frac", "vas/zero_var_frac", "val/accuracy"]


def run_arm(arm: str, seed: int, args) -> float:
    """Trains one arm with one seed (skipped if its final/ exists); returns wall seconds."""
    out = Path(args.out) / f"{arm}-seed{seed}"
    if (out / "final").exists():
        return json.loads((out / "wall.json").read_text())["seconds"]
    cmd = [sys.executable, str(ROOT / "grpo.py"), "--model", args.sft_model, "--data", args.data,
           "--val-data", args.val_data, "--output-dir", str(out), "--seed", str(seed),
           "--max-steps", str(args.steps), "--train-limit", str(args.train_limit), "--val-every", str(args.val_every),
           "--val-limit", str(args.val_limit), "--vas-rollouts", str(args.vas_rollouts),
           "--vas-update-every", str(args.vas_update_every), "--save-every", "0", *ARMS[arm]]  # fmt: skip
    start = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.time() - start
    (out / "wall.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def curves(run: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric -> (steps, values) from a run's metrics.jsonl."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for name in CURVES + ["time/vas_s"]:
        points = [(r["step"], r[name]) for r in lines if name in r]
        out[name] = (np.array([p[0] for p in points]), np.array([p[1] for p in points]))
    return out


def summarise(args, walls: dict[str, list[float]]) -> tuple[str, dict]:
    """The results table (markdown) and the raw numbers per arm."""
    rows, summary = [], {}
    for arm in args.arms:
        runs = [curves(Path(args.out) / f"{arm}-seed{s}") for s in args.seeds]
        val = np.stack([r["val/accuracy"][1] for r in runs])  # (seeds, val points incl. step 0)
        steps = runs[0]["val/accuracy"][0]
        auc = np.trapezoid(val, steps, axis=1) / (steps[-1] - steps[0])  # mean val accuracy over the run
        entry = {
            "final_val": (val[:, -1].mean(), val[:, -1].std()),
            "auc_val": (auc.mean(), auc.std()),
            "gain": ((val[:, -1] - val[:, 0]).mean(), (val[:, -1] - val[:, 0]).std()),
            "zero_var": (np.mean([r["vas/zero_var_frac"][1].mean() for r in runs]), 0.0),
            "grad_norm": (np.mean([r["train/grad_norm"][1].mean() for r in runs]), 0.0),
            "clip_frac": (np.mean([r["train/clip_frac"][1].mean() for r in runs]), 0.0),
            "wall_s": (np.mean(walls[arm]), np.std(walls[arm])),
            "vas_s": (np.mean([r["time/vas_s"][1].sum() for r in runs]), 0.0),
        }
        summary[arm] = {k: [float(v[0]), float(v[1])] for k, v in entry.items()}
        pm = lambda k, f="{:.3f}", e=entry: f"{f.format(e[k][0])} ± {f.format(e[k][1])}"  # noqa: E731
        rows.append(f"| {arm} | {pm('final_val')} | {pm('gain')} | {pm('auc_val')} | {entry['zero_var'][0]:.3f} | "
                    f"{entry['grad_norm'][0]:.3f} | {entry['clip_frac'][0]:.4f} | {pm('wall_s', '{:.0f}')} | "
                    f"{entry['vas_s'][0]:.0f} |")  # fmt: skip
    header = ("| arm | final val acc | gain over step 0 | mean val acc (AUC) | zero-variance share | grad norm | "
              "clip frac | wall s / run | VAS scoring s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |")  # fmt: skip
    return header + "\n" + "\n".join(rows), summary


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of the same length (edges padded with the end values)."""
    k = max(1, min(window, len(values)))
    padded = np.pad(values, (k // 2, k - 1 - k // 2), mode="edge")
    return np.convolve(padded, np.ones(k) / k, mode="valid")


def plot(args) -> Path:
    """Figure 2 style: one panel per metric, mean over seeds with a min-max band, per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    for arm in args.arms:
        runs = [curves(Path(args.out) / f"{arm}-seed{s}") for s in args.seeds]
        for ax, name in zip(axes, CURVES):
            steps = runs[0][name][0]
            values = np.stack([r[name][1] for r in runs])
            if name != "val/accuracy":  # smooth the noisy per-step curves (moving average of 5)
                values = np.stack([smooth(v, 5) for v in values])
            ax.plot(steps, values.mean(0), label=arm)
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
            ax.set_title(name)
            ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(args.out) / "vas_experiment.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-model", default=str(ROOT / "runs" / "toy-sft" / "final"), help="shared start")
    parser.add_argument("--data", default=str(ROOT / "data" / "toy" / "rl") + "@train", help="RL training rows")
    parser.add_argument("--val-data", default=str(ROOT / "data" / "toy" / "rl") + "@val", help="validation rows")
    parser.add_argument("--out", default=str(ROOT / "runs" / "vas-experiment"), help="runs, table and plots")
    parser.add_argument("--steps", type=int, default=40, help="GRPO steps per run")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2], help="seeds")
    parser.add_argument("--train-limit", type=int, default=256, help="training prompts")
    parser.add_argument("--val-every", type=int, default=5, help="validation every N steps")
    parser.add_argument("--val-limit", type=int, default=200, help="validation prompts")
    parser.add_argument("--vas-rollouts", type=int, default=4, help="N for VPS scoring")
    parser.add_argument("--vas-update-every", type=int, default=10, help="T_update")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--skip-train", action="store_true", help="only aggregate finished runs")
    args = parser.parse_args()
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {list(ARMS)}")
    if not Path(args.sft_model, "config.json").exists():
        raise SystemExit(f"no SFT checkpoint at {args.sft_model}: run `python sft.py` first")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    walls: dict[str, list[float]] = {arm: [] for arm in args.arms}
    for seed in args.seeds:  # seed-major, so a partial run still covers every arm
        for arm in args.arms:
            if args.skip_train:
                walls[arm].append(
                    json.loads((Path(args.out) / f"{arm}-seed{seed}" / "wall.json").read_text())["seconds"]
                )
                continue
            walls[arm].append(run_arm(arm, seed, args))
            print(f"{arm} seed {seed}: {walls[arm][-1]:.0f}s", flush=True)
    table, summary = summarise(args, walls)
    (Path(args.out) / "results.md").write_text(table + "\n")
    (Path(args.out) / "results.json").write_text(json.dumps({"args": vars(args), "arms": summary}, indent=2))
    print(table)
    print(f"plot: {plot(args)}")
    import vas

    vas_arm = next((a for a in args.arms if a.startswith("vas")), None)
    if vas_arm:
        print(f"VPS dynamics: {vas.plot_refreshes(Path(args.out) / f'{vas_arm}-seed{args.seeds[0]}')}")


if __name__ == "__main__":
    main()
