"""bench/vas_experiment.py's committed record: finished runs are archived with their start's fingerprint,
a later session skips what is archived from the same start and aggregates from the archive (the
bench's runs themselves are a script, not a test)."""

import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import vas_experiment  # noqa: E402


def make_run(run, model, val: list[float], tokens_per_step: float, final: bool = True) -> None:
    """A finished 10-step run: validation at steps 0, 5, 10; every per-step curve the table reads."""
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": str(model), "max_steps": 10}))
    lines = [{"step": 0, "val/accuracy": val[0]}]
    for step in range(1, 11):
        line = {"step": step, "vas/zero_var_frac": 0.25, "train/grad_norm": 2.0, "train/clip_frac": 0.01,
                "rollout/generated_tokens": step * tokens_per_step, "rollout/generated_responses": step * 128}  # fmt: skip
        lines.append(line | ({"val/accuracy": val[step // 5]} if step % 5 == 0 else {}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if final:
        (run / "final").mkdir()


def test_archive_then_resume_and_aggregate_from_the_archive(tmp_path):
    start, other = tmp_path / "start", tmp_path / "other"
    for folder, weights in ((start, b"weights"), (other, b"other weights")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(weights)
    out = tmp_path / "runs" / "standard"
    make_run(out / "uniform-seed0", start, [0.5, 0.7, 0.9], 100.0)
    make_run(out / "vas-seed0", start, [0.5, 0.8, 0.8], 150.0)
    make_run(out / "vas-seed1", start, [0.5, 0.6, 0.6], 150.0, final=False)  # stopped: not archived
    args = SimpleNamespace(out=tmp_path / "runs", condition="standard", archive=str(tmp_path / "kept"),
                           start_sha=vas_experiment.start_fingerprint(start), sft_model=str(start), data="d",
                           val_data="v", steps=10, train_limit=64, val_every=5, val_limit=100, vas_rollouts=16,
                           vas_update_every=10, engine="hf", seeds=[0], arms=["uniform", "vas"])  # fmt: skip
    assert [p.name for p in vas_experiment.archive(args)] == ["uniform-seed0", "vas-seed0"]
    kept = tmp_path / "kept" / "vas-seed0"
    assert json.loads((kept / "start.json").read_text())["model"] == str(start)

    # a later session: runs/ is gone; what is archived from this start is skipped, the rest trained
    shutil.rmtree(tmp_path / "runs")
    assert vas_experiment.run_arm("uniform", 0, "d", args) is None
    label, cmd, folder = vas_experiment.run_arm("vas", 1, "d", args)
    assert folder == out / "vas-seed1" and cmd[cmd.index("--seed") + 1] == "1"
    args.start_sha = vas_experiment.start_fingerprint(other)  # another start: everything is trained again
    assert vas_experiment.run_arm("uniform", 0, "d", args) is not None

    # aggregation reads the archive where --out has no finished run: trapezoid mean over steps 0-10
    table, summary = vas_experiment.summarise(args)
    assert summary["uniform"]["auc_val"][0] == pytest.approx((0.5 + 2 * 0.7 + 0.9) / 4, abs=1e-12)
    assert summary["vas"]["auc_val"][0] == pytest.approx((0.5 + 2 * 0.8 + 0.8) / 4, abs=1e-12)
    assert summary["vas"]["tokens"][0] == 1500.0 and np.isnan(summary["vas"]["tokens"][1])  # one seed
    assert summary["vas"]["minus_uniform"]["final_val"][0] == pytest.approx(-0.1, abs=1e-12)
    assert "| vas - uniform |" in table


def test_run_jobs_keeps_each_success_and_stops_at_a_failure(tmp_path):
    """Real subprocesses, two at a time: on_done follows each success, in finishing order; the first
    failure stops the batch with its log's path, after the runs that succeeded were kept."""
    ok = [sys.executable, "-c", "print('done')"]
    jobs = [(f"job {i}", ok, tmp_path / f"job{i}") for i in range(3)]
    kept = []
    vas_experiment.run_jobs(jobs, 2, on_done=kept.append)
    assert sorted(kept) == [tmp_path / f"job{i}" for i in range(3)]
    assert (tmp_path / "job0" / "log.txt").read_text() == "done\n"
    kept.clear()
    bad = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(SystemExit, match="bad failed"):
        vas_experiment.run_jobs(
            [("good", ok, tmp_path / "good"), ("bad", bad, tmp_path / "bad")], 1, on_done=kept.append
        )
    assert kept == [tmp_path / "good"]
