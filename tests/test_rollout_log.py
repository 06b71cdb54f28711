"""MetricLogger.log_rollouts: rollouts.jsonl written on rank 0, trimmed on resume like metrics.jsonl,
and mirrored to wandb as a Table."""

import json
import sys
import types
from dataclasses import dataclass

from mmr1.config import MetricLogger, trim_jsonl


@dataclass
class Settings:
    """A stand-in for a script's config (the logger hands dataclasses.asdict of it to wandb)."""

    lr: float = 1e-6


def records(step: int) -> list[dict]:
    """Two rollouts as grpo.py will log them."""
    return [
        {"prompt_id": 10 * step, "response": f"step {step} a", "reward/overall": 1.0, "advantage": 0.7},
        {"prompt_id": 10 * step + 1, "response": f"step {step} b", "reward/overall": 0.0, "advantage": -0.7},
    ]


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_log_rollouts_writes_one_line_per_record_with_the_step_first(tmp_path):
    logger = MetricLogger(tmp_path, Settings(), enabled=True)
    path = tmp_path / "rollouts.jsonl"
    logger.log_rollouts(1, [])
    assert not path.exists()  # made by the first records, not before
    logger.log_rollouts(1, records(1))
    logger.log_rollouts(2, records(2))
    got = lines(path)
    assert got == [{"step": s, **r} for s in (1, 2) for r in records(s)]
    assert [list(x)[0] for x in got] == ["step"] * 4
    logger.close()


def test_a_resumed_run_keeps_the_rollouts_up_to_its_step_and_a_fresh_run_drops_them(tmp_path):
    first = MetricLogger(tmp_path, Settings(), enabled=True)
    for step in (1, 2, 3, 4):
        first.log(step, {"train/loss": float(step)})
        first.log_rollouts(step, records(step))
    with (tmp_path / "rollouts.jsonl").open("a") as f:
        f.write('{"step": 5, "respo')  # a write torn by the kill
    resumed = MetricLogger(tmp_path, Settings(), enabled=True, resume_from=2)
    assert [x["step"] for x in lines(tmp_path / "rollouts.jsonl")] == [1, 1, 2, 2]
    assert [x["step"] for x in lines(tmp_path / "metrics.jsonl")] == [1, 2]  # the same trim
    resumed.log_rollouts(3, records(3))
    assert [x["step"] for x in lines(tmp_path / "rollouts.jsonl")] == [1, 1, 2, 2, 3, 3]
    MetricLogger(tmp_path, Settings(), enabled=True)  # fresh: no rollouts until it logs some
    assert not (tmp_path / "rollouts.jsonl").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_trim_jsonl_leaves_a_missing_file_missing(tmp_path):
    trim_jsonl(tmp_path / "rollouts.jsonl", 3)
    trim_jsonl(tmp_path / "rollouts.jsonl", None)
    assert not (tmp_path / "rollouts.jsonl").exists()


def test_a_non_master_rank_writes_nothing(tmp_path):
    out = tmp_path / "run"
    logger = MetricLogger(out, Settings(), enabled=False)
    logger.log(1, {"train/loss": 1.0})
    logger.log_rollouts(1, records(1))
    assert not out.exists()


def test_rollouts_go_to_wandb_as_a_table(tmp_path, monkeypatch):
    """wandb is not installed here: a stand-in module in sys.modules["wandb"] records the calls, so
    this checks only the calls made (init, Table(columns, data), log at the step), not wandb itself."""
    calls = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    fake = types.ModuleType("wandb")
    fake.Table = Table
    fake.init = lambda **kwargs: calls.append(("init", kwargs))
    fake.log = lambda data, step: calls.append(("log", data, step))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)

    logger = MetricLogger(tmp_path, Settings(), enabled=True, report_to="wandb")
    logger.log_rollouts(7, records(7))
    logger.close()
    assert calls[0] == ("init", {"project": "mmr1", "config": {"lr": 1e-6}, "dir": str(tmp_path)})
    kind, data, step = calls[1]
    assert (kind, list(data), step) == ("log", ["rollouts"], 7)
    table = data["rollouts"]
    assert table.columns == ["prompt_id", "response", "reward/overall", "advantage"]
    assert table.data == [[70, "step 7 a", 1.0, 0.7], [71, "step 7 b", 0.0, -0.7]]
    assert calls[2:] == [("finish",)]
