"""MetricLogger: rollouts.jsonl written on rank 0 (a NullLogger on the others), trimmed on resume like
metrics.jsonl, mirrored to wandb as a Table; a failed write recorded, not raised; the records read back
with one line naming file and line."""

import errno
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mmr1.config import MetricLogger, NullLogger, metric_logger, trim_jsonl


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
    logger = MetricLogger(tmp_path, Settings())
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
    first = MetricLogger(tmp_path, Settings())
    for step in (1, 2, 3, 4):
        first.log(step, {"train/loss": float(step)})
        first.log_rollouts(step, records(step))
    with (tmp_path / "rollouts.jsonl").open("a") as f:
        f.write('{"step": 5, "respo')  # a write torn by the kill
    resumed = MetricLogger(tmp_path, Settings(), resume_from=2)
    assert [x["step"] for x in lines(tmp_path / "rollouts.jsonl")] == [1, 1, 2, 2]
    assert [x["step"] for x in lines(tmp_path / "metrics.jsonl")] == [1, 2]  # the same trim
    resumed.log_rollouts(3, records(3))
    assert [x["step"] for x in lines(tmp_path / "rollouts.jsonl")] == [1, 1, 2, 2, 3, 3]
    MetricLogger(tmp_path, Settings())  # fresh: no rollouts until it logs some
    assert not (tmp_path / "rollouts.jsonl").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_trim_jsonl_leaves_a_missing_file_missing(tmp_path):
    trim_jsonl(tmp_path / "rollouts.jsonl", 3)
    trim_jsonl(tmp_path / "rollouts.jsonl", None)
    assert not (tmp_path / "rollouts.jsonl").exists()


def test_a_non_master_rank_writes_nothing(tmp_path):
    out = tmp_path / "run"
    logger = metric_logger(out, Settings(), master=False)
    assert isinstance(logger, NullLogger) and logger.failed is None
    logger.log(1, {"train/loss": 1.0})
    logger.log_rollouts(1, records(1))
    logger.close()
    assert not out.exists()
    assert isinstance(metric_logger(out, Settings(), master=True), MetricLogger) and out.is_dir()


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

    logger = MetricLogger(tmp_path, Settings(), report_to="wandb")
    logger.log_rollouts(7, records(7))
    logger.close()
    assert calls[0] == ("init", {"project": "mmr1", "config": {"lr": 1e-6}, "dir": str(tmp_path)})
    kind, data, step = calls[1]
    assert (kind, list(data), step) == ("log", ["rollouts"], 7)
    table = data["rollouts"]
    assert table.columns == ["prompt_id", "response", "reward/overall", "advantage"]
    assert table.data == [[70, "step 7 a", 1.0, 0.7], [71, "step 7 b", 0.0, -0.7]]
    assert calls[2:] == [("finish",)]


@dataclass
class RunSettings:
    """The settings run.Run reads (a stage's config has these and more)."""

    model: str = "m"
    resume: bool = False
    skip_nonfinite: int = 0
    report_to: str = ""
    save_every: int = 0
    stop_after: int = 0


class NoSignal:
    """A stand-in for checkpoint.Preemption that installs no signal handlers in the test process."""

    received = None

    def agreed(self, d) -> bool:
        return False

    def stop_before_training(self, d, stage: str, phase: str, **teardown) -> None:
        pass


class FullDisk:
    """What Path.open("a") returns for rollouts.jsonl on a full disk: every write raises ENOSPC."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def write(self, text: str) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def full_disk_for(monkeypatch, name: str) -> None:
    """Path.open in append mode of files called `name` hands back a FullDisk; every other open is real."""
    real_open = Path.open

    def open_(self, mode="r", *args, **kwargs):
        return FullDisk() if self.name == name and "a" in mode else real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)


@pytest.mark.parametrize("save_fails", [False, True])
def test_a_full_disk_while_writing_rollouts_saves_the_step_and_stops_in_one_line(tmp_path, monkeypatch, save_fails):
    """The write fails at step 1's rollouts: the logger records it (no traceback mid-step), end_step still
    logs the step's metrics, saves step-1 through the stage's save and stops with one InputError line;
    when the save fails too (the same full disk), the line says so."""
    from mmr1 import config, dist, run

    monkeypatch.setattr(run, "PREEMPTION", NoSignal())
    r = run.Run(RunSettings(), dist.Dist(0, 1, 0, torch.device("cpu")), tmp_path, "grpo", set(), 16, 3)
    saved = []

    def save(folder, step):
        if save_fails:
            raise config.CheckpointError(f"could not write checkpoint {folder} (OSError: [Errno 28] No space)")
        saved.append((folder, step))

    assert r.start(model=None, optimizer=None, save=save) is None
    full_disk_for(monkeypatch, "rollouts.jsonl")
    r.logger.log_rollouts(1, records(1))  # recorded, not raised
    failed = f"could not write {tmp_path / 'rollouts.jsonl'} (OSError: [Errno 28] No space left on device)"
    assert r.logger.failed == failed
    with pytest.raises(config.InputError) as stop:
        r.end_step(1, {"train/loss": 0.5})
    if save_fails:
        assert saved == [] and str(stop.value) == (
            f"{failed}; step 1 could not be saved either (could not write checkpoint {tmp_path / 'step-1'} "
            "(OSError: [Errno 28] No space))"
        )
    else:
        assert saved == [(tmp_path / "step-1", 1)] and str(stop.value) == (
            f"{failed}; step 1 is saved in {tmp_path / 'step-1'}; free space, then continue with --resume"
        )
    r.close()
    assert [x["step"] for x in lines(tmp_path / "metrics.jsonl")] == [1]  # the step's metrics are kept
    assert not (tmp_path / "rollouts.jsonl").exists()


def test_records_read_back_with_one_line_naming_file_and_line(tmp_path):
    """read_jsonl (compare_runs and the stages' readers of metrics.jsonl / rollouts.jsonl): a missing file,
    a torn line, a line that is no object and JSON nested 100,000 deep each name the file and the line."""
    from mmr1 import config

    path = tmp_path / "metrics.jsonl"
    with pytest.raises(config.MissingDataError, match=f"^{path} not found$"):
        config.read_jsonl(path)
    good = '{"step": 1, "train/loss": 0.5}\n\n'
    for bad, why in [
        ('{"step": 2, "tra', "not JSON (Unterminated string starting at)"),
        ("[1, 2]", "a JSON list, not an object"),
        ("[" * 100_000 + "]" * 100_000, "not JSON (nested too deeply)"),
        ('{"step": "\xff"}'.encode("latin-1"), "not UTF-8"),
    ]:
        path.write_bytes(good.encode() + (bad if isinstance(bad, bytes) else bad.encode()) + b"\n")
        with pytest.raises(config.BadRowError) as error:
            config.read_jsonl(path)
        assert str(error.value) == f"{path} line 3: {why}"
    path.write_text(good)
    assert config.read_jsonl(path) == [{"step": 1, "train/loss": 0.5}]


def test_trim_survives_a_deeply_nested_line_and_replaces_the_file_whole(tmp_path, monkeypatch):
    from mmr1 import config

    path = tmp_path / "rollouts.jsonl"
    path.write_text('{"step": 1}\n' + "[" * 100_000 + "\n" + '{"step": 2}\n')
    trim_jsonl(path, 1)  # the deep line is dropped like a torn one, not a RecursionError
    assert path.read_text() == '{"step": 1}\n'

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(config.os, "fsync", failing_fsync)
    path.write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(OSError):
        trim_jsonl(path, 1)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'  # the old file, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollouts.jsonl"]  # no temporary file left
    with pytest.raises(config.InputError) as error:  # a resumed run opening its records on a full disk
        MetricLogger(tmp_path, Settings(), resume_from=1)
    assert str(error.value) == (
        f"could not write the run's records in {tmp_path} (OSError: [Errno 28] No space left on device)"
    )


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    from mmr1 import config

    path = tmp_path / "model.json"
    path.write_text("old\n")
    with pytest.raises(RuntimeError):
        with config.atomic_file(path) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]
    with config.atomic_file(path, "wb") as f:
        f.write(b"new\n")
    assert path.read_bytes() == b"new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]
