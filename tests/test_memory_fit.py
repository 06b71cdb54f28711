"""The memory plan against the card (mmr1/memory.py): the terms the arithmetic missed (foreach AdamW's
step temporary, autocast's weight cache), the `fits` row, grpo.py's refusal before vLLM starts, and
scripts/plan_memory.py --measure on the toy (torch's MemTracker on fake tensors)."""

import sys
import types

import pytest
import torch

import grpo
from conftest import ROOT
from mmr1 import config, dist, memory

sys.path.insert(0, str(ROOT / "scripts"))
import plan_memory  # noqa: E402


def test_plan_counts_the_step_temporary_and_the_autocast_cache():
    """3B on one 80 GB card: with fused AdamW and no autocast cache (what the code does) the plan fits;
    foreach AdamW's temporary (4 B x params at the step) and autocast's bf16 copy of every fp32 weight
    (2 B x params, one process only) are the issue's missing terms, and with both it does not fit."""
    c3 = memory.qwen25_vl_config("3B")
    n = memory.parameter_counts(memory.shapes(c3))["total"]
    card = memory.CARDS_GIB["80GB"]
    shipped = memory.plan(c3, card, memory.RunSettings(world_size=1))
    old = memory.plan(c3, card, memory.RunSettings(world_size=1, fused_adamw=False, autocast_cache=True))
    assert shipped["AdamW step temporary (foreach)"] == 0 and shipped["autocast weight cache"] == 0
    assert old["AdamW step temporary (foreach)"] == pytest.approx(4 * n / memory.GIB)
    assert old["autocast weight cache"] == pytest.approx(2 * n / memory.GIB)
    assert shipped["fits"] and shipped["training peak"] <= card and not old["fits"] and old["training peak"] > card
    sharded = memory.plan(c3, card, memory.RunSettings(world_size=8, fused_adamw=False, autocast_cache=True))
    assert sharded["autocast weight cache"] == 0  # FSDP2 gathers bf16 weights: nothing to cast
    assert sharded["AdamW step temporary (foreach)"] == pytest.approx(4 * n / 8 / memory.GIB)


def test_fits_row_per_column():
    """7B: 8 ranks fit both cards; one 141 GB card does not (its training peak alone is 157 GiB)."""
    c7 = memory.qwen25_vl_config("7B")
    assert not memory.plan(c7, memory.CARDS_GIB["141GB"], memory.RunSettings(world_size=1))["fits"]
    table = memory.table({"7B": c7}, memory.CARDS_GIB, memory.RunSettings(world_size=1)).splitlines()
    assert "| fits | no | no |" in table
    assert "| fits | yes | yes |" in memory.table({"7B": c7}, memory.CARDS_GIB, memory.RunSettings()).splitlines()


def test_grpo_stops_before_vllm_starts_when_training_does_not_fit(tmp_path, monkeypatch):
    """grpo.py --preset paper with a 7B checkpoint on ONE 141 GB GPU: one line naming the training peak
    and what would fit, before any engine is made (rollout.make_engine is never reached)."""
    memory.qwen25_vl_config("7B").save_pretrained(tmp_path)
    card = types.SimpleNamespace(total_memory=int(memory.CARDS_GIB["141GB"] * memory.GIB))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    made = []
    monkeypatch.setattr(grpo.rollout, "make_engine", lambda *a, **k: made.append(a))
    cfg = config.parse_config(grpo.GRPOConfig, grpo.PRESETS, ["--preset", "paper", "--model", "m", "--data", "d"])
    one = dist.Dist(0, 1, 0, torch.device("cuda", 0))
    with pytest.raises(SystemExit) as e:
        grpo.make_engine(None, None, str(tmp_path), 0, None, cfg, one)
    message = str(e.value)
    assert message.startswith("error: memory plan: the training peak is 157.2 GiB per GPU")
    assert "139.7 GiB card with 1 rank(s); would fit: 2 GPUs of this card" in message and "\n" not in message
    assert made == []
    eight = dist.Dist(0, 8, 0, torch.device("cuda", 0))  # the same run on 8 of them starts (vLLM gets its share)
    grpo.make_engine(None, None, str(tmp_path), 0, None, cfg, eight)
    assert len(made) == 1


def test_measure_counts_the_toy_update_by_category(toy_dir):
    """--measure on the toy (one rank, fake tensors): parameters, gradients, AdamW state and the
    reference shard equal their arithmetic (4, 4, 8, 2 bytes x parameters); foreach AdamW adds
    exactly one fp32 copy at the step, fused nothing; autocast's cache adds a bf16 copy of the weights
    it casts (the linear layers: between 1 and 2 bytes x parameters, the embeddings and norms are not
    cast) to the forward."""
    from transformers import AutoConfig

    toy = AutoConfig.from_pretrained(toy_dir / "model")
    n = memory.parameter_counts(memory.shapes(toy))["total"]
    small = dict(world_size=1, tokens_per_micro_batch=64, max_prompt_length=32, max_response_length=32,
                 logprob_chunk=16)  # fmt: skip
    shipped = plan_memory.measure(toy, 1, memory.RunSettings(**small), images=1, image_px=112)
    old = plan_memory.measure(toy, 1, memory.RunSettings(**small, fused_adamw=False, autocast_cache=True),
                              images=1, image_px=112)  # fmt: skip
    for got in (shipped, old):
        b = got["backward"]
        assert b["Parameter"] == pytest.approx(4 * n / memory.GIB, rel=1e-3)
        assert b["Gradient"] == pytest.approx(4 * n / memory.GIB, rel=1e-3)
        assert b["Optstate"] == pytest.approx(8 * n / memory.GIB, rel=1e-3)  # + a 4-byte step count per tensor
        assert b["Other"] == pytest.approx(2 * n / memory.GIB, rel=1e-3)  # the reference's bf16 shard
    assert shipped["step"]["Optstate"] == shipped["backward"]["Optstate"]  # fused: no temporary
    assert old["step"]["Optstate"] - old["backward"]["Optstate"] == pytest.approx(4 * n / memory.GIB, rel=1e-3)
    cache = (old["backward"]["Activation"] - shipped["backward"]["Activation"]) * memory.GIB  # bytes
    assert 1 * n < cache < 2 * n


def test_measure_flag_refuses_unknown_sizes(capsys):
    for spec in ("13B:2", "7B", "3B:0"):
        with pytest.raises(SystemExit, match=f"error: --measure {spec}: give SIZE:RANKS with SIZE one of 3B, 7B"):
            plan_memory.main(["--measure", spec])
