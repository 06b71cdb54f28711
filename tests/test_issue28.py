"""Issue 28: checkpoint metadata never unpickled freely, pruning and resume that keep the newest complete
checkpoint, save errors in one line, exact integers, linear-time answer cleaning, bounded eval scoring,
unique per-sample result files, tar errors named, signals before the loop, FSDP2 generation without images."""

import os
import signal
import subprocess
import sys
import time

import datasets
import pytest
import torch

from conftest import ROOT, TORCHRUN_VARIABLES, run_script
from data import toy
from mmr1 import checkpoint, dist


def mixed_rl_data(folder, n_train: int = 2, n_val: int = 2):
    """train / val parquet files whose second half of rows has no image (text-only prompts), so under
    torchrun --nproc_per_node 2 (contiguous shards) rank 1's validation rows have none, and a rollout batch
    of 2 prompts gives one rank an image-less prompt."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        rows, _ = toy.make_rows(n, 0, split, "default", toy.SLIP_SHARE)
        for row in rows[n // 2 :]:
            row["problem"] = row["problem"].replace("<image>", "")
            row["images"] = []
        datasets.Dataset.from_list(rows).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def test_grpo_torchrun_hf_engine_rows_with_and_without_images(toy_dir, tmp_path):
    """Rank 1's validation rows and one rank's training prompt have no image: generation under FSDP2
    (HF engine, gloo) must run the vision tower on every rank in the prefill, or the ranks' all-gathers
    stop lining up ("Received data size doesn't match expected size")."""
    data = mixed_rl_data(tmp_path / "mixed")
    out = tmp_path / "run"
    args = ["grpo.py", "--model", str(toy_dir / "model"), "--data", f"{data}@train", "--val-data", f"{data}@val",
            "--output-dir", str(out), "--max-steps", "1", "--rollout-batch-size", "2", "--group-size", "2",
            "--max-response-length", "6", "--val-every", "1", "--reward-workers", "0", "--engine", "hf"]  # fmt: skip
    run_script(args, torchrun=2, timeout=600)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"val/accuracy"' in lines[0] and '"val/accuracy"' in lines[1]


def test_stop_before_training_exits_0_when_signalled(capsys):
    previous = {sig: signal.getsignal(sig) for sig in checkpoint.Preemption.SIGNALS}
    one = dist.Dist(0, 1, 0, torch.device("cpu"))
    try:
        preemption = checkpoint.Preemption()
        preemption.stop_before_training(one, "sft", "loading")  # no signal: goes on
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(SystemExit) as stopped:
            preemption.stop_before_training(one, "sft", "loading")
        assert stopped.value.code == 0
        assert "[sft] SIGTERM during loading: exiting before the first step" in capsys.readouterr().out
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_grpo_signal_during_the_initial_vas_scoring_exits_0_with_nothing_saved(toy_dir, tmp_path):
    """SIGUSR1 once the run has announced itself (models loaded, engine up), i.e. during the initial VAS
    scoring: before, no handler was installed yet and the signal killed the process."""
    data, out = toy_dir / "data" / "rl", tmp_path / "run"
    args = ["grpo.py", "--model", str(toy_dir / "model"), "--data", f"{data}@train", "--val-data", "",
            "--output-dir", str(out), "--max-steps", "2", "--train-limit", "8", "--rollout-batch-size", "2",
            "--group-size", "2", "--max-response-length", "8", "--vas", "--vas-rollouts", "2",
            "--reward-workers", "0", "--save-every", "1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "run.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        while "engine HFEngine" not in log.read_text():  # announce(): printed just before the initial scoring
            assert proc.poll() is None, log.read_text()[-4000:]
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(300)
    output = log.read_text()
    assert proc.returncode == 0, output[-4000:]
    assert "[grpo] SIGUSR1 during the initial scoring: exiting before the first step with nothing saved" in output
    assert not checkpoint.step_folders(out) and not (out / "final").exists()
    assert "train/loss" not in (out / "metrics.jsonl").read_text()


def load_get_mmr1_sft():
    import importlib.util

    spec = importlib.util.spec_from_file_location("get_mmr1_sft", ROOT / "scripts" / "get_mmr1_sft.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_get_mmr1_sft_truncated_partition_is_one_line_naming_it(tmp_path, suffix):
    import tarfile

    script, out = load_get_mmr1_sft(), tmp_path / "out"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.bin").write_bytes(bytes(range(256)) * 400)  # 100 KB, so a cut lands inside it
    out.mkdir()
    tar = out / f"images_part_3{suffix}"
    with tarfile.open(tar, "w:gz" if suffix == ".tar.gz" else "w") as archive:
        archive.add(tmp_path / "imgs", arcname="imgs")
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # an interrupted download
    with pytest.raises(SystemExit) as stopped:
        script.extract_partitions(out)
    message = str(stopped.value.code)
    assert message.startswith(f"error: {tar}: truncated or corrupt archive (") and "\n" not in message
    assert "re-download that partition" in message and not (out / f"{tar.name}.done").exists()


def test_get_mmr1_sft_refused_member_is_one_line_naming_the_partition(tmp_path):
    import io
    import tarfile

    script, out = load_get_mmr1_sft(), tmp_path / "out"
    out.mkdir()
    tar = out / "images_part_1.tar"
    with tarfile.open(tar, "w") as archive:
        info = tarfile.TarInfo("../escape.png")  # outside the output folder
        info.size = 3
        archive.addfile(info, io.BytesIO(b"png"))
    with pytest.raises(SystemExit) as stopped:
        script.extract_partitions(out)
    message = str(stopped.value.code)
    assert message.startswith(f"error: {tar}: refused member (OutsideDestinationError") and "\n" not in message
    assert not (tmp_path / "escape.png").exists() and not (out / f"{tar.name}.done").exists()
