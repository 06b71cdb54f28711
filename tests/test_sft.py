"""sft.py end to end on the toy: one process, torchrun x2 (same weights as one process), resume."""

import json
import random

import torch

import sft
from conftest import run_script
from mmr1 import checkpoint, dist, modeling


def toy_args(toy_dir, out, steps, *extra):
    data_dir = toy_dir / "data"
    return ["sft.py", "--model", str(toy_dir / "model"), "--data", f"{data_dir / 'sft'}@train",
            "--val-data", f"{data_dir / 'sft'}@val", "--acc-data", f"{data_dir / 'rl'}@val", "--output-dir", str(out),
            "--max-steps", str(steps), "--batch-size", "8", "--micro-batch-size", "4", "--acc-limit", "8",
            "--acc-max-new-tokens", "8", "--val-limit", "8", "--eval-every", "2", *extra]  # fmt: skip


LR, STEPS = 2e-3, 3  # the toy SFT learning rate
SFT_ATOL = STEPS * LR * 1e-2  # see test_packed_sft_equals_padded


def weights(folder):
    """fp32 weights by module name: a checkpoint's master weights (its trainer/; the HF folder is
    bf16), or those of a model folder without one (the toy init)."""
    if (folder / "trainer").is_dir():
        return checkpoint.master_weights(folder)
    return modeling.load_model(str(folder), torch.device("cpu"), trainable=True).state_dict()


def test_lr_schedule_warmup_then_cosine():
    values = [sft.lr_lambda(s, 100, 10) for s in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0 and values[10] == 1.0
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert abs(sft.lr_lambda(55, 100, 10) - 0.5) < 1e-9


def test_global_batches_walk_a_permutation_per_epoch():
    seen = [sft.global_batch(s, 10, 4, seed=1) for s in range(5)]  # 20 rows = 2 epochs
    flat = [i for b in seen for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert seen == [sft.global_batch(s, 10, 4, seed=1) for s in range(5)]


def shuffled_per_position(step: int, n_rows: int, batch_size: int, seed: int) -> list[int]:
    """The order's definition, naively: each position's epoch permutation rebuilt from scratch."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, n_rows)
        perm = list(range(n_rows))
        random.Random(dist.derive_seed(seed, "sft-order", epoch)).shuffle(perm)
        out.append(perm[offset])
    return out


def test_global_batch_builds_each_epoch_order_once():
    """The same batches as rebuilding the permutation per position (so resume and every run made
    before keep their order), with one permutation built per epoch: 9 steps of 5 over 13 rows cross
    3 epoch boundaries and make 4 orders, not 45."""
    sft.epoch_order.cache_clear()
    fast = [sft.global_batch(s, 13, 5, seed=3) for s in range(9)]
    assert sft.epoch_order.cache_info().misses == 4
    assert fast == [shuffled_per_position(s, 13, 5, seed=3) for s in range(9)]
    assert all(type(i) is int for b in fast for i in b)
    assert sft.global_batch(7, 13, 5, seed=3) == fast[7]  # a resumed run: any step, from nothing but (step, seed)


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
    what AdamW's first step allows; packed by default, and with a 160-token budget (rows of 65-92
    tokens) under which each rank plans its own micro-batches and all agree on the largest count.
    Both two-rank runs are compared with one one-process run: how a step's sequences are grouped into
    micro-batches changes only the summation order (tests/test_packing.py: packed = padded).

    What is exactly comparable is the first step's loss and gradient: both runs start from the same
    weights, and only the summation order differs (fp32, a few thousand terms: relative error
    ~1e-6). The weights after the step are not: AdamW's first update is lr * g / (|g| + eps), about
    lr * sign(g), so a gradient element within reduction noise of 0 may move by +lr in one run and
    -lr in the other. Every element moves by at most lr (weight decay 0), so they differ by <= 2 lr.
    """
    lr = 2e-3
    args = ["--acc-limit", "-1", "--lr", str(lr), "--warmup-ratio", "0"]
    run_script(toy_args(toy_dir, tmp_path / "one", 1, *args))
    run_script(toy_args(toy_dir, tmp_path / "two", 1, *args), torchrun=2)
    run_script(toy_args(toy_dir, tmp_path / "budget", 1, *args, "--max-tokens-per-micro-batch", "160"), torchrun=2)
    init, one = weights(toy_dir / "model"), weights(tmp_path / "one" / "final")
    (a,) = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
    for run in ("two", "budget"):
        (b,) = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5 * a["train/loss"], run
        assert abs(a["train/grad_norm"] - b["train/grad_norm"]) <= 1e-4 * a["train/grad_norm"], run
        two = weights(tmp_path / run / "final")
        assert one.keys() == two.keys()
        for name in one:
            assert (one[name] - two[name]).abs().max() <= 2 * lr * (1 + 1e-3), (run, name)
    for name in one:
        assert (one[name] - init[name]).abs().max() <= lr * (1 + 1e-3), name  # the bound the argument uses
    assert any(not torch.equal(one[n], init[n]) for n in one)


def test_paper_preset_is_table_5():
    from mmr1 import config

    cfg = config.parse_config(sft.SFTConfig, sft.PRESETS, ["--preset", "paper", "--model", "m", "--data", "d"])
    expected = dict(epochs=3.0, max_steps=0, lr=1e-5, warmup_ratio=0.1, weight_decay=0.0, max_grad_norm=1.0,
                    batch_size=32, max_length=16384, min_pixels=7056, max_pixels=1048576)  # fmt: skip
    assert {k: getattr(cfg, k) for k in expected} == expected


def train_toy_steps(toy_dir, packed: bool) -> tuple[dict, dict]:
    """(initial, final) state dicts of STEPS AdamW steps of sft_loss on 8 toy rows each: packed
    micro-batches by a 200-token budget, or right-padded ones of 4 rows (grouped differently)."""
    from mmr1 import batches, dist, modeling, prepare

    d = dist.Dist(0, 1, 0, torch.device("cpu"))
    rows = prepare.load_rows(f"{toy_dir / 'data' / 'sft'}@train", "sft")[: 8 * STEPS]
    processor = modeling.load_processor(str(toy_dir / "model"))
    model = modeling.load_model(str(toy_dir / "model"), d.device, trainable=True)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for step in range(STEPS):
        batch = rows[step * 8 : (step + 1) * 8]
        micro = batches.sft_micro_batches(processor, batch, 3136, 50176, 0, 200 if packed else 0, 4, d)
        sft.sft_loss(model, micro, d, chunk=64, packed=packed)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return init, {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_packed_sft_equals_padded(toy_dir, monkeypatch):
    """SFT on the toy, packed vs padded: the same weights after a few steps, within fp32 noise.

    Tolerance: AdamW moves a weight by lr * m_hat / (sqrt(v_hat) + eps) per step, a function of the
    RATIOS of its gradients over steps, so a relative gradient error r moves it by about lr * r
    per step. Packed and padded gradients agree to 1e-5 of the largest entry (test_packing), but
    Adam's normalisation divides each entry by its own size, so entries whose gradient is within
    a few hundred ulps of zero get r up to ~1e-2. Hence SFT_ATOL = STEPS * lr * 1e-2 = 6e-5.
    A real leak (attention across packed sequences) is checked to land well above it.
    """
    from mmr1 import logprobs

    init, padded = train_toy_steps(toy_dir, packed=False)
    _, packed = train_toy_steps(toy_dir, packed=True)
    assert max_diff(padded, init) > 0.5 * LR  # the steps did move the weights
    assert max_diff(packed, padded) <= SFT_ATOL
    # the same run with the sequences of each packed row attending to each other (positions not restarting)
    real_pack = logprobs.pack

    def leaky_pack(model, inputs):
        out = real_pack(model, inputs)
        out.inputs["position_ids"][0] = torch.arange(out.inputs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(logprobs, "pack", leaky_pack)
    _, leaky = train_toy_steps(toy_dir, packed=True)
    assert max_diff(leaky, padded) > 10 * SFT_ATOL
