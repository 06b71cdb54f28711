"""Every exit of a stage closes its engines before the process group goes (mmr1/run.py): the end of
the loop, a preemption before step 1 (say during the initial VAS scoring), a diverged run, any error.

A one-rank gloo process group stands in for torchrun's; each closer records whether the group is
still up when it runs, which is what vLLM's teardown needs."""

import pytest
import torch
import torch.distributed as tdist

import sft
from mmr1 import config, dist, guards, run


@pytest.fixture
def one_rank_group():
    """A real gloo process group of one rank (torchrun's environment, not its processes)."""
    store = tdist.HashStore()
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.Dist(0, 1, 0, torch.device("cpu"))
    if tdist.is_initialized():
        tdist.destroy_process_group()


def make_run(toy_dir, tmp_path, d, log):
    """A Run of sft.py's config with two closers that record the order and the group's state."""
    cfg = config.parse_config(sft.SFTConfig, sft.PRESETS, ["--model", str(toy_dir / "model"),
                                                           "--output-dir", str(tmp_path / "out")])  # fmt: skip
    r = run.Run(cfg, d, tmp_path / "out", "sft", sft.RESUME_MAY_CHANGE, 10, 5)
    r.close_on_exit(lambda: log.append(("engine", tdist.is_initialized())))
    r.close_on_exit(lambda: log.append(("pool", tdist.is_initialized())))
    return r


@pytest.mark.parametrize("ending", ["diverged", "error", "finish"])
def test_every_exit_closes_the_engine_before_the_process_group(toy_dir, tmp_path, one_rank_group, ending, capsys):
    log = []

    def stage():
        r = make_run(toy_dir, tmp_path, one_rank_group, log)
        if ending == "diverged":
            raise guards.DivergedError("step 3: loss nan")
        if ending == "error":
            raise RuntimeError("CUDA out of memory")
        r.close()  # what finish() ends with

    if ending == "diverged":
        with pytest.raises(SystemExit, match="error: step 3: loss nan"):
            run.main(stage)
    elif ending == "error":
        with pytest.raises(RuntimeError, match="CUDA out of memory"):
            run.main(stage)
    else:
        run.main(stage)
    assert log == [("engine", True), ("pool", True)]  # in order, each once, the group still up
    assert not tdist.is_initialized() and run.OPEN == []


def test_preemption_during_initial_scoring_closes_the_engine_first(toy_dir, tmp_path, one_rank_group, capsys):
    """SIGTERM during the phase before step 1: exit 0, nothing saved, the engine closed while the
    group is up, then the group gone."""
    log = []

    def stage():
        r = make_run(toy_dir, tmp_path, one_rank_group, log)
        r.preemption.received = "SIGTERM"  # what the handler records
        r.stop_before_training("the initial scoring")
        raise AssertionError("not reached: a signalled run stops here")

    with pytest.raises(SystemExit) as e:
        run.main(stage)
    assert e.value.code == 0
    assert log == [("engine", True), ("pool", True)] and not tdist.is_initialized()
    assert "SIGTERM during the initial scoring: exiting before the first step" in capsys.readouterr().out


def test_a_failing_closer_is_named_and_the_teardown_goes_on(toy_dir, tmp_path, one_rank_group, capsys):
    log = []

    def stage():
        r = make_run(toy_dir, tmp_path, one_rank_group, log)
        r.closers.insert(0, broken_engine_close)
        raise RuntimeError("boom")

    def broken_engine_close():
        raise OSError("engine core already gone")

    with pytest.raises(RuntimeError, match="boom"):
        run.main(stage)
    assert log == [("engine", True), ("pool", True)] and not tdist.is_initialized()
    assert "closing" in (out := capsys.readouterr().out) and "OSError: engine core already gone" in out
