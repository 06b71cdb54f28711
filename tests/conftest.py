"""Shared fixtures: a toy model and small toy data sets built once per test session."""

import os
import subprocess
import sys
import tempfile
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


def run_script(args: list[str], cwd: Path = ROOT, timeout: int = 300, torchrun: int = 0) -> subprocess.CompletedProcess:
    """Runs a stage script (optionally under torchrun with N CPU processes); fails with its output."""
    # a fresh launch: no torchrun variables inherited (an in-process vLLM engine of the test process
    # sets them for its own external launcher, and its port is taken)
    inherited = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env = {**inherited, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
               "--master_port", str(29500 + os.getpid() % 1000)] + args  # fmt: skip
    else:
        cmd = [sys.executable] + args
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


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
        return grpo_defaults.sft_model(toy_dir, shared / "toy-sft")


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
