"""Runs stage scripts in forked copies of one Python process that has already imported their libraries.

A stage-script run on the toy spends about 5 of its ~10 s importing torch and transformers. The
server (one per test process) imports them once and computes nothing before it forks (no torch
thread pool exists yet; pyarrow's allocator starts one background thread, which fork does not copy
and which jemalloc handles). It forks a child per run, which becomes that run: its own working
directory, environment, argv and stdout / stderr files, the script executed as `__main__` (runpy),
and Python's normal exit (atexit, flushes, the exit status).

What differs from `python script.py`: the imports were done before the fork, with the environment of
the server's start (the variables a library reads at import are the test process's); state those
imports created is the same in every run of one server (the string hash seed, numpy's global
random state before a script seeds it, warnings already shown at import); argv[0] is absolute. The
stage scripts and `mmr1` are not imported before the fork. Tests that need a fresh interpreter (the
golden runs, torchrun, the signal tests) start one.

Protocol, one JSON line each way: {"argv", "cwd", "env", "stdout", "stderr"} in; {"pid"} back at
once (so a run past its timeout can be killed), then {"status"} (the exit status as subprocess
reports it: negative for a signal).
"""

import json
import os
import sys

PRELOAD = (
    "torch",
    "numpy",
    "PIL.Image",
    "datasets",
    "safetensors.torch",
    "transformers",
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "transformers.models.qwen2_vl.image_processing_qwen2_vl",
)


def child(request: dict) -> None:
    """In the forked child: becomes the run (never returns; Python exits as after `python script.py`)."""
    import runpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    files = (os.devnull, os.O_RDONLY), (request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for fd, (path, flags) in enumerate(files + ((request["stderr"], files[1][1]),)):
        target = os.open(path, flags, 0o644)  # in place of the server's request and reply pipes
        os.dup2(target, fd)
        os.close(target)
    script = os.path.abspath(request["argv"][0])
    sys.argv = [script, *request["argv"][1:]]
    sys.path[0] = os.path.dirname(script)  # as `python script.py` sets it
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def serve() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # an optional family or library: the run imports what it needs itself
    requests, replies = sys.stdin, sys.stdout
    replies.write("ready\n")
    replies.flush()
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.setsid()  # its own process group: a kill reaches the run and its helpers, not the server
            child(request)
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
