"""Compares runs by their metrics.jsonl: one PNG with a panel per metric, and a markdown table of the
last / best / mean value of each metric per run (or per seed group).

python scripts/compare_runs.py runs/base-seed0 runs/base-seed1 runs/drgrpo-seed0 --metrics val/accuracy,vas/zero_var_frac
python scripts/compare_runs.py runs/a runs/b --x tokens --out compare.png   # x = rollout/generated_tokens

Runs whose paths differ only by a `seedN` part of the folder name (exp/base-seed0, exp/base-seed1) are
one group: its mean line and its min-max band are drawn, and the table gives the group's mean of each
run's last / best / mean. Runs in different folders are never one group (exp1/base-seed0 and
exp2/base-seed0 are two rows, named by their paths from the runs' common folder). "best" is the largest
value (the metrics compared here are accuracies and shares; read it as the largest). Steps where a run
did not log a metric (val/accuracy every --val-every) are left out; NaN values are left out of last /
best / mean and counted in the `runs` column.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mmr1.config import InputError, first_line, read_jsonl  # noqa: E402 - the repo's root on the path first

SEED = re.compile(r"seed\d+")


def read_metrics(run_dir: Path) -> list[dict]:
    """The JSON lines of <run_dir>/metrics.jsonl, in order; a one-line error naming the file (and the
    line) when it is missing or a line is not a JSON object."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (give run folders written by grpo.py or sft.py)")
    try:
        return read_jsonl(path)
    except InputError as e:
        raise SystemExit(f"error: {e}") from e


def series(lines: list[dict], metric: str, x: str) -> tuple[list[float], list[float]]:
    """(x values, metric values) of the lines that logged the metric (and, for x = tokens, the token count)."""
    key = "step" if x == "step" else "rollout/generated_tokens"
    points = [(r[key], r[metric]) for r in lines if metric in r and key in r]
    if x == "tokens":  # step 0's validation has no token count yet: it sits at 0 tokens
        points = [(0.0, r[metric]) for r in lines if metric in r and r.get("step") == 0 and key not in r] + points
    return [p[0] for p in points], [p[1] for p in points]


def tokens_by_step(lines: list[dict]) -> dict[int, float]:
    """Step -> rollout/generated_tokens by the end of it (step 0, before any rollout: 0)."""
    return {0: 0.0} | {r["step"]: r["rollout/generated_tokens"] for r in lines if "rollout/generated_tokens" in r}


def summary(values: list[float]) -> tuple[float, float, float] | None:
    """(last, best = largest, mean) of one run's values of a metric, NaN left out (a NaN's place would
    otherwise decide max()); None when no value is a number."""
    numbers = [v for v in values if not math.isnan(v)]
    return (numbers[-1], max(numbers), sum(numbers) / len(numbers)) if numbers else None


def group_runs(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """Group name -> runs, keyed by path: runs whose resolved paths are equal once the folder name's
    `seedN` is replaced are one group (a run given twice counts once). The name is that path relative
    to the runs' common folder: `base-seed*` for runs side by side, `exp1/base-seed*` beside
    `exp2/base-seed*` when two experiments hold a folder of the same name."""
    keyed: dict[Path, list[Path]] = {}
    seen: set[Path] = set()
    for run in run_dirs:
        path = run.resolve()
        if path not in seen:
            seen.add(path)
            keyed.setdefault(path.parent / SEED.sub("seed*", path.name), []).append(run)
    common = Path(os.path.commonpath([key.parent for key in keyed]))
    return {str(key.relative_to(common)): runs for key, runs in keyed.items()}


def table(groups: dict[str, list[Path]], data: dict[Path, list[dict]], metrics: list[str], x: str) -> str:
    """The markdown table: one row per group and metric, last / best / mean (a group: the mean over its
    runs of each run's value, NaN left out), and the runs it averages (with the NaN values left out)."""
    out = ["| run | metric | last | best | mean | runs |", "| --- | --- | --- | --- | --- | --- |"]
    for name, runs in groups.items():
        for metric in metrics:
            values = [series(data[r], metric, x)[1] for r in runs]
            per_run = [s for s in map(summary, values) if s is not None]
            nan = sum(math.isnan(v) for vs in values for v in vs)
            count = f"{len(per_run)}" + (f", {nan} NaN left out" if nan else "")
            if not per_run:
                out.append(f"| {name} | {metric} | - | - | - | {count} |")
                continue
            last, best, mean = (sum(s[i] for s in per_run) / len(per_run) for i in range(3))
            out.append(f"| {name} | {metric} | {last:.4g} | {best:.4g} | {mean:.4g} | {count} |")
    return "\n".join(out)


def plot(groups: dict[str, list[Path]], data: dict[Path, list[dict]], metrics: list[str], x: str, out: Path) -> None:
    """One panel per metric; a group of seeds: the mean line over the steps all its runs logged (against
    tokens: at the runs' mean token count of each such step), and the min-max band; a lone run: its line."""
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("error: compare_runs.py needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for name, runs in groups.items():
            # seeds are aligned by step (their token counts differ a little), then placed at x
            curves = [dict(zip(*series(data[r], metric, "step"))) for r in runs]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            values = [[c[k] for c in curves] for k in steps]
            mean = [sum(v) / len(v) for v in values]
            xs = steps
            if x == "tokens":  # each step at the seeds' mean token count by then
                counts = [tokens_by_step(data[r]) for r in runs]
                xs = [sum(c.get(k, 0.0) for c in counts) / len(counts) for k in steps]
            (line,) = ax.plot(xs, mean, label=f"{name} (n={len(runs)})" if len(runs) > 1 else name)
            if len(runs) > 1:
                ax.fill_between(
                    xs, [min(v) for v in values], [max(v) for v in values], alpha=0.2, color=line.get_color()
                )
        ax.set_title(metric)
        ax.set_xlabel("step" if x == "step" else "generated tokens")
        ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except (OSError, ValueError) as e:  # a folder in the way, no permission, a full disk; an unknown suffix
        raise SystemExit(f"error: --out {out}: cannot write the plot there ({first_line(e)})") from e
    finally:
        plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, each with a metrics.jsonl")
    parser.add_argument("--metrics", default="val/accuracy,vas/zero_var_frac", help="comma-separated metric names")
    parser.add_argument(
        "--x", default="step", choices=["step", "tokens"], help="x axis: step or rollout/generated_tokens"
    )
    parser.add_argument("--out", default=Path("compare.png"), type=Path, help="the PNG to write")
    args = parser.parse_args(argv)
    metrics = [m for m in args.metrics.split(",") if m]
    if not metrics:
        raise SystemExit("error: --metrics is empty; give names such as val/accuracy,vas/zero_var_frac")
    data = {run: read_metrics(run) for run in args.runs}
    groups = group_runs(args.runs)
    print(table(groups, data, metrics, args.x))
    plot(groups, data, metrics, args.x, args.out)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
