"""Shared fixtures: a toy model and small toy data sets built once per test session."""

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Each test process (one per pytest-xdist worker) gets its own datasets cache, inherited by the stage
# scripts it runs, before anything imports `datasets`: the door's tables of one worker never meet another's.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="mmr1-tests-datasets-")

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data import toy  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))  # CI runs with 1 and 2
SMALL = {"train": 96, "val": 24, "test": 24}
TORCHRUN_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory) -> Path:
    """A folder with model/ (the toy Qwen2.5-VL) and data/{rl,sft}/*.parquet (small splits)."""
    root = tmp_path_factory.mktemp("toy")
    toy.build_toy_model(root / "model", seed=0)
    toy.write_toy_data(root / "data", seed=0, sizes=SMALL)
    return root


@pytest.fixture(scope="session")
def toy_model(toy_dir):
    from mmr1.modeling import load_model, load_processor

    model = load_model(str(toy_dir / "model"), torch.device("cpu"))
    processor = load_processor(str(toy_dir / "model"))
    return model, processor


def launch(args: list[str], cwd: Path = ROOT, timeout: int = 300, torchrun: int = 0) -> subprocess.CompletedProcess:
    """Runs a stage script, `python script.py ...` or under torchrun with N CPU processes, with one
    thread; returns its exit status and output, whatever they are. Without torchrun the run is
    forked from tests/forkserver.py (MMR1_TESTS_FORK=0: a fresh interpreter)."""
    # a fresh launch: no torchrun variables inherited (an in-process vLLM engine of the test process
    # sets them for its own external launcher, and its port is taken)
    inherited = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env = {**inherited, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
               "--master_port", str(29500 + os.getpid() % 1000)] + args  # fmt: skip
    else:
        cmd = [sys.executable] + args
    if torchrun or os.environ.get("MMR1_TESTS_FORK") == "0":
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if not _SERVER or _SERVER[0].proc.poll() is not None:
        _SERVER[:] = [ForkServer(env)]
    return _SERVER[0].run(cmd, cwd, env, timeout)


def metric_records(out: Path) -> list[dict]:
    """A run's metrics.jsonl without the clock and throughput keys, which differ between any two runs."""
    from mmr1.config import read_jsonl

    return [{k: v for k, v in r.items() if not k.startswith(("time", "perf"))} for r in read_jsonl(out / "metrics.jsonl")]  # fmt: skip


def run_script(args: list[str], cwd: Path = ROOT, timeout: int = 300, torchrun: int = 0) -> subprocess.CompletedProcess:
    """launch(...) that must succeed; fails with its output."""
    proc = launch(args, cwd, timeout, torchrun)
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


class ForkServer:
    """tests/forkserver.py, started once per test process: `python script.py ...` runs forked from a
    process that has imported torch and transformers (about 5 s of each run's start-up). Set
    MMR1_TESTS_FORK=0 to start every run as a fresh interpreter instead."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "forkserver.py")], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        self.pending = b""
        assert self.reply(timeout=120) == "ready", "tests/forkserver.py did not start"

    def reply(self, timeout: float) -> str | None:
        """The server's next line (unbuffered reads: select sees every byte), None after `timeout` s."""
        import select

        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, "tests/forkserver.py exited"
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode()

    def run(self, cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """One run; on anything unexpected (an interrupt, a lost reply) the server is killed, so the
        next launch starts a new one rather than reading this run's late reply as its own."""
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"argv": cmd[1:], "cwd": str(cwd), "env": env, "stdout": str(out), "stderr": str(err)}
            try:
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
                pid = json.loads(self.reply(timeout=60))["pid"]
                done = self.reply(timeout)
                if done is None:
                    with contextlib.suppress(ProcessLookupError):  # it may end just now
                        os.killpg(pid, signal.SIGKILL)
                    self.reply(timeout=60)
                    raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
                return subprocess.CompletedProcess(cmd, json.loads(done)["status"], out.read_text(), err.read_text())
            except BaseException as e:
                if not isinstance(e, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait()  # so that launch sees it gone
                raise


_SERVER: list[ForkServer] = []  # this test process's server, started at its first launch


@atexit.register
def _stop_server() -> None:
    for server in _SERVER:  # end of input: the server's loop ends and it exits (or is killed)
        with contextlib.suppress(OSError):
            server.proc.stdin.close()
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
        server.proc.stdout.close()


@pytest.fixture(scope="session")
def toy_sft(toy_dir, tmp_path_factory) -> Path:
    """The toy model after 150 SFT steps (tests/golden/grpo_defaults.py:sft_model, ~20 s): in format and
    right about a quarter of the time, so GRPO groups have reward variance (the untrained toy has none).
    Built once per test run: pytest-xdist's workers share it, the first to ask builds it under a lock."""
    import fcntl

    sys.path.insert(0, str(ROOT / "tests" / "golden"))
    import grpo_defaults

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this run's folder, above the workers' own
    with open(shared / "toy-sft.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "toy-sft").is_dir():  # built aside and renamed: a failed build leaves nothing here
            building = shared / f"toy-sft-building-{os.getpid()}"
            grpo_defaults.sft_model(toy_dir, building)
            os.rename(building, shared / "toy-sft")
        return shared / "toy-sft" / "final"


# ---------------------------------------------------------------------------------------------
# References the tests compare the project's code with
# ---------------------------------------------------------------------------------------------


def prompt_texts(processor, rows: list[dict], fmt=None) -> list[str]:
    """Chat-templated prompt strings (ending in the assistant header) for RL/eval rows, one
    <|image_pad|> per image, straight from the chat template: what batches.build_prompt's text must be."""
    from mmr1.chat import PromptFormat, prompt_messages

    fmt = fmt or PromptFormat()
    return [
        processor.apply_chat_template(prompt_messages(r, fmt), tokenize=False, add_generation_prompt=True) for r in rows
    ]


def sft_cut_problem(inputs: dict, max_length: int, image_token_id: int) -> str | None:
    """batches.cut_problem read off one row's real, uncut sft_batch inputs (token ids and labels),
    the reference the door's header-only count (batches.sft_layout) is tested against."""
    from mmr1.batches import IGNORE_INDEX, cut_problem

    ids, labels = inputs["input_ids"][0], inputs["labels"][0]
    n = int(inputs["attention_mask"][0].sum())
    images_at = (ids[:n] == image_token_id).nonzero().flatten().tolist()
    labelled = (labels[:n] != IGNORE_INDEX).nonzero().flatten().tolist()
    return cut_problem(n, images_at[-1] if images_at else None, labelled[0] if labelled else None, max_length)
