"""Compares runs by their metrics.jsonl: one PNG with a panel per metric, and a markdown table of the
last / best / mean value of each metric per run (or per seed group).

python scripts/compare_runs.py runs/base-seed0 runs/base-seed1 runs/drgrpo-seed0 --metrics val/accuracy,vas/zero_var_frac
python scripts/compare_runs.py runs/a runs/b --x tokens --out compare.png   # x = rollout/generated_tokens

Runs whose folder names differ only by a `seedN` part (base-seed0, base-seed1) are one group: its mean
line and its min-max band are drawn, and the table gives the group's mean of each run's last / best /
mean. "best" is the largest value (the metrics compared here are accuracies and shares; read it as
the largest). Steps where a run did not log a metric (val/accuracy every --val-every) are left out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

SEED = re.compile(r"seed\d+")


def read_metrics(run_dir: Path) -> list[dict]:
    """The JSON lines of <run_dir>/metrics.jsonl, in order; a one-line error when it is missing or bad."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (give run folders written by grpo.py or sft.py)")
    lines = []
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if text.strip():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path} line {number} is not JSON ({e.msg})") from e
    return lines


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


def summary(values: list[float]) -> tuple[float, float, float]:
    """(last, best = largest, mean) of one run's values of a metric."""
    return values[-1], max(values), sum(values) / len(values)


def group_runs(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """Group name -> runs: names equal once their `seedN` part is removed are one group."""
    groups: dict[str, list[Path]] = {}
    for run in run_dirs:
        groups.setdefault(SEED.sub("seed*", run.name), []).append(run)
    return groups


def table(groups: dict[str, list[Path]], data: dict[Path, list[dict]], metrics: list[str], x: str) -> str:
    """The markdown table: one row per group and metric, last / best / mean (a group: the mean over its
    runs of each run's value), and the runs it averages."""
    out = ["| run | metric | last | best | mean | runs |", "| --- | --- | --- | --- | --- | --- |"]
    for name, runs in groups.items():
        for metric in metrics:
            per_run = [summary(v) for v in (series(data[r], metric, x)[1] for r in runs) if v]
            if not per_run:
                out.append(f"| {name} | {metric} | - | - | - | 0 |")
                continue
            last, best, mean = (sum(s[i] for s in per_run) / len(per_run) for i in range(3))
            out.append(f"| {name} | {metric} | {last:.4g} | {best:.4g} | {mean:.4g} | {len(per_run)} |")
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
    fig.savefig(out, dpi=100)
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
