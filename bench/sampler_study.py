"""The sampler study (issue 31): VAS against DAPO's dynamic sampling and both together, per generated
token, on the `spread` toy (the regime VAS is built for: docs/vas-study.md "The `spread` bench").

    python -m data.toy --variant spread
    OMP_NUM_THREADS=1 python bench/sampler_study.py --target 0.79        # 6 arms x 10 seeds, 2 runs at a time
    python bench/sampler_study.py --target 0.79 --skip-train             # re-aggregate finished runs
    python bench/sampler_study.py --target 0.79 --skip-train --out bench/results/sampler-study   # the committed runs

The start is the committed SFT checkpoint bench/results/sampler-study/start-B (made by
`OMP_NUM_THREADS=1 python sft.py --toy spread --max-steps 600 --output-dir runs/toy-spread-sft600`;
pass --sft-model to start elsewhere). Runs archived from the same start (start.json) are not trained
again, so a later session, on another machine, goes on where the last one stopped.

The protocol is docs/vas-study.md "The sampler study: protocol (written before the runs)"; in short:
- start: one SFT checkpoint (seed 0) for every arm of a seed; pool: the first --train-limit train
  prompts; greedy validation on --val-limit val prompts every --val-every steps.
- arms, everything else identical (the grpo.py toy defaults: 16 prompts x 8 responses, T 0.6, lr 1e-4):
    uniform         shuffled walk over the pool
    vas             VAS: lambda 0.5, alpha / beta 0.8 / 0.2, N = --vas-rollouts, full re-scoring before
                    step 1 and every --vas-update-every steps (T_update 56 of the paper's ~290 steps,
                    scaled to the run length)
    vas-online      VAS scored once before step 1, then refreshed from the training rollouts only
    dynamic         uniform + --dynamic-sampling (--max-sampling-rounds)
    vas+dynamic     vas + --dynamic-sampling
    uniform-budget  uniform continued (same seed: its first --steps steps ARE uniform's) until it has
                    generated as many tokens as the most expensive arm of its seed
- primary metric: generated tokens (training rollouts + refills + VAS scoring; validation excluded)
  until greedy validation first reaches --target; a run that never does counts as not reached.
- secondary: mean validation accuracy over the first T tokens (T = the fewest tokens any run of any
  arm generated: equal budgets), final accuracy, zero-variance share before (sampled) and after
  (trained) the filter, prompts with signal per step, gradient norm, clip fraction, sampling rounds.
- every number: mean over seeds ± the half-width of the 95% t-interval; differences from `uniform`
  paired by seed.
Writes <out>/{results.md,results.json,steps.png,tokens.png,accounting.png} and one folder per run,
and copies every finished run's metrics.jsonl and config.json (not its checkpoint) to --archive, with
start.json (the SFT start's path and weights' sha256): the committed record (bench/results/sampler-study), which --skip-train --out can aggregate on its own.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from vas_experiment import archive_run, archived_from, interval, run_jobs, start_fingerprint  # noqa: E402

ARMS = {  # name -> grpo.py flags on top of the shared ones
    "uniform": [],
    "vas": ["--vas"],
    "vas-online": ["--vas", "--vas-online", "--vas-update-every", "0"],
    "dynamic": ["--dynamic-sampling"],
    "vas+dynamic": ["--vas", "--dynamic-sampling"],
    "uniform-budget": [],  # uniform, continued: budget_steps()
}
BATCH, GROUP = 16, 8  # prompts per step, responses per prompt (grpo.py's toy defaults)


def command(arm: str, seed: int, steps: int, out: Path, args, resume: bool = False) -> list[str]:
    """The grpo.py command line of one run."""
    return [sys.executable, str(ROOT / "grpo.py"), "--model", args.sft_model, "--data", args.data,
            "--val-data", args.val_data, "--val-temperature", str(args.val_temperature), "--output-dir", str(out),
            "--seed", str(seed), "--max-steps", str(steps), "--train-limit", str(args.train_limit),
            "--val-every", str(args.val_every), "--val-limit", str(args.val_limit),
            "--vas-rollouts", str(args.vas_rollouts), "--vas-update-every", str(args.vas_update_every),
            "--vas-mix-ratio", "0.5", "--max-sampling-rounds", str(args.max_sampling_rounds),
            "--save-every", "0", "--reward-workers", "1", "--engine", args.engine, *ARMS[arm],
            *(["--resume"] if resume else [])]  # fmt: skip


def read(run: Path) -> list[dict]:
    """The metrics.jsonl records of a run, one dict per non-empty line; stops with one `error:` line
    naming the file and line where a line is not a JSON object (a write cut mid-line)."""
    path = run / "metrics.jsonl"
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise SystemExit(
                f"error: {path}:{number}: not a metrics record (a JSON object with a step); cut mid-write?"
            )
        records.append(record)
    return records


def check_complete(run: Path, seed: int) -> None:
    """Stops with one `error:` line unless `run` holds a whole run: its metrics.jsonl and config.json
    exist and it logged every step its config.json planned. A folder missing, or a metrics file cut at
    a line boundary (which parses, but ends early), would otherwise change the tables without a word."""
    hint = f"train it, or leave seed {seed} out with --seeds"
    for name in ("metrics.jsonl", "config.json"):
        if not (run / name).is_file():
            raise SystemExit(f"error: {run}: no {name}, the run is missing or never started ({hint})")
    planned, logged = planned_steps(run), last_step(run)
    if logged < planned:
        raise SystemExit(f"error: {run / 'metrics.jsonl'}: cut: its last step is {logged} of the {planned} "
                         f"its config.json plans ({hint})")  # fmt: skip


def last_step(run: Path) -> int:
    """The last step a run logged (0 if it has not started)."""
    lines = read(run) if (run / "metrics.jsonl").exists() else []
    return lines[-1]["step"] if lines else 0


def budget_steps(args, seed: int) -> int:
    """Steps of uniform-budget for `seed`: uniform continued until its generated tokens reach those of
    the most expensive other arm of the seed, at uniform's own mean tokens per step."""
    finals = {arm: read(record(args, arm, seed))[-1]["rollout/generated_tokens"] for arm in ARMS
              if arm != "uniform-budget"}  # every fixed arm, whatever --arms runs now  # fmt: skip
    per_step = finals["uniform"] / args.steps
    return max(args.steps, math.ceil(max(finals.values()) / per_step))


def run_dir(args, arm: str, seed: int) -> Path:
    return Path(args.out) / f"{arm}-seed{seed}"


def archived(args, arm: str, seed: int) -> bool:
    """The run is in --archive, made from this study's start (its start.json's sha256 = args.start_sha,
    the --sft-model's): a later session need not train it again."""
    return archived_from(Path(args.archive) / f"{arm}-seed{seed}", args.start_sha)


def record(args, arm: str, seed: int) -> Path:
    """Where the run's metrics are: its folder under --out once finished there, else its archive."""
    run = run_dir(args, arm, seed)
    return run if finished(run) else Path(args.archive) / run.name


def planned_steps(run: Path) -> int:
    """The --max-steps a run was launched with (its config.json; 0 if it has none)."""
    return json.loads((run / "config.json").read_text())["max_steps"] if (run / "config.json").exists() else 0


def finished(run: Path) -> bool:
    """A run that logged every step it was launched for and saved its final checkpoint (a preempted
    uniform-budget run has uniform's `final` copied in, but fewer steps than planned)."""
    return (run / "final").exists() and 0 < planned_steps(run) <= last_step(run)


def archive(args) -> list[Path]:
    """archive_run() of every finished run under --out into --archive/<run>/; returns the folders written."""
    return [archive_run(run, Path(args.archive) / run.name) for run in sorted(Path(args.out).glob("*-seed*"))
            if finished(run)]  # fmt: skip


def to_train(args) -> list[tuple[str, int]]:
    """The (arm, seed) fixed-length runs train_all trains, seed-major: those neither finished under --out
    nor archived from this start; and uniform again where its seed's uniform-budget is still to run
    but uniform's final checkpoint, which that run continues, is not under --out (an archive keeps no
    checkpoint): the re-run then replaces the archived uniform, so both come from one run."""
    fixed = [a for a in args.arms if a != "uniform-budget"]
    todo = []
    for s in args.seeds:
        budget_left = "uniform-budget" in args.arms and not (
            finished(run_dir(args, "uniform-budget", s)) or archived(args, "uniform-budget", s)
        )
        for arm in fixed:
            run = run_dir(args, arm, s)
            if finished(run):
                continue
            if not archived(args, arm, s) or (arm == "uniform" and budget_left):
                todo.append((arm, s))
    return todo


def train_all(args) -> None:
    """Every run not finished or archived yet: the fixed-length arms of to_train() (a partial study covers every arm),
    then uniform-budget, which continues uniform's final checkpoint (a copy, --resume) once the other
    arms of its seed have finished; a preempted uniform-budget run resumes from its latest checkpoint."""
    jobs = [(f"{arm} seed {s}", command(arm, s, args.steps, run_dir(args, arm, s), args), run_dir(args, arm, s))
            for arm, s in to_train(args)]  # fmt: skip
    for _, _, out in jobs:  # an unfinished run starts over
        shutil.rmtree(out, ignore_errors=True)
    run_jobs(jobs, args.parallel, "sampler study")
    if "uniform-budget" not in args.arms:
        return
    jobs = []
    for s in args.seeds:
        out = run_dir(args, "uniform-budget", s)
        if finished(out) or archived(args, "uniform-budget", s):
            continue
        steps = budget_steps(args, s)
        if planned_steps(out) != steps:  # not a preempted run of this budget (that one resumes where it was)
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(run_dir(args, "uniform", s), out)  # uniform's run: the first --steps steps, exactly
        jobs.append((f"uniform-budget seed {s} ({steps} steps)", command("uniform", s, steps, out, args, True), out))
    run_jobs(jobs, args.parallel, "sampler study")


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def curves(lines: list[dict]) -> dict[str, np.ndarray]:
    """Per run: val steps, val accuracies, the generated tokens by each val step (0 at step 0), and the
    per-step series the table reads."""
    tokens = {r["step"]: r["rollout/generated_tokens"] for r in lines if "rollout/generated_tokens" in r}
    tokens[0] = 0.0
    val = [(r["step"], r["val/accuracy"]) for r in lines if "val/accuracy" in r]
    steps = [r for r in lines if "train/loss" in r]
    out = {"val_steps": np.array([s for s, _ in val]), "val": np.array([v for _, v in val]),
           "val_tokens": np.array([tokens[s] for s, _ in val])}  # fmt: skip
    for name in ("vas/zero_var_frac", "rollout/zero_var_frac_sampled", "train/grad_norm", "train/clip_frac",
                 "rollout/sampling_rounds", "rollout/sampled_tokens", "rollout/response_len"):  # fmt: skip
        out[name] = np.array([r.get(name, np.nan) for r in steps], dtype=float)
    out["tokens"] = float(lines[-1]["rollout/generated_tokens"])
    return out


@functools.cache
def run_curves(run: Path) -> dict[str, np.ndarray]:
    """curves() of a finished run, read once per aggregation (tables and plots share them)."""
    return curves(read(run))


def first_reach(c: dict[str, np.ndarray], target: float, column: str) -> float:
    """`column` (val_tokens or val_steps) at the first validation at or above target (nan: never reached)."""
    hit = np.nonzero(c["val"] >= target)[0]
    return float(c[column][hit[0]]) if len(hit) else float("nan")


def tokens_to_target(c: dict[str, np.ndarray], target: float) -> float:
    """Generated tokens by the first validation at or above target (nan: never reached)."""
    return first_reach(c, target, "val_tokens")


def steps_to_target(c: dict[str, np.ndarray], target: float) -> float:
    """The first validation step at or above target (nan: never reached)."""
    return first_reach(c, target, "val_steps")


def accuracy_at(c: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """The run's validation accuracy at each token count: that of its latest validation at or before it."""
    idx = np.searchsorted(c["val_tokens"], tokens, side="right") - 1
    return c["val"][np.clip(idx, 0, None)]


def accounting(c: dict[str, np.ndarray], steps: int) -> dict[str, float]:
    """Where a run's generated tokens went, over its first `steps` steps plus its VAS scoring: the
    trained batch (split by the share of its groups without signal: an estimate by group share),
    the groups dynamic sampling dropped, and VAS scoring (total - training rollouts)."""
    sampled = c["rollout/sampled_tokens"][:steps]
    batch = c["rollout/response_len"][:steps] * BATCH * GROUP
    dead = (c["vas/zero_var_frac"][:steps] * batch).sum()
    training = sampled.sum()
    return {"total": c["tokens"] if steps >= len(sampled) else float("nan"), "scoring": c["tokens"] - training,
            "dropped": training - batch.sum(), "trained": batch.sum(), "dead": dead, "signal": batch.sum() - dead}  # fmt: skip


def against_budget(c: dict[str, np.ndarray], ub: dict[str, np.ndarray], target: float) -> dict[str, float]:
    """One arm's run against uniform-budget's run of the same seed (uniform continued, so uniform with
    a longer horizon): the difference in tokens and in steps to the target (nan unless both reached it) and in
    accuracy at the arm's own generated tokens (its final validation against uniform-budget's latest
    validation by then: equal generated tokens); and `first`, censoring-aware: with both runs cut at the
    arm's own generated tokens, +1 if the arm reached the target first (or alone), -1 if uniform did,
    0 if neither reached it (or both at the same tokens)."""
    at = accuracy_at(ub, np.array([c["tokens"]]))[0]
    mine, theirs = tokens_to_target(c, target), tokens_to_target(ub, target)
    theirs = theirs if theirs <= c["tokens"] else float("nan")  # nan compares False: not reached by then
    first = 0 if np.isnan(mine) and np.isnan(theirs) else 1 if np.isnan(theirs) or mine < theirs else -1
    first = 0 if mine == theirs else first
    return {"first": first, "tokens_to_target": tokens_to_target(c, target) - tokens_to_target(ub, target),
            "steps_to_target": steps_to_target(c, target) - steps_to_target(ub, target),
            "val_at_its_tokens": float(c["val"][-1] - at), "uniform_val_at_its_tokens": float(at)}  # fmt: skip


def per_seed(args, arm: str, budget: float) -> dict[str, np.ndarray]:
    """One value per seed (args.seeds order) of every reported number of one arm."""
    runs = [run_curves(run_dir(args, arm, s)) for s in args.seeds]
    grid = np.linspace(0, budget, 201)
    steps = args.steps if arm != "uniform-budget" else 10**9
    books = [accounting(c, steps) for c in runs]
    return {
        "tokens_to_target": np.array([tokens_to_target(c, args.target) for c in runs]),
        "steps_to_target": np.array([steps_to_target(c, args.target) for c in runs]),
        "val_at_equal_tokens": np.array([accuracy_at(c, grid).mean() for c in runs]),
        "final_val": np.array([c["val"][-1] for c in runs]),
        "zero_var_sampled": np.array([np.nanmean(c["rollout/zero_var_frac_sampled"]) for c in runs]),
        "zero_var_trained": np.array([c["vas/zero_var_frac"].mean() for c in runs]),
        "signal_prompts": np.array([BATCH * (1 - c["vas/zero_var_frac"]).mean() for c in runs]),
        "grad_norm": np.array([c["train/grad_norm"].mean() for c in runs]),
        "clip_frac": np.array([c["train/clip_frac"].mean() for c in runs]),
        "rounds": np.array([np.nanmean(c["rollout/sampling_rounds"]) for c in runs]),
        "tokens": np.array([c["tokens"] for c in runs]),
        "at_cap": np.array(
            [
                (c["rollout/sampling_rounds"][:steps] >= args.max_sampling_rounds).sum()
                if "--dynamic-sampling" in ARMS[arm]
                else np.nan
                for c in runs
            ]
        ),  # fmt: skip
        "steps": np.array([c["val_steps"][-1] for c in runs], dtype=float),
        **{f"acct_{k}": np.array([b[k] for b in books]) for k in books[0]},
    }


def fmt(mean_hw: tuple[float, float], digits: int = 3, scale: float = 1.0) -> str:
    mean, hw = mean_hw
    return f"{mean / scale:.{digits}f} ± {hw / scale:.{digits}f}"


def reached(values: np.ndarray) -> np.ndarray:
    """The seeds' values that are not nan (the runs that reached the target)."""
    return values[~np.isnan(values)]


def fmt_reached(values: np.ndarray, digits: int, scale: float = 1.0) -> str:
    """fmt() over the runs that reached the target, "-" if none did."""
    kept = reached(values)
    return fmt(interval(kept), digits, scale) if len(kept) else "-"


def per_seed_table(args, values: dict[str, dict[str, np.ndarray]]) -> str:
    """Markdown: one row per arm, one column per seed, "steps / k tokens" to the target or "-"."""
    rows = ["| arm | " + " | ".join(f"seed {s}" for s in args.seeds) + " |\n" + "| --- " * (len(args.seeds) + 1) + "|"]
    for arm, v in values.items():
        cells = [
            "-" if np.isnan(t) else f"{n:.0f} / {t / 1e3:.0f}"
            for n, t in zip(v["steps_to_target"], v["tokens_to_target"])
        ]
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def summarise(args) -> tuple[str, dict]:
    """The results tables (markdown) and the numbers behind them. Every run must be whole (check_complete)."""
    for a in args.arms:
        for s in args.seeds:
            check_complete(run_dir(args, a, s), s)
    everything = [run_curves(run_dir(args, a, s)) for a in args.arms for s in args.seeds]
    budget = min(c["tokens"] for c in everything)
    values = {arm: per_seed(args, arm, budget) for arm in args.arms}
    out, summary = [], {"budget_tokens": budget, "target": args.target, "arms": {}}
    out.append(f"Target greedy val accuracy {args.target}; equal-token budget {budget / 1e3:.0f}k tokens "
               f"(the fewest of any run); {len(args.seeds)} seeds; mean ± 95% t half-width.\n")  # fmt: skip
    out.append("| arm | steps | reached target | steps to target | tokens to target (k) | val acc at equal tokens | final val acc | "
               "zero-var sampled | zero-var trained | prompts w/ signal / step | grad norm | clip frac | rounds | "
               "generated tokens (k) |\n" + "| --- " * 14 + "|")  # fmt: skip
    for arm, v in values.items():
        hits = reached(v["tokens_to_target"])
        e = {k: interval(x) for k, x in v.items() if k not in ("tokens_to_target", "steps_to_target")}
        ttt, stt = fmt_reached(v["tokens_to_target"], 1, 1e3), fmt_reached(v["steps_to_target"], 1)
        summary["arms"][arm] = e | {"tokens_to_target": interval(hits) if len(hits) else None,
                                    "reached": int(len(hits))}  # fmt: skip
        out.append(f"| {arm} | {e['steps'][0]:.0f} | {len(hits)}/{len(args.seeds)} | {stt} | {ttt} | "
                   f"{fmt(e['val_at_equal_tokens'])} | {fmt(e['final_val'])} | {fmt(e['zero_var_sampled'])} | "
                   f"{fmt(e['zero_var_trained'])} | {fmt(e['signal_prompts'], 1)} | {fmt(e['grad_norm'])} | "
                   f"{fmt(e['clip_frac'], 4)} | {fmt(e['rounds'], 2)} | {fmt(e['tokens'], 0, 1e3)} |")  # fmt: skip
    out.append("\nPer seed, steps / thousands of tokens to the target (`-`: not reached within the run):\n")
    out.append(per_seed_table(args, values))
    if "uniform" in values:
        out.append("\nPaired by seed, minus `uniform` (tokens to target: seeds where both reached it):\n")
        out.append("| arm | tokens to target (k) | val acc at equal tokens | final val acc | zero-var trained |\n"
                   + "| --- " * 5 + "|")  # fmt: skip
        base = values["uniform"]
        for arm in [a for a in args.arms if a not in ("uniform", "uniform-budget")]:  # (its first steps ARE uniform's)
            v = values[arm]
            both = ~np.isnan(v["tokens_to_target"]) & ~np.isnan(base["tokens_to_target"])
            d = {k: interval(v[k] - base[k]) for k in ("val_at_equal_tokens", "final_val", "zero_var_trained")}
            ttt = interval(v["tokens_to_target"][both] - base["tokens_to_target"][both]) if both.sum() else None
            summary["arms"][arm]["minus_uniform"] = d | {"tokens_to_target": ttt, "pairs": int(both.sum())}
            cell = f"{fmt(ttt, 1, 1e3)} (n={both.sum()})" if ttt else "-"
            out.append(f"| {arm} | {cell} | {fmt(d['val_at_equal_tokens'])} | {fmt(d['final_val'])} | "
                       f"{fmt(d['zero_var_trained'])} |")  # fmt: skip
    if "uniform-budget" in values:
        out.append("\nPaired by seed, against `uniform-budget` (uniform continued: uniform with the horizon of the "
                   "most expensive arm), at equal generated tokens:\n")  # fmt: skip
        out.append("| arm | tokens to target minus uniform's (k) | steps to target minus uniform's | pairs (both reached) | final val acc | "
                   "uniform's val acc at the arm's tokens | difference |\n" + "| --- " * 7 + "|")  # fmt: skip
        ubs = [run_curves(run_dir(args, "uniform-budget", s)) for s in args.seeds]
        for arm in [a for a in args.arms if a not in ("uniform", "uniform-budget")]:
            rows = [
                against_budget(run_curves(run_dir(args, arm, s)), ub, args.target) for s, ub in zip(args.seeds, ubs)
            ]
            ttt, stt = (np.array([r[k] for r in rows]) for k in ("tokens_to_target", "steps_to_target"))
            pairs = reached(ttt)
            d = {k: interval([r[k] for r in rows]) for k in ("val_at_its_tokens", "uniform_val_at_its_tokens")}
            summary["arms"][arm]["minus_uniform_budget"] = d | {"tokens_to_target": interval(pairs) if len(pairs) else None,
                                                                "pairs": int(len(pairs))}  # fmt: skip
            out.append(f"| {arm} | {fmt_reached(ttt, 1, 1e3)} | {fmt_reached(stt, 1)} | {len(pairs)}/{len(rows)} | {fmt(interval(values[arm]['final_val']))} | "
                       f"{fmt(d['uniform_val_at_its_tokens'])} | {fmt(d['val_at_its_tokens'])} |")  # fmt: skip
        out.append("\nCensoring-aware, by seed (added after the runs): which reached the target first with both runs cut "
                   "at the arm's own generated tokens; a seed where only one reached it counts, unlike the pairs above:\n")  # fmt: skip
        out.append("| arm | the arm first | uniform continued first | neither |\n" + "| --- " * 4 + "|")
        for arm in [a for a in args.arms if a not in ("uniform", "uniform-budget")]:
            firsts = [against_budget(run_curves(run_dir(args, arm, s)), ub, args.target)["first"]
                      for s, ub in zip(args.seeds, ubs)]  # fmt: skip
            summary["arms"][arm]["first_reach_vs_uniform_budget"] = [firsts.count(1), firsts.count(-1), firsts.count(0)]
            out.append(f"| {arm} | {firsts.count(1)} | {firsts.count(-1)} | {firsts.count(0)} |")
    if {"vas+dynamic", "dynamic"} <= set(values):  # VAS on top of dynamic sampling
        on, off = values["vas+dynamic"], values["dynamic"]
        steps = reached(on["steps_to_target"] - off["steps_to_target"])
        out.append(f"\nvas+dynamic minus dynamic, paired by seed: final val acc {fmt(interval(on['final_val'] - off['final_val']))}; "
                   f"steps to target {fmt_reached(steps, 1)} (the {len(steps)} seeds where both reached it).")  # fmt: skip
    capped = {a: values[a]["at_cap"] for a in values if not np.isnan(values[a]["at_cap"]).all()}
    if capped:
        out.append("\nSteps at the --max-sampling-rounds cap (all seeds): " + ", ".join(
            f"{a} {v.sum():.0f} of {args.steps * len(args.seeds)}" for a, v in capped.items()) + ".")  # fmt: skip
    out.append("\nThe accounting (thousands of tokens, mean over seeds, the first --steps steps of each arm and its "
               "scoring; `dead`: tokens of trained groups without signal, by group share):\n")  # fmt: skip
    out.append("| arm | VAS scoring | dropped by the filter | trained batch | of it dead | of it with signal | "
               "spent beyond the trained batch | dead tokens saved vs uniform |\n" + "| --- " * 8 + "|")  # fmt: skip
    for arm, v in values.items():
        k = {name: v[f"acct_{name}"].mean() / 1e3 for name in ("scoring", "dropped", "trained", "dead", "signal")}
        saved = (values["uniform"]["acct_dead"].mean() / 1e3 - k["dead"]) if "uniform" in values else float("nan")
        saved = "-" if arm == "uniform-budget" else f"{saved:.0f}"  # its whole run, not --steps steps
        out.append(f"| {arm} | {k['scoring']:.0f} | {k['dropped']:.0f} | {k['trained']:.0f} | {k['dead']:.0f} | "
                   f"{k['signal']:.0f} | {k['scoring'] + k['dropped']:.0f} | {saved} |")  # fmt: skip
    return "\n".join(out), summary


def plot(args, budget: float) -> list[Path]:
    """Validation accuracy against steps (the fixed-length arms) and against generated tokens (mean
    over seeds, min-max band), and the accounting plot: each run's generated tokens against its final accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_axis in ("steps", "tokens"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm in args.arms:
            if x_axis == "steps" and arm == "uniform-budget":  # its first --steps steps are uniform's
                continue
            runs = [run_curves(run_dir(args, arm, s)) for s in args.seeds]
            if x_axis == "steps":
                n = min(len(c["val"]) for c in runs)
                x, ys = runs[0]["val_steps"][:n], np.stack([c["val"][:n] for c in runs])
            else:
                x = np.linspace(0, min(c["tokens"] for c in runs), 101)
                ys = np.stack([accuracy_at(c, x) for c in runs])
                x = x / 1e6
            (line,) = ax.plot(x, ys.mean(0), label=arm, linestyle="--" if arm == "uniform-budget" else "-")
            ax.fill_between(x, ys.min(0), ys.max(0), alpha=0.12, color=line.get_color())
        ax.axhline(args.target, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("training step" if x_axis == "steps" else "generated tokens (millions, scoring included)")
        ax.set_ylabel("greedy val accuracy")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(Path(args.out) / f"{x_axis}.png")
        fig.savefig(paths[-1], dpi=90)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in args.arms:
        runs = [run_curves(run_dir(args, arm, s)) for s in args.seeds]
        ax.scatter([c["tokens"] / 1e6 for c in runs], [c["val"][-1] for c in runs], label=arm, s=14)
    ax.set_xlabel("generated tokens of the run (millions)")
    ax.set_ylabel("final greedy val accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(Path(args.out) / "accounting.png")
    fig.savefig(paths[-1], dpi=90)
    plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    spread = ROOT / "data" / "toy-spread" / "rl"
    parser.add_argument("--target", type=float, required=True, help="greedy val accuracy of the primary metric")
    parser.add_argument("--sft-model", default=str(ROOT / "bench" / "results" / "sampler-study" / "start-B"),
                        help="the shared SFT start (default: the committed start B, the start of seeds 4 on)")  # fmt: skip
    parser.add_argument("--data", default=f"{spread}@train", help="RL rows of the pool")
    parser.add_argument("--val-data", default=f"{spread}@val", help="validation rows")
    parser.add_argument("--val-temperature", type=float, default=0.0, help="validation temperature (0 = greedy)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "sampler-study"), help="runs, tables and plots")
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="rollout engine (HF is faster here)")
    parser.add_argument("--steps", type=int, default=60, help="GRPO steps of every arm but uniform-budget")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=list(range(10)),
                        help="comma-separated seeds (default 0-9)")  # fmt: skip
    parser.add_argument("--train-limit", type=int, default=512, help="prompts in the pool (P)")
    parser.add_argument("--val-every", type=int, default=5, help="validation every N steps")
    parser.add_argument("--val-limit", type=int, default=200, help="validation prompts")
    parser.add_argument("--vas-rollouts", type=int, default=16, help="N for VPS scoring (paper: 16)")
    parser.add_argument("--vas-update-every", type=int, default=12, help="T_update (paper 56 of ~290 steps, scaled)")
    parser.add_argument("--max-sampling-rounds", type=int, default=3, help="rounds of the dynamic arms")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    parser.add_argument("--skip-train", action="store_true", help="only aggregate finished runs")
    parser.add_argument("--archive", default=str(ROOT / "bench" / "results" / "sampler-study"),
                        help="where finished runs' metrics.jsonl + config.json are copied after training")  # fmt: skip
    args = parser.parse_args()
    args.arms = [a for a in args.arms.split(",") if a]
    if set(args.arms) - set(ARMS):
        raise SystemExit(f"error: unknown arms {sorted(set(args.arms) - set(ARMS))}; choose from {list(ARMS)}")
    if "uniform-budget" in args.arms and "uniform" not in args.arms:
        raise SystemExit("error: uniform-budget continues uniform's runs: add uniform to --arms")
    if not args.skip_train:
        if not Path(args.sft_model, "config.json").exists():
            raise SystemExit(f"error: no SFT checkpoint at {args.sft_model}: see the commands at the top of --help")
        args.start_sha = start_fingerprint(Path(args.sft_model))
        train_all(args)
        print(f"archived {len(archive(args))} finished runs to {args.archive}")
    table, summary = summarise(args)
    Path(args.out, "results.md").write_text(table + "\n")
    Path(args.out, "results.json").write_text(json.dumps({"args": vars(args), **summary}, indent=2))
    print(table)
    print("plots:", *plot(args, summary["budget_tokens"]))


if __name__ == "__main__":
    main()
