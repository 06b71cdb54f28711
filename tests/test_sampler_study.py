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
    never = sampler_study.against_budget(arm, ub, 0.99)
    assert np.isnan(never["tokens_to_target"])


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
