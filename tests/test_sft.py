"""sft.py end to end on the toy: one process, torchrun x2 (same weights as one process), resume."""

import json

import torch
from safetensors.torch import load_file

import sft
from conftest import run_script


def toy_args(toy_dir, out, steps, *extra):
    data = toy_dir / "data"
    return ["sft.py", "--model", str(toy_dir / "model"), "--data", f"{data / 'sft'}@train",
            "--val-data", f"{data / 'sft'}@val", "--acc-data", f"{data / 'rl'}@val", "--output-dir", str(out),
            "--max-steps", str(steps), "--batch-size", "8", "--micro-batch-size", "4", "--acc-limit", "8",
            "--acc-max-new-tokens", "8", "--val-limit", "8", "--eval-every", "2", *extra]  # fmt: skip


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_lr_schedule_warmup_then_cosine():
    values = [sft.lr_lambda(s, 100, 10) for s in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0 and values[10] == 1.0
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert abs(sft.lr_lambda(55, 100, 10) - 0.5) < 1e-9


def test_global_batches_walk_a_permutation_per_epoch():
    batches = [sft.global_batch(s, 10, 4, seed=1) for s in range(5)]  # 20 rows = 2 epochs
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert batches == [sft.global_batch(s, 10, 4, seed=1) for s in range(5)]


def test_sft_script_trains_and_saves(toy_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    run_script(toy_args(toy_dir, tmp_path / "run", 3))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3]
    assert lines[0]["train/loss"] > lines[2]["train/loss"]
    assert "val/loss" in lines[1] and "val/accuracy" in lines[-1]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "run" / "final")
    assert model.config.model_type == "qwen2_5_vl"


def test_freeze_vision_keeps_the_vision_tower(toy_dir, tmp_path):
    run_script(
        toy_args(toy_dir, tmp_path / "run", 2, "--acc-limit", "-1", "--freeze-vision", "--gradient-checkpointing")
    )
    init, final = weights(toy_dir / "model"), weights(tmp_path / "run" / "final")
    vision = [n for n in init if ".visual." in n or n.startswith("visual.")]
    assert vision and all(torch.equal(init[n], final[n]) for n in vision)
    assert any(not torch.equal(init[n], final[n]) for n in init if n not in vision)


def test_torchrun_two_ranks_matches_one_process(toy_dir, tmp_path):
    """Two ranks compute the one-process step: same loss, same gradient (norm), and weights within
    what AdamW's first step allows.

    What is exactly comparable is the first step's loss and gradient: both runs start from the same
    weights, and only the summation order differs (fp32, a few thousand terms: relative error
    ~1e-6). The weights after the step are not: AdamW's first update is lr * g / (|g| + eps), about
    lr * sign(g), so a gradient element within reduction noise of 0 may move by +lr in one run and
    -lr in the other. Every element moves by at most lr (weight decay 0), so they differ by <= 2 lr.
    """
    lr = 2e-3
    run_script(toy_args(toy_dir, tmp_path / "one", 1, "--acc-limit", "-1", "--lr", str(lr), "--warmup-ratio", "0"))
    run_script(toy_args(toy_dir, tmp_path / "two", 1, "--acc-limit", "-1", "--lr", str(lr), "--warmup-ratio", "0"),
               torchrun=2)  # fmt: skip
    (a,), (b,) = ([json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in x] for run in ("one", "two"))  # fmt: skip
    assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5 * a["train/loss"]
    assert abs(a["train/grad_norm"] - b["train/grad_norm"]) <= 1e-4 * a["train/grad_norm"]
    one, two, init = (
        weights(tmp_path / "one" / "final"),
        weights(tmp_path / "two" / "final"),
        weights(toy_dir / "model"),
    )
    assert one.keys() == two.keys()
    for name in one:
        assert (one[name] - two[name]).abs().max() <= 2 * lr * (1 + 1e-3), name
        assert (one[name] - init[name]).abs().max() <= lr * (1 + 1e-3), name  # the bound the argument uses
    assert any(not torch.equal(one[n], init[n]) for n in one)


def test_stopped_then_resumed_equals_uninterrupted(toy_dir, tmp_path):
    run_script(toy_args(toy_dir, tmp_path / "full", 4, "--acc-limit", "-1"))
    # killed after step 3, one step past its last checkpoint (step 2)
    partial = toy_args(toy_dir, tmp_path / "cut", 4, "--acc-limit", "-1", "--save-every", "2", "--stop-after", "3")
    run_script(partial)
    assert (tmp_path / "cut" / "step-2" / "trainer_state.pt").exists()
    assert not (tmp_path / "cut" / "final").exists()
    out = run_script(toy_args(toy_dir, tmp_path / "cut", 4, "--acc-limit", "-1", "--resume"))
    assert "resumed" in out.stdout + out.stderr
    full, resumed = weights(tmp_path / "full" / "final"), weights(tmp_path / "cut" / "final")
    for name in full:
        assert torch.allclose(full[name], resumed[name], atol=1e-6), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # step 3 of the killed run was dropped, then redone once


def test_paper_preset_is_table_5():
    import common

    cfg = common.parse_config(sft.SFTConfig, sft.PRESETS, ["--preset", "paper", "--model", "m", "--data", "d"])
    expected = dict(epochs=3.0, max_steps=0, lr=1e-5, warmup_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0,
                    batch_size=32, max_length=16384, min_pixels=7056, max_pixels=1048576)  # fmt: skip
    assert {k: getattr(cfg, k) for k in expected} == expected
