"""tests/forkserver.py: a run forked from the server is the run a fresh interpreter makes."""

import json
import os
import subprocess
import time

import pytest

from conftest import launch

PROBE = """import atexit, json, os, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                  "omp": os.environ["OMP_NUM_THREADS"], "stdin": sys.stdin.read()}))
atexit.register(lambda: print("atexit ran", file=sys.stderr))
if sys.argv[1] == "raise":
    raise ValueError("boom")
sys.exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("how", ["0", "3", "raise"])
def test_a_forked_run_equals_a_fresh_interpreters(tmp_path, monkeypatch, how):
    """argv, working directory, sys.path[0], __main__, the environment, an empty stdin, atexit, the exit
    status (sys.exit, and 1 with a traceback for an uncaught exception): all as `python script.py`."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    forked = launch([str(script), how], cwd=tmp_path)
    monkeypatch.setenv("MMR1_TESTS_FORK", "0")
    fresh = launch([str(script), how], cwd=tmp_path)
    assert forked.returncode == fresh.returncode == {"0": 0, "3": 3, "raise": 1}[how]
    assert forked.stdout == fresh.stdout
    assert json.loads(forked.stdout) == {"argv": [str(script), how], "cwd": str(tmp_path), "path0": str(tmp_path),
                                         "name": "__main__", "omp": "1", "stdin": ""}  # fmt: skip
    assert forked.stderr.endswith("atexit ran\n") and fresh.stderr.endswith("atexit ran\n")
    if how == "raise":
        assert "Traceback" in forked.stderr and "ValueError: boom" in forked.stderr


def test_a_run_past_its_timeout_is_killed_and_the_server_goes_on(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(600)\n")
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        launch([str(script)], cwd=tmp_path, timeout=2)
    pid = int(timed_out.value.output)
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # killed and reaped
    (tmp_path / "ok.py").write_text("print('next')\n")
    assert launch([str(tmp_path / "ok.py")], cwd=tmp_path).stdout == "next\n"
