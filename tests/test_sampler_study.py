"""bench/sampler_study.py's aggregation on hand-made metrics.jsonl lines: tokens to the target, accuracy
at equal tokens, the token accounting (the bench's runs themselves are a script, not a test)."""

import sys

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import sampler_study  # noqa: E402


def lines(val: dict[int, float], sampled: list[float], response_len: list[float], zero_var: list[float], scoring=0.0):
    """metrics.jsonl of a run: step records with the sampled tokens of each step (cumulative generated
    tokens = scoring + their running sum), validations at the steps of `val` (step 0 alone)."""
    out, total = [{"step": 0, "val/accuracy": val[0]}], scoring
    for step, (s, r, z) in enumerate(zip(sampled, response_len, zero_var), 1):
        total += s
        out.append(
            {
                "step": step,
                "train/loss": 0.0,
                "rollout/generated_tokens": total,
                "rollout/sampled_tokens": s,
                "rollout/response_len": r,
                "vas/zero_var_frac": z,
                "rollout/zero_var_frac_sampled": z,
                "train/grad_norm": 1.0,
                "train/clip_frac": 0.0,
                "rollout/sampling_rounds": 1.0,
            }  # fmt: skip
            | ({"val/accuracy": val[step]} if step in val else {})
        )
    return out


def test_tokens_to_target_and_accuracy_at_equal_tokens():
    c = sampler_study.curves(lines({0: 0.3, 2: 0.6, 4: 0.9}, [100.0] * 4, [1.0] * 4, [0.5] * 4, scoring=1000.0))
    assert c["val_tokens"].tolist() == [0.0, 1200.0, 1400.0]  # scoring before step 1 counts
    assert sampler_study.tokens_to_target(c, 0.6) == 1200.0 and sampler_study.tokens_to_target(c, 0.9) == 1400.0
    assert np.isnan(sampler_study.tokens_to_target(c, 0.95))
    # the latest validation at or before each budget: 0.3 up to 1199 tokens, 0.6 from 1200, 0.9 from 1400
    got = sampler_study.accuracy_at(c, np.array([0.0, 1199.0, 1200.0, 1399.0, 1500.0]))
    assert got.tolist() == [0.3, 0.3, 0.6, 0.6, 0.9]


def test_accounting_splits_every_token():
    """Two steps: 1,280 sampled tokens each of which the trained batch (16 x 8 responses of mean length
    5) is 640; half (then a quarter) of its groups dead; 3,000 tokens of VAS scoring."""
    c = sampler_study.curves(lines({0: 0.3, 2: 0.5}, [1280.0, 1280.0], [5.0, 5.0], [0.5, 0.25], scoring=3000.0))
    got = sampler_study.accounting(c, steps=2)
    assert got == {"total": 5560.0, "scoring": 3000.0, "dropped": 1280.0, "trained": 1280.0,
                   "dead": 320.0 + 160.0, "signal": 1280.0 - 480.0}  # fmt: skip
    assert got["scoring"] + got["dropped"] + got["trained"] == pytest.approx(got["total"])


def test_finished_and_archive(tmp_path):
    """A run is finished when it logged the steps of its config.json and has `final/`: a preempted
    uniform-budget run (uniform's `final/` copied in, fewer steps logged) is not, and is not archived;
    an archived run records its start's weights: sha256 of the shards' bytes in name order."""
    import hashlib
    import json
    from types import SimpleNamespace

    def make(name: str, planned: int, logged: int) -> None:
        run = tmp_path / "runs" / name
        (run / "final").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"max_steps": planned}))
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(logged + 1)))

    make("uniform-seed0", 60, 60)
    make("uniform-budget-seed0", 400, 250)
    start = tmp_path / "sft"
    start.mkdir()
    (start / "model-00001-of-00002.safetensors").write_bytes(b"first shard")
    (start / "model-00002-of-00002.safetensors").write_bytes(b"second")
    config = json.loads((tmp_path / "runs" / "uniform-seed0" / "config.json").read_text())
    (tmp_path / "runs" / "uniform-seed0" / "config.json").write_text(json.dumps(config | {"model": str(start)}))
    assert sampler_study.finished(tmp_path / "runs" / "uniform-seed0")
    assert not sampler_study.finished(tmp_path / "runs" / "uniform-budget-seed0")
    assert not sampler_study.finished(tmp_path / "runs" / "vas-seed0")  # never started
    args = SimpleNamespace(out=tmp_path / "runs", archive=tmp_path / "kept")
    assert [p.name for p in sampler_study.archive(args)] == ["uniform-seed0"]
    kept = tmp_path / "kept" / "uniform-seed0"
    assert sorted(p.name for p in kept.iterdir()) == ["config.json", "metrics.jsonl", "start.json"]
    assert sampler_study.read(kept)[-1]["step"] == 60
    recorded = json.loads((kept / "start.json").read_text())
    assert recorded == {"model": str(start), "weights_sha256": hashlib.sha256(b"first shardsecond").hexdigest()}
    assert sampler_study.start_fingerprint(tmp_path / "nothing-here") is None


def test_against_budget_compares_at_the_arms_own_tokens():
    """An arm that spends 1,000 scoring tokens and 4 steps of 100 (1,400 in all) and reaches 0.9 at
    step 4 (1,400 tokens), against uniform continued: 100 tokens a step, 0.9 first at step 8 (800
    tokens), 0.8 by step 12 (its latest validation at or before 1,400 tokens is step 12's)."""
    arm = sampler_study.curves(lines({0: 0.3, 2: 0.6, 4: 0.9}, [100.0] * 4, [1.0] * 4, [0.5] * 4, scoring=1000.0))
    ub = sampler_study.curves(lines({0: 0.3, 4: 0.5, 8: 0.9, 12: 0.8, 16: 0.95}, [100.0] * 16, [1.0] * 16, [0.5] * 16))
    got = sampler_study.against_budget(arm, ub, 0.9)
    assert got["tokens_to_target"] == 1400.0 - 800.0 and got["steps_to_target"] == 4.0 - 8.0
    assert got["uniform_val_at_its_tokens"] == 0.8
    assert got["val_at_its_tokens"] == pytest.approx(0.9 - 0.8, abs=1e-12)
    assert got["first"] == -1  # uniform continued reached 0.9 at 800 tokens, the arm at 1,400
    never = sampler_study.against_budget(arm, ub, 0.99)
    assert np.isnan(never["tokens_to_target"]) and never["first"] == 0
    # 0.95: uniform continued reaches it only at step 16 (1,600 tokens), after the arm's 1,400: censored
    # there, so a seed the reached-only pairing drops; 0.6: the arm at 1,200 tokens, uniform at 800 (0.9)
    assert sampler_study.against_budget(arm, ub, 0.95)["first"] == 0
    late = sampler_study.curves(lines({0: 0.3, 4: 0.9}, [400.0] * 4, [1.0] * 4, [0.5] * 4))  # 0.9 at 1,600
    assert sampler_study.against_budget(arm, late, 0.9)["first"] == 1  # the arm alone by its 1,400 tokens


def test_to_train_skips_runs_archived_from_the_same_start(tmp_path):
    """A later session trains only what is missing: runs finished under --out or archived from the same
    start (start.json's sha256) are skipped; a run archived from another start is trained again; and
    uniform is trained again where its seed's uniform-budget still has to continue uniform's checkpoint,
    which no archive keeps. budget_steps reads each arm's record where it is (out, else archive)."""
    import json
    from types import SimpleNamespace

    def put(folder: str, name: str, sha: str | None, tokens: float, final: bool = False) -> None:
        run = tmp_path / folder / name
        run.mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"max_steps": 60}))
        lines = [{"step": 0}, {"step": 60, "rollout/generated_tokens": tokens}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        if sha is not None:
            (run / "start.json").write_text(json.dumps({"model": "m", "weights_sha256": sha}))
        if final:
            (run / "final").mkdir()

    for arm in sampler_study.ARMS:  # seed 0: everything archived from start B
        put("kept", f"{arm}-seed0", "B", 1000.0)
    put("kept", "uniform-seed1", "B", 600.0)
    put("kept", "vas-seed1", "B", 3000.0)
    put("kept", "dynamic-seed1", "A", 900.0)  # another start: trained again
    put("kept", "vas-online-seed1", None, 900.0)  # no start recorded (start A's runs): trained again
    put("runs", "vas+dynamic-seed1", None, 2400.0, final=True)  # finished under --out
    args = SimpleNamespace(out=tmp_path / "runs", archive=tmp_path / "kept", arms=list(sampler_study.ARMS),
                           seeds=[0, 1], start_sha="B", steps=60)  # fmt: skip
    assert sampler_study.to_train(args) == [("uniform", 1), ("vas-online", 1), ("dynamic", 1)]
    assert sampler_study.record(args, "vas", 1) == tmp_path / "kept" / "vas-seed1"
    assert sampler_study.record(args, "vas+dynamic", 1) == tmp_path / "runs" / "vas+dynamic-seed1"
    assert sampler_study.budget_steps(args, 1) == 300  # vas's 3000 tokens at uniform's 600 / 60 per step
    args.arms = ["uniform", "vas"]  # no uniform-budget to feed: an archived uniform is enough
    assert sampler_study.to_train(args) == []


def test_per_seed_table():
    """One row per arm, one column per seed: steps / thousands of tokens to the target, `-` where never."""
    from types import SimpleNamespace

    values = {"uniform": {"steps_to_target": np.array([55.0, np.nan]), "tokens_to_target": np.array([237_400.0, np.nan])},
              "vas": {"steps_to_target": np.array([35.0, 20.0]), "tokens_to_target": np.array([968_000.0, 612_499.0])}}  # fmt: skip
    table = sampler_study.per_seed_table(SimpleNamespace(seeds=[4, 5]), values).splitlines()
    assert table[0] == "| arm | seed 4 | seed 5 |"
    assert table[2:] == ["| uniform | 55 / 237 | - |", "| vas | 35 / 968 | 20 / 612 |"]


def test_skip_train_refuses_a_cut_or_missing_run(tmp_path):
    """--skip-train aggregates only whole runs: a metrics.jsonl cut at a line boundary (it parses, but
    ends before the steps config.json plans), a missing run, and a line cut mid-write each stop with
    one `error:` line naming the run, instead of changing a table without a word."""
    import json

    run = tmp_path / "dynamic-seed3"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"max_steps": 4}))
    records = lines({0: 0.3, 2: 0.6, 4: 0.9}, [100.0] * 4, [1.0] * 4, [0.5] * 4)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(text)
    sampler_study.check_complete(run, 3)  # whole: no error
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))  # cut after step 2
    with pytest.raises(SystemExit, match=r"^error: .*dynamic-seed3/metrics.jsonl: cut: its last step is 2 of the 4"):
        sampler_study.check_complete(run, 3)
    with pytest.raises(SystemExit, match=r"^error: .*vas-seed3: no metrics.jsonl.*leave seed 3 out with --seeds"):
        sampler_study.check_complete(tmp_path / "vas-seed3", 3)
    (run / "metrics.jsonl").write_text(text[: text.index("\n", text.index("\n") + 1) + 20])  # line 3 cut mid-write
    with pytest.raises(SystemExit, match=r"^error: .*metrics.jsonl:3: not a metrics record"):
        sampler_study.read(run)


import sampler_budget  # noqa: E402


def budget_run(val: dict[int, float], per_step: float, steps: int, scoring: float = 0.0):
    """budget_curves input: `steps` steps of `per_step` sampled tokens after `scoring` tokens of VAS scoring."""
    return lines(val, [per_step] * steps, [1.0] * steps, [0.5] * steps, scoring=scoring)


def test_censoring_at_the_budget():
    """A run of 10 steps of 100 tokens after 200 scoring tokens (so step k has 200 + 100 k tokens),
    budget 750: steps 1-5 are within it (step 5: 700 tokens), validations at steps 0, 4 (600) and 8
    (1,000, beyond the budget: not read). It reaches 0.5 at 600 tokens; 0.9 only at step 8, after the
    budget: censored there, not reached."""
    c = sampler_budget.budget_curves(budget_run({0: 0.3, 4: 0.5, 8: 0.9}, 100.0, 10, scoring=200.0), 750.0)
    assert c["val_tokens"].tolist() == [0.0, 600.0] and c["val"].tolist() == [0.3, 0.5]
    assert c["steps_within"] == 5 and c["tokens_within"] == 700.0 and c["scoring_tokens"] == 200.0
    assert sampler_budget.time_to_target(c, 0.5, 750.0) == (600.0, True)
    assert sampler_budget.time_to_target(c, 0.9, 750.0) == (750.0, False)
    # area under the step function: 0.3 over [0, 600), 0.5 over [600, 750]
    assert sampler_budget.mean_accuracy(c, 750.0) == pytest.approx((0.3 * 600 + 0.5 * 150) / 750, abs=1e-12)


def test_kaplan_meier_median():
    """Hand-computed: all four reach at 1, 2, 3, 4: S = 0.75, 0.5 -> median 2. With the run at 2 censored,
    S(1) = 3/4, then at 3 two runs are at risk: S(3) = 3/4 x 1/2 = 0.375 -> median 3. One of four
    reaching: S never falls to 0.5 -> inf. With every run censored at one budget, KM is the empirical
    share not reached, so its median is the naive one (checked on random cases)."""
    km = sampler_budget.kaplan_meier_median
    assert km(np.array([1.0, 2, 3, 4]), np.array([True] * 4)) == 2.0
    assert km(np.array([1.0, 2, 3, 4]), np.array([True, False, True, True])) == 3.0
    assert km(np.array([5.0, 10, 10, 10]), np.array([True, False, False, False])) == float("inf")
    rng = np.random.default_rng(0)
    for _ in range(50):
        t = rng.integers(1, 20, size=10).astype(float)
        hit = t < 15
        t[~hit] = 15.0  # censored at the common budget
        naive = next((x for x in np.sort(t[hit]) if (t[hit] <= x).sum() >= len(t) / 2), float("inf"))
        assert km(t, hit) == naive


def test_first_reach_counts_wins_ties_losses():
    fr = sampler_budget.first_reach
    assert fr((100.0, True), (200.0, True)) == 1 and fr((300.0, True), (200.0, True)) == -1
    assert fr((900.0, True), (1500.0, False)) == 1 and fr((1500.0, False), (50.0, True)) == -1
    assert fr((1500.0, False), (1500.0, False)) == 0 and fr((400.0, True), (400.0, True)) == 0


def test_archive_keeps_whole_seeds_and_names_what_it_leaves_out(tmp_path):
    """Seed 0 has both arms archived from start "B" past the budget; seed 1's vas-t64 is cut short of
    it and its uniform is from another start; seed 2 has nothing. Only seed 0 enters the tables, every
    run and seed left out is named, and the paired table reads the hand-made runs."""
    import json
    from types import SimpleNamespace

    def put(name: str, sha: str, val: dict[int, float], steps: int, scoring: float = 0.0) -> None:
        run = tmp_path / name
        run.mkdir()
        records = budget_run(val, 100.0, steps, scoring)
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (run / "start.json").write_text(json.dumps({"model": "m", "weights_sha256": sha}))

    put("uniform-seed0", "B", {0: 0.3, 5: 0.8, 10: 0.9}, 12)  # 0.8 at 500 tokens
    put("vas-t64-seed0", "B", {0: 0.3, 5: 0.6, 10: 0.85}, 12, scoring=300.0)  # 0.85 at 1,300: after the budget
    put("uniform-seed1", "A", {0: 0.3, 5: 0.8}, 12)
    put("vas-t64-seed1", "B", {0: 0.3, 5: 0.8}, 6)  # 600 tokens: short of the budget
    args = SimpleNamespace(archive=tmp_path, arms=["uniform", "vas-t64"], seeds=[0, 1, 2], start_sha="B",
                           budget=1000.0, target=0.8)  # fmt: skip
    runs, excluded = sampler_budget.load_archive(args)
    assert {a: sorted(r) for a, r in runs.items()} == {"uniform": [0], "vas-t64": [0]}
    assert excluded == ["uniform-seed1: archived from another start than B", "vas-t64-seed1: cut at 1k tokens, short of the budget",
                        "uniform-seed2: not archived", "vas-t64-seed2: not archived"]  # fmt: skip
    table, summary = sampler_budget.summarise(args)
    assert "**1 of 3 seeds complete** (0)" in table and "**Partial" in table
    assert summary["arms"]["uniform"]["reached"] == 1 and summary["arms"]["vas-t64"]["reached"] == 0
    pair = summary["pairs"]["vas-t64 - uniform"]
    assert pair["first_reach_wtl"] == (0, 0, 1)
    assert pair["time"][0] == 1000.0 - 500.0  # censored at the budget against 500
    # AUC: uniform 0.3 over [0, 500), 0.8 over [500, 1000]; vas-t64 0.3 over [0, 800), 0.6 over [800, 1000]
    assert pair["mean_acc"][0] == pytest.approx((0.3 * 800 + 0.6 * 200) / 1000 - (0.3 * 500 + 0.8 * 500) / 1000)


def test_plan_reuses_runs_past_the_budget_and_orders_complete_seeds_first(tmp_path):
    """The sampler study's run of the same start past the budget is copied, not trained; one short of
    it, or from another start, is trained; seeds 4-9 come before 0-3, every arm of a seed together;
    a run archived whole is neither."""
    import json
    from types import SimpleNamespace

    def put(folder: str, name: str, sha: str, tokens: float) -> None:
        run = tmp_path / folder / name
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "rollout/generated_tokens": tokens}) + "\n")
        (run / "start.json").write_text(json.dumps({"weights_sha256": sha}))

    put("study", "uniform-budget-seed4", "B", 2000.0)
    put("study", "vas-seed4", "B", 900.0)  # short of the budget
    put("study", "uniform-budget-seed0", "A", 2000.0)  # another start
    put("archive", "vas-t64-seed0", "B", 1200.0)
    args = SimpleNamespace(archive=tmp_path / "archive", study=tmp_path / "study", seeds=[0, 4], start_sha="B",
                           budget=1000.0, arms=["uniform", "vas-t64", "vas-t12"])  # fmt: skip
    copies, runs = sampler_budget.plan(args)
    assert copies == [("uniform", 4, tmp_path / "study" / "uniform-budget-seed4")]
    assert runs == [("vas-t64", 4), ("vas-t12", 4), ("uniform", 0), ("vas-t12", 0)]
