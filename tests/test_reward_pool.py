"""reward.py under faults: signals sent to the whole process group, dead workers, scoring functions that
raise, numbers with huge exponents, in-process time limits, JSON nested too deeply. Real processes."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import reward

ROOT = Path(__file__).resolve().parents[1]
RESPONSES = [f"<think>t</think><answer>\\boxed{{{i}}}</answer>" for i in range(6)]
GOLDS = ["0", "1", "9", "3", "4", "7"]
EXPECTED = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]  # accuracy of RESPONSES against GOLDS


def accuracies(pool) -> list[float]:
    return [s["accuracy"] for s in reward.compute_rewards(RESPONSES, GOLDS, pool=pool)]


def wait_dead(proc, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not proc.is_alive()


def test_workers_ignore_the_signals_their_parent_handles():
    with reward.RewardPool(workers=2, timeout_s=5.0) as pool:
        assert accuracies(pool) == EXPECTED
        deadline = time.monotonic() + 120
        while len(pool.ready) < pool.workers:  # both started: the jobs above may all have gone to one
            assert time.monotonic() < deadline  # (a worker signalled while starting: the test below)
            time.sleep(0.05)
            accuracies(pool)  # map() reads a starting worker's "ready"
        pids = [proc.pid for proc, _ in pool.procs]
        for proc, _ in pool.procs:
            for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
                os.kill(proc.pid, sig)
        time.sleep(0.5)  # a default disposition ends a process within milliseconds
        assert all(proc.is_alive() for proc, _ in pool.procs), [
            (p.pid, p.exitcode, s in pool.ready) for s, (p, _) in enumerate(pool.procs)
        ]
        assert accuracies(pool) == EXPECTED
        assert [proc.pid for proc, _ in pool.procs] == pids  # the same workers: none was replaced


PREEMPTED = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    import reward

    seen = []
    signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))  # a stage's preemption handler: record, go on
    signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    responses, golds = {responses!r}, {golds!r}
    with reward.RewardPool(workers=2, timeout_s=5.0) as pool:
        first = [s["accuracy"] for s in reward.compute_rewards(responses, golds, pool=pool)]
        print("ready", flush=True)
        sys.stdin.readline()  # the test sends the signals to the process group, then a line
        again = [s["accuracy"] for s in reward.compute_rewards(responses, golds, pool=pool)]
    print(first == again, sorted(seen), flush=True)
    """
)


def test_a_signal_to_the_whole_process_group_leaves_the_pool_working():
    """What `scancel --signal=USR1 --full` and a SLURM time limit do: every process of the group gets it.
    The parent's handler records it and scores on (it saves a checkpoint next); its workers live on."""
    code = PREEMPTED.format(root=str(ROOT), responses=RESPONSES, golds=GOLDS)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, so the signals reach no one else
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGUSR1)
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.5)
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip() == f"True [{int(signal.SIGUSR1)}, {int(signal.SIGTERM)}]"
    assert "Traceback" not in err


def test_a_worker_killed_while_idle_is_replaced_and_its_job_scored(capfd):
    with reward.RewardPool(workers=2, timeout_s=5.0) as pool:
        assert accuracies(pool) == EXPECTED
        dead = pool.procs[0][0]
        dead.kill()
        wait_dead(dead)
        assert accuracies(pool) == EXPECTED
        assert pool.procs[0][0] is not dead and pool.procs[0][0].is_alive()
    assert "BrokenPipeError" not in capfd.readouterr().err


class SlowToStart:
    """score_one as a callable whose unpickling in a fresh worker takes 1 s (a worker's start-up)."""

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        time.sleep(1.0)

    def __call__(self, **job):
        return reward.score_one(**job)


def test_a_worker_dying_while_starting_is_replaced_and_one_signalled_while_starting_lives():
    with reward.RewardPool(workers=2, timeout_s=5.0, score_fn=SlowToStart()) as pool:
        (killed, _), (signalled, _) = pool.procs
        killed.kill()  # within its 1 s start-up
        os.kill(signalled.pid, signal.SIGTERM)  # blocked from its start, then ignored
        assert accuracies(pool) == EXPECTED
        assert pool.procs[0][0] is not killed
        assert pool.procs[1][0] is signalled and signalled.is_alive()


class NeverStarts:
    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        os._exit(3)  # e.g. an import that fails in the worker


def test_workers_that_never_start_are_one_error_not_a_loop():
    pool = reward.RewardPool(workers=1, timeout_s=1.0, score_fn=NeverStarts())
    try:
        with pytest.raises(RuntimeError, match="died while starting, 3 times in a row"):
            pool.map([{"response": "x", "gold": "1", "choices": None, "scoring": reward.Scoring()}])
    finally:
        pool.close()


def dies_on(response, gold, choices=None, scoring=reward.Scoring()):
    """score_one, except that a response 'DIE <path>' ends its worker the first time (the file marks it),
    and 'DIE always' every time: stand-ins for an out-of-memory kill and a crashing input."""
    if response.startswith("DIE "):
        marker = Path(response[4:])
        if response == "DIE always" or not marker.exists():
            marker.touch() if response != "DIE always" else None
            os._exit(9)
    return reward.score_one(response, gold, choices, scoring)


def test_a_worker_dying_under_a_job_is_replaced_and_the_job_sent_again(tmp_path):
    responses = [RESPONSES[0], f"DIE {tmp_path / 'once'}", "DIE always", RESPONSES[1]]
    with reward.RewardPool(workers=2, timeout_s=5.0, score_fn=dies_on) as pool:
        scores = reward.compute_rewards(responses, ["0", "1", "1", "1"], pool=pool)
        assert accuracies(pool) == EXPECTED  # the pool still works
    assert [s["timed_out"] for s in scores] == [False, False, True, False]  # 'once' scored on its second try
    assert [s["accuracy"] for s in scores] == [1.0, 0.0, 0.0, 1.0]
    assert (tmp_path / "once").exists()


def old_signature(response, gold, choices, format_weight, accuracy_weight):
    """A fork's scoring function written for the positional jobs of an older reward.py."""
    return reward.score_one(response, gold, choices)


def test_an_exception_in_a_worker_is_an_error_naming_the_response_never_a_timeout():
    with reward.RewardPool(workers=2, timeout_s=5.0, score_fn=old_signature) as pool:
        with pytest.raises(reward.ScoringError, match=r"scoring response 0 \('<think>t</think>.*TypeError.*scoring"):
            reward.compute_rewards(RESPONSES, GOLDS, pool=pool)
        pool.score_fn = reward.score_one  # the workers in flight were drained: the pool is not left in a bad state
        for slot in range(pool.workers):
            pool._restart(slot)
        assert accuracies(pool) == EXPECTED
    jobs = [{"response": "r", "gold": "1", "choices": None, "scoring": reward.Scoring()}]
    with pytest.raises(reward.ScoringError, match=r"scoring response 0 \('r'\) raised TypeError"):
        reward.score_in_process(jobs, 5.0, score_fn=old_signature)


# ---------------------------------------------------------------------------------------------
# Huge exponents, time limits in process, deep JSON
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["1e400", "-1e400", "1e401", "9e308", "1.8e308", "1e99999999", "1e-99999999"])
def test_numbers_with_huge_exponents_are_refused_before_any_arithmetic(text):
    start = time.monotonic()
    assert reward.read_number(text) is None
    scores = reward.compute_rewards([f"\\boxed{{{text}}}"], ["1"], workers=0)
    assert scores[0]["accuracy"] == 0.0 and not scores[0]["timed_out"]
    assert time.monotonic() - start < 5.0  # 10^99999999 alone takes minutes to build


def test_numbers_at_the_exponent_limit_still_read():
    assert reward.read_number("1e300").value == 10**300
    assert reward.read_number("1.5e-400").places == 401
    assert float(reward.read_number("1.7e308").value) == 1.7e308
    assert reward.is_equivalent("2.5e3", "2500")


def slow_in_python(response, gold, choices=None, scoring=reward.Scoring()):
    if response == "SLOW":
        time.sleep(3600)
    return reward.score_one(response, gold, choices, scoring)


def test_in_process_scoring_is_bounded_in_time():
    jobs = [{"response": r, "gold": "1", "choices": None, "scoring": reward.Scoring()} for r in ("\\boxed{1}", "SLOW")]
    start = time.monotonic()
    scores = reward.score_in_process(jobs, 0.5, score_fn=slow_in_python)
    assert time.monotonic() - start < 5.0
    assert [(s["accuracy"], s["timed_out"]) for s in scores] == [(1.0, False), (0.0, True)]
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no timer left running
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL  # the handler put back
    # the real scorer on an expression sympy works on for long (10^8!): cut at the limit, not after
    # Math-Verify's own verify timeout (3 s), and counted as timed out
    start = time.monotonic()
    (cut,) = reward.compute_rewards(["<answer>\\boxed{100000000!}</answer>"], ["3"], workers=0, timeout_s=1.0)
    assert cut["timed_out"] and time.monotonic() - start < 2.5


def test_cli_with_workers_0_is_bounded_and_reads_huge_exponents(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    rows = [
        {"response": "<answer>\\boxed{100000000!}</answer>", "answer": "3"},
        {"response": "<answer>\\boxed{1e400}</answer>", "answer": "1"},
        {"response": "<answer>\\boxed{1e99999999}</answer>", "answer": "1"},
        {"response": "<answer>\\boxed{2}</answer>", "answer": "2"},
    ]
    preds.write_text("".join(reward.json.dumps(r) + "\n" for r in rows))
    start = time.monotonic()
    reward.main([str(preds), "--workers", "0", "--timeout-s", "1"])
    assert time.monotonic() - start < 10.0
    out = capsys.readouterr().out
    assert "accuracy   0.2500" in out and "timeouts   1" in out


def test_predictions_nested_too_deeply_are_a_line_naming_file_and_line(tmp_path, capsys):
    preds = tmp_path / "preds.jsonl"
    good = '{"response": "\\\\boxed{1}", "answer": "1"}'
    preds.write_text(good + "\n" + "[" * 100_000 + "]" * 100_000 + "\n" + '{"a": ' * 100_000 + "1" + "}" * 100_000)
    rows, problems = reward.read_predictions(preds)
    assert [r["line"] for r in rows] == [1]
    assert problems == [f"{preds} line {n}: not valid JSON (nested too deeply at column 1)" for n in (2, 3)]
    reward.main([str(preds), "--workers", "0"])
    captured = capsys.readouterr()
    assert "accuracy   1.0000" in captured.out and "Traceback" not in captured.err
    assert captured.err.splitlines()[0] == problems[0]


def test_a_pool_of_0_workers_scores_in_process_under_its_limit():
    """grpo.py --reward-workers 0 and vas.py score --reward-workers 0: no process, the same time limit."""
    pool = reward.RewardPool(workers=0, timeout_s=0.5, score_fn=slow_in_python)
    jobs = [{"response": r, "gold": "1", "choices": None, "scoring": reward.Scoring()} for r in ("\\boxed{1}", "SLOW")]
    start = time.monotonic()
    scores = pool.map(jobs)
    pool.close()
    assert pool.procs == [] and time.monotonic() - start < 5.0
    assert [(s["accuracy"], s["timed_out"]) for s in scores] == [(1.0, False), (0.0, True)]
