"""Issue 28: checkpoint metadata never unpickled freely, pruning and resume that keep the newest complete
checkpoint, save errors in one line, exact integers, linear-time answer cleaning, bounded eval scoring,
unique per-sample result files, tar errors named, signals before the loop, FSDP2 generation without images."""

import datasets

from conftest import run_script
from data import toy


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
