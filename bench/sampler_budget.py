"""The equal-budget sampler study: every arm runs to the same generated-token budget on the `spread`
toy, VAS at the paper's re-scoring ratio beside dynamic sampling, uniform and the sampler study's
harsher VAS cadence. The protocol, committed before the first run, is
bench/results/sampler-budget/PROTOCOL.md (docs/vas-study.md, "The equal-budget study").

    python -m data.toy --variant spread
    mkdir -p /tmp/sb-code && git archive HEAD | tar -x -C /tmp/sb-code && git rev-parse HEAD > /tmp/sb-code/COMMIT
    nohup setsid nice -n 19 python bench/sampler_budget.py --code /tmp/sb-code > /tmp/sampler-budget.log 2>&1 &
    echo 19 > /proc/$!/autogroup  # setsid makes a scheduler autogroup: without this, nice alone gets it half the CPU
    python bench/sampler_budget.py --skip-train        # tables and plot from the archive alone

Training: each run is grpo.py (of --code: a snapshot of the repository at one commit, made with
`git archive`, so that every run of the study runs the same code while the checkout changes) from
the committed start B with a step cap far above what the budget
allows; this driver reads its metrics.jsonl as it grows and, once a logged step has reached --budget
generated tokens, sends it SIGTERM (grpo.py finishes the step, saves a checkpoint, exits 0). A finished
run is archived at once to --archive/<arm>-seed<k>/ (metrics.jsonl, config.json, start.json). Run again
after any interruption, the same command skips archived runs, resumes a run from its latest
checkpoint under --out, and archives a run that reached the budget but was not archived yet. The
sampler study's runs from the same start that already pass the budget are copied instead of trained
(REUSED; each copy keeps a source.json). SIGTERM or SIGINT to this driver is passed on to its runs,
which save a checkpoint and stop.

Aggregation (--skip-train reads only --archive): every number is censored at the budget (what a run
logs beyond it is not read). Per arm: tokens to the target (Kaplan-Meier median, restricted mean
E[min(T, budget)], how many reached it), mean accuracy over [0, budget] (the area under the
accuracy-vs-tokens step function / budget), accuracy at the budget, steps within it, the share of
tokens spent on VAS scoring, the trained batch's zero-variance share; paired by seed against
`uniform` and in the protocol's secondary pairs: differences with 95% t-intervals and first-reach
wins / ties / losses. Only the seeds whose arms are all archived whole enter the tables; every run
left out is named with its reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from sampler_study import accuracy_at, curves, read  # noqa: E402
from vas_experiment import archive_run, archived_from, interval, start_fingerprint  # noqa: E402

ARMS = {  # name -> grpo.py flags of the arm (PROTOCOL.md, "Arms")
    "uniform": [],
    "dynamic": ["--dynamic-sampling", "--max-sampling-rounds", "3"],
    "vas-t64": ["--vas", "--vas-update-every", "64"],
    "vas+dynamic-t64": ["--vas", "--vas-update-every", "64", "--dynamic-sampling", "--max-sampling-rounds", "3"],
    "vas-t12": ["--vas", "--vas-update-every", "12"],
    "vas+dynamic-t12": ["--vas", "--vas-update-every", "12", "--dynamic-sampling", "--max-sampling-rounds", "3"],
}
REUSED = {"uniform": "uniform-budget", "vas-t12": "vas", "vas+dynamic-t12": "vas+dynamic"}  # arm -> sampler study's
SEED_ORDER = [4, 5, 6, 7, 8, 9, 0, 1, 2, 3]  # the seeds with reusable runs first: complete seeds soonest
SECONDARY = [("vas+dynamic-t64", "dynamic"), ("vas-t64", "vas-t12")]  # (arm, minus arm), besides "- uniform"
STEP_CAP = 2000  # --max-steps: far above what the budget allows (uniform needs ~360 steps for 1.5M tokens)
SAVE_EVERY = 20
STUDY = ROOT / "bench" / "results" / "sampler-study"


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def command(arm: str, seed: int, out: Path, args, resume: bool) -> list[str]:
    """The grpo.py command line of one run: the sampler study's shared flags, the arm's own, the cap."""
    return [sys.executable, str(Path(args.code) / "grpo.py"), "--model", args.sft_model, "--data", args.data,
            "--val-data", args.val_data, "--val-temperature", "0", "--output-dir", str(out), "--seed", str(seed),
            "--max-steps", str(STEP_CAP), "--train-limit", "512", "--val-every", "5", "--val-limit", "200",
            "--vas-rollouts", "16", "--vas-mix-ratio", "0.5", "--save-every", str(SAVE_EVERY),
            "--reward-workers", "1", "--engine", "hf", *ARMS[arm], *(["--resume"] if resume else [])]  # fmt: skip


def logged_tokens(run: Path) -> float:
    """The generated tokens of the last complete line of a run's metrics.jsonl that has them (0 if
    none): read while the run writes, so a partial last line is skipped, not an error."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return 0.0
    for line in reversed(path.read_text().split("\n")[:-1]):  # [:-1]: the text after the last newline
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "rollout/generated_tokens" in record:
            return float(record["rollout/generated_tokens"])
    return 0.0


def archived_whole(dest: Path, start_sha: str | None, budget: float) -> bool:
    """`dest` holds a run archived from this start that reached the budget: never trained again."""
    return archived_from(dest, start_sha) and logged_tokens(dest) >= budget


def reuse(arm: str, seed: int, args) -> Path | None:
    """The sampler study's run that serves as this (arm, seed) unchanged: same start, past the budget."""
    if arm not in REUSED:
        return None
    source = Path(args.study) / f"{REUSED[arm]}-seed{seed}"
    return source if archived_whole(source, args.start_sha, args.budget) else None


def copy_reused(source: Path, dest: Path) -> Path:
    """Copies a reused run's record (metrics, config, start) to `dest` with source.json naming where it came from."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "config.json", "start.json"):
        shutil.copy2(source / name, dest / name)
    origin = source.resolve().relative_to(ROOT) if source.resolve().is_relative_to(ROOT) else source
    (dest / "source.json").write_text(json.dumps({"copied_from": str(origin)}, indent=1) + "\n")
    return dest


def plan(args) -> tuple[list[tuple[str, int, Path]], list[tuple[str, int]]]:
    """(copies, runs): the reused runs to copy into the archive as (arm, seed, source), and the
    (arm, seed) runs to train, seed by seed in SEED_ORDER, every arm of a seed before the next seed.
    Runs archived whole from this start are in neither."""
    copies, runs = [], []
    for seed in [s for s in SEED_ORDER if s in args.seeds]:
        for arm in args.arms:
            if archived_whole(Path(args.archive) / f"{arm}-seed{seed}", args.start_sha, args.budget):
                continue
            source = reuse(arm, seed, args)
            if source is not None:
                copies.append((arm, seed, source))
            else:
                runs.append((arm, seed))
    return copies, runs


def latest_checkpoint(run: Path) -> Path | None:
    """The run's step-N checkpoint with the largest N (None if none): where --resume continues."""
    steps = [p for p in run.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return max(steps, key=lambda p: int(p.name[5:])) if steps else None


class Driver:
    """Runs the planned jobs `parallel` at a time, each stopped by SIGTERM once it reaches the budget
    and archived as it finishes; a signal to the driver is passed on to the running jobs."""

    def __init__(self, args) -> None:
        self.args, self.running, self.failed, self.stopping = args, [], [], False

    def stop(self, signum: int, frame) -> None:
        """Handler of SIGTERM / SIGINT: pass the signal on (each run saves and exits), launch nothing more."""
        self.stopping = True
        for job in self.running:
            job["proc"].send_signal(signal.SIGTERM)

    def launch(self, arm: str, seed: int) -> None:
        out = Path(self.args.out) / f"{arm}-seed{seed}"
        if logged_tokens(out) >= self.args.budget and (out / "config.json").exists():  # stopped but not archived
            self.done(arm, seed, out, 0.0)
            return
        resume = latest_checkpoint(out) is not None
        if not resume:  # nothing to continue: a fresh start
            shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with (out / "log.txt").open("a") as log:
            proc = subprocess.Popen(command(arm, seed, out, self.args, resume), cwd=self.args.code, stdout=log,
                                    stderr=subprocess.STDOUT, env=env)  # fmt: skip
        print(f"[sampler budget] {arm} seed {seed}: {'resumed' if resume else 'started'}, pid {proc.pid}", flush=True)
        self.running.append({"arm": arm, "seed": seed, "out": out, "proc": proc, "start": time.time(), "sent": False})

    def done(self, arm: str, seed: int, out: Path, seconds: float) -> None:
        dest = archive_run(out, Path(self.args.archive) / out.name)
        commit = Path(self.args.code, "COMMIT")  # the code snapshot's commit, where --code is one
        if commit.is_file():
            (dest / "code.json").write_text(json.dumps({"commit": commit.read_text().strip()}) + "\n")
        print(f"[sampler budget] {arm} seed {seed}: {logged_tokens(out) / 1e3:.0f}k tokens, "
              f"{seconds / 60:.1f} min wall this launch, archived to {dest}", flush=True)  # fmt: skip

    def poll(self) -> None:
        for job in list(self.running):
            tokens = logged_tokens(job["out"])
            if tokens >= self.args.budget and not job["sent"]:
                job["proc"].send_signal(signal.SIGTERM)
                job["sent"] = True
            code = job["proc"].poll()
            if code is None:
                continue
            self.running.remove(job)
            label = f"{job['arm']} seed {job['seed']}"
            if code == 0 and logged_tokens(job["out"]) >= self.args.budget:
                self.done(job["arm"], job["seed"], job["out"], time.time() - job["start"])
            elif not self.stopping:
                self.failed.append(label)
                print(f"[sampler budget] {label} failed (exit {code}): see {job['out'] / 'log.txt'}", flush=True)

    def run(self, jobs: list[tuple[str, int]]) -> None:
        pending = list(jobs)
        while (pending and not self.stopping) or self.running:
            while pending and not self.stopping and len(self.running) < self.args.parallel:
                self.launch(*pending.pop(0))
            time.sleep(self.args.poll_s)
            self.poll()


def train(args) -> None:
    """Copies the reused runs, then trains every planned run (Driver); one line per failure at the end."""
    copies, runs = plan(args)
    for arm, seed, source in copies:
        copy_reused(source, Path(args.archive) / f"{arm}-seed{seed}")
    print(f"[sampler budget] copied {len(copies)} reused runs; {len(runs)} to train: "
          + ", ".join(f"{a}-seed{s}" for a, s in runs), flush=True)  # fmt: skip
    driver = Driver(args)
    signal.signal(signal.SIGTERM, driver.stop)
    signal.signal(signal.SIGINT, driver.stop)
    driver.run(runs)
    if driver.failed:
        raise SystemExit("error: failed runs (run the command again to retry): " + ", ".join(driver.failed))


# ---------------------------------------------------------------------------------------------
# Aggregation (the archive alone)
# ---------------------------------------------------------------------------------------------


def censor(c: dict[str, np.ndarray], budget: float) -> dict[str, np.ndarray]:
    """curves() of a run cut at the budget: validations at tokens <= budget, steps logged at or before
    the last step within it; adds `steps_within` and `scoring_tokens` (generated minus training
    rollouts, by that step) and `tokens_within` (generated tokens by that step)."""
    keep = c["val_tokens"] <= budget
    out = {k: c[k][keep] for k in ("val_steps", "val", "val_tokens")}
    within = np.nonzero(c["step_tokens"] <= budget)[0]
    n = int(within[-1]) + 1 if len(within) else 0
    for name in ("vas/zero_var_frac", "rollout/sampled_tokens"):
        out[name] = c[name][:n]
    out["steps_within"] = float(n)
    out["tokens_within"] = float(c["step_tokens"][n - 1]) if n else 0.0
    out["scoring_tokens"] = out["tokens_within"] - float(out["rollout/sampled_tokens"].sum())
    return out


def budget_curves(lines: list[dict], budget: float) -> dict[str, np.ndarray]:
    """censor(curves(lines)) with the per-step generated tokens the cut needs."""
    c = curves(lines)
    c["step_tokens"] = np.array([r["rollout/generated_tokens"] for r in lines if "train/loss" in r], dtype=float)
    return censor(c, budget)


def time_to_target(c: dict[str, np.ndarray], target: float, budget: float) -> tuple[float, bool]:
    """(tokens, reached): the generated tokens at the first validation at or above target within the
    budget, or (budget, False): not reached within the budget, censored there."""
    hit = np.nonzero((c["val"] >= target) & (c["val_tokens"] <= budget))[0]
    return (float(c["val_tokens"][hit[0]]), True) if len(hit) else (float(budget), False)


def kaplan_meier_median(times: np.ndarray, reached: np.ndarray) -> float:
    """The Kaplan-Meier median of time to the event: the smallest event time at which the estimated
    share not yet reached falls to 0.5 or below; inf if it never does (fewer than half reach it by
    the last time observed). S(t) is the product over event times t_i <= t of (1 - d_i / n_i), d_i
    the events at t_i and n_i the runs still at risk (time >= t_i)."""
    times, reached = np.asarray(times, dtype=float), np.asarray(reached, dtype=bool)
    survival = Fraction(1)  # exact: in floats 0.8 x 7/8 x 6/7 x 5/6 lands above 0.5
    for t in np.unique(times[reached]):
        at_risk = int((times >= t).sum())
        survival *= 1 - Fraction(int((reached & (times == t)).sum()), at_risk)
        if survival <= Fraction(1, 2):
            return float(t)
    return float("inf")


def mean_accuracy(c: dict[str, np.ndarray], budget: float) -> float:
    """The area under the run's accuracy-vs-tokens step function over [0, budget], divided by the
    budget: each validation's accuracy holds from its tokens until the next validation's (the last
    one's until the budget)."""
    t = np.append(c["val_tokens"], budget)
    return float((c["val"] * np.diff(t)).sum() / budget)


def first_reach(arm: tuple[float, bool], base: tuple[float, bool]) -> int:
    """+1 if `arm` reached the target first (it reached and base did not, or both with fewer tokens),
    -1 for the mirror case, 0 for a tie (neither reached, or the same tokens)."""
    (ta, ra), (tb, rb) = arm, base
    if ra != rb:
        return 1 if ra else -1
    return 0 if not ra or ta == tb else (1 if ta < tb else -1)


def load_archive(args) -> tuple[dict[str, dict[int, dict]], list[str]]:
    """The archived runs that enter the tables, {arm: {seed: budget_curves}}, over the seeds whose every
    arm is archived whole from this start; and one line per run left out (missing, another start,
    short of the budget) or per seed left out for it."""
    runs, excluded = {arm: {} for arm in args.arms}, []
    for seed in args.seeds:
        for arm in args.arms:
            run = Path(args.archive) / f"{arm}-seed{seed}"
            if not (run / "metrics.jsonl").is_file():
                excluded.append(f"{run.name}: not archived")
            elif not archived_from(run, args.start_sha):
                excluded.append(f"{run.name}: archived from another start than {args.start_sha[:8]}")
            elif (tokens := logged_tokens(run)) < args.budget:
                excluded.append(f"{run.name}: cut at {tokens / 1e3:.0f}k tokens, short of the budget")
            else:
                runs[arm][seed] = budget_curves(read(run), args.budget)
    complete = [s for s in args.seeds if all(s in runs[a] for a in args.arms)]
    for seed in args.seeds:
        partial = [a for a in args.arms if seed in runs[a]]
        if seed not in complete and partial:
            excluded.append(f"seed {seed} left out: its {', '.join(partial)} archived, not every arm")
    return {a: {s: runs[a][s] for s in complete} for a in args.arms}, excluded


def per_run(c: dict[str, np.ndarray], target: float, budget: float) -> dict[str, float]:
    """Every per-run number of the tables."""
    t, hit = time_to_target(c, target, budget)
    return {"time": t, "reached": float(hit), "mean_acc": mean_accuracy(c, budget), "acc_at_budget": float(c["val"][-1]),
            "steps": c["steps_within"], "scoring_share": c["scoring_tokens"] / c["tokens_within"],
            "zero_var": float(c["vas/zero_var_frac"].mean())}  # fmt: skip


def fmt(mean_hw: tuple[float, float], digits: int = 3, scale: float = 1.0) -> str:
    mean, hw = mean_hw
    return f"{mean / scale:.{digits}f} ± {hw / scale:.{digits}f}"


def summarise(args) -> tuple[str, dict]:
    """results.md (markdown) and results.json's numbers, from the archive alone."""
    runs, excluded = load_archive(args)
    seeds = sorted(next(iter(runs.values())))
    head = (f"Equal-budget sampler study (PROTOCOL.md): budget {args.budget / 1e6:.2f}M generated tokens, target "
            f"{args.target}; **{len(seeds)} of {len(args.seeds)} seeds complete** ({', '.join(map(str, seeds)) or 'none'}).")  # fmt: skip
    out = [head]
    if len(seeds) < len(args.seeds):
        out.append("\n**Partial: no conclusion is drawn from these tables until every seed is complete.**")
    out.append("\nLeft out:" + "".join(f"\n- {line}" for line in excluded) if excluded else "\nLeft out: nothing.")
    summary = {"budget": args.budget, "target": args.target, "seeds": seeds, "excluded": excluded, "arms": {}}
    if not seeds:
        return "\n".join(out), summary
    vals = {a: {k: np.array([per_run(runs[a][s], args.target, args.budget)[k] for s in seeds])
                for k in ("time", "reached", "mean_acc", "acc_at_budget", "steps", "scoring_share", "zero_var")}
            for a in args.arms}  # fmt: skip
    out.append(f"\nPer arm, over seeds {', '.join(map(str, seeds))} (mean ± 95% t half-width; tokens in thousands; "
               "time to target censored at the budget):\n")  # fmt: skip
    out.append("| arm | reached target | KM median tokens to target (k) | restricted mean tokens to target (k) | "
               "mean acc over the budget (AUC) | acc at the budget | steps within the budget | scoring share of tokens | "
               "zero-var share trained |\n" + "| --- " * 9 + "|")  # fmt: skip
    for arm, v in vals.items():
        median = kaplan_meier_median(v["time"], v["reached"].astype(bool))
        e = {k: interval(x) for k, x in v.items()}
        summary["arms"][arm] = e | {
            "km_median": None if math.isinf(median) else median,
            "reached": int(v["reached"].sum()),
        }
        med = f"> {args.budget / 1e3:.0f}" if math.isinf(median) else f"{median / 1e3:.0f}"
        out.append(f"| {arm} | {int(v['reached'].sum())}/{len(seeds)} | {med} | {fmt(e['time'], 0, 1e3)} | "
                   f"{fmt(e['mean_acc'])} | {fmt(e['acc_at_budget'])} | {fmt(e['steps'], 0)} | "
                   f"{fmt(e['scoring_share'], 2)} | {fmt(e['zero_var'])} |")  # fmt: skip
    out.append("\nPer seed, thousands of tokens to the target (`-`: not reached within the budget):\n")
    out.append("| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |\n" + "| --- " * (len(seeds) + 1) + "|")
    for arm, v in vals.items():
        cells = [f"{t / 1e3:.0f}" if hit else "-" for t, hit in zip(v["time"], v["reached"])]
        out.append(f"| {arm} | " + " | ".join(cells) + " |")
    pairs = [(a, "uniform") for a in args.arms if a != "uniform" and "uniform" in args.arms]
    pairs += [(a, b) for a, b in SECONDARY if a in args.arms and b in args.arms]
    out.append(
        "\nPaired by seed (the first arm minus the second; first reach: wins / ties / losses of the first arm):\n"
    )
    out.append("| comparison | seeds | restricted mean tokens to target (k) | first reach W / T / L | "
               "mean acc over the budget (AUC) | acc at the budget |\n" + "| --- " * 6 + "|")  # fmt: skip
    summary["pairs"] = {}
    for a, b in pairs:
        va, vb = vals[a], vals[b]
        wins = [first_reach((ta, bool(ra)), (tb, bool(rb)))
                for ta, ra, tb, rb in zip(va["time"], va["reached"], vb["time"], vb["reached"])]  # fmt: skip
        d = {k: interval(va[k] - vb[k]) for k in ("time", "mean_acc", "acc_at_budget")}
        wtl = (wins.count(1), wins.count(0), wins.count(-1))
        summary["pairs"][f"{a} - {b}"] = d | {"first_reach_wtl": wtl}
        out.append(f"| {a} - {b} | {len(seeds)} | {fmt(d['time'], 0, 1e3)} | {wtl[0]} / {wtl[1]} / {wtl[2]} | "
                   f"{fmt(d['mean_acc'])} | {fmt(d['acc_at_budget'])} |")  # fmt: skip
    return "\n".join(out), summary


def plot(args, runs: dict[str, dict[int, dict]]) -> Path | None:
    """Greedy val accuracy against generated tokens, 0 to the budget, every arm: mean over the complete
    seeds, min-max band. None when no seed is complete."""
    if not next(iter(runs.values())):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.linspace(0, args.budget, 301)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, by_seed in runs.items():
        ys = np.stack([accuracy_at(c, x) for c in by_seed.values()])
        (line,) = ax.plot(x / 1e6, ys.mean(0), label=arm, linestyle="--" if arm.endswith("t12") else "-")
        ax.fill_between(x / 1e6, ys.min(0), ys.max(0), alpha=0.10, color=line.get_color())
    ax.axhline(args.target, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("generated tokens (millions, VAS scoring and refills included)")
    ax.set_ylabel("greedy val accuracy")
    ax.set_title(f"equal budget, {len(next(iter(runs.values())))} of {len(args.seeds)} seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(args.archive) / "tokens.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    spread = ROOT / "data" / "toy-spread" / "rl"
    parser.add_argument("--budget", type=float, default=1.5e6, help="generated tokens per run (protocol: 1.5M)")
    parser.add_argument("--target", type=float, default=0.79, help="greedy val accuracy to reach (protocol: 0.79)")
    parser.add_argument("--sft-model", default=str(STUDY / "start-B"), help="the shared start (protocol: start B)")
    parser.add_argument("--data", default=f"{spread}@train", help="RL rows of the pool")
    parser.add_argument("--val-data", default=f"{spread}@val", help="validation rows")
    parser.add_argument("--out", default=str(ROOT / "runs" / "sampler-budget"), help="runs and their checkpoints")
    parser.add_argument("--archive", default=str(ROOT / "bench" / "results" / "sampler-budget"),
                        help="finished runs' records, results.md, results.json, tokens.png")  # fmt: skip
    parser.add_argument("--code", default=str(ROOT),
                        help="the folder whose grpo.py the runs use: a fixed snapshot of the repository (its "
                        "commit in a file COMMIT there), so that edits to the checkout during the study do not "
                        "reach the runs launched after them")  # fmt: skip
    parser.add_argument("--study", default=str(STUDY), help="the sampler study's archive (runs reused from it)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=list(range(10)),
                        help="comma-separated seeds (default 0-9)")  # fmt: skip
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--poll-s", type=float, default=5.0, help="seconds between reads of the runs' metrics")
    parser.add_argument("--skip-train", action="store_true", help="only aggregate the archive")
    args = parser.parse_args()
    args.arms = [a for a in args.arms.split(",") if a]
    if set(args.arms) - set(ARMS) or not args.arms:
        raise SystemExit(f"error: --arms must name some of {list(ARMS)}, got {args.arms}")
    if not 0 < args.budget < math.inf or not args.seeds or args.parallel < 1:
        raise SystemExit("error: --budget must be a positive number of tokens, --seeds non-empty, --parallel >= 1")
    if not Path(args.sft_model, "config.json").is_file():
        raise SystemExit(f"error: no start checkpoint at {args.sft_model} (the protocol's is {STUDY / 'start-B'})")
    args.start_sha = start_fingerprint(Path(args.sft_model))
    Path(args.archive).mkdir(parents=True, exist_ok=True)
    if not args.skip_train:
        train(args)
    table, summary = summarise(args)
    Path(args.archive, "results.md").write_text(table + "\n")
    Path(args.archive, "results.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    print(table)
    print("plot:", plot(args, load_archive(args)[0]))


if __name__ == "__main__":
    main()
