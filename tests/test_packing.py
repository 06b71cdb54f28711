"""Packed (padding-free) sequences: packed log-probs, entropies, losses and gradients equal the
padded ones; positions restart per sequence; micro-batches by token budget, as many on every rank."""

import math

import pytest
import torch

from conftest import prompt_texts
from data import toy
from mmr1 import batches, dist, logprobs
from mmr1.chat import PromptFormat

# fp32 on CPU. Packed and padded runs do the same arithmetic on every real token, only through
# matmuls of other shapes (N x H instead of B*T x H), so results differ by summation order alone:
# a few ulps of the largest intermediate (|logit| and |log-prob| < 30, fp32 ulp 2e-6 at 30).
# 1e-5 absolute on log-probs / entropies, and 1e-5 relative to the largest gradient entry for
# gradients (a sum over ~1e4 tokens of terms each off by ~1e-7 relative) leave margin and still
# catch any real leak: one attended neighbour or one shifted position moves values by >= 1e-2.
ATOL = 1e-5


def grid(colours=("red", "blue", "green", "yellow")):
    return toy.draw_grid(list(colours))


def text_ids(processor, n: int) -> list[int]:
    """n ordinary token ids (no special or image tokens) to stand in for a sampled response."""
    ids = processor.tokenizer.encode("the answer is four because I count the red squares", add_special_tokens=False)
    return (ids * (n // len(ids) + 1))[:n]


# images per sequence in one micro-batch: none at all, one each, and 2 / 1 / 0 mixed
IMAGE_PATTERNS = {"no-images": [0, 0, 0], "one-image": [1, 1, 1], "two-one-zero": [2, 1, 0]}


def rl_micro_batch(processor, pattern: list[int]):
    """Three sequences of very different lengths (about 350, 20-40 and 90 tokens)."""
    rows = [
        {"problem": "<image>" * k + q, "images": [grid(), grid(("blue", "red", "red", "green"))][:k]}
        for k, q in zip(pattern, ["Compare the squares.", "Hi", "How many red squares are there?"])
    ]
    responses = [text_ids(processor, 320), text_ids(processor, 1), text_ids(processor, 50)]
    return batches.rl_batch(processor, batches.build_prompts(processor, rows, PromptFormat(), 3136, 50176), responses)


def logprobs_and_grads(model, inputs, mask, packed: bool):
    """(log-probs, entropies, loss, flat gradient) of a GRPO-like loss: sum of A_b * logp over response tokens."""
    model.zero_grad()
    logp, ent = logprobs.token_logprobs(model, inputs, chunk_size=64, entropy=True, temperature=0.6, packed=packed)
    advantages = torch.tensor([1.0, -0.5, 2.0])[:, None]
    loss = -(advantages * logp * mask).sum() / mask.sum()
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    return logp.detach(), ent, loss.detach(), grad


@pytest.fixture(scope="module")
def sdpa_model(toy_dir):
    """The toy model under transformers' plain SDPA: packed rows get its block-diagonal causal mask."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(toy_dir / "model", attn_implementation="sdpa")


@pytest.mark.parametrize("pattern", list(IMAGE_PATTERNS))
@pytest.mark.parametrize("attention", ["sdpa_varlen", "sdpa"])
def test_packed_equals_padded(toy_model, sdpa_model, pattern, attention):
    """Log-probs, entropies, the loss and every parameter's gradient, packed vs padded, with the
    fast per-sequence SDPA (what the CPU runs) and with the block-diagonal mask (the reference)."""
    model, processor = toy_model
    model = model if attention == "sdpa_varlen" else sdpa_model
    assert model.config._attn_implementation == attention
    inputs, mask = rl_micro_batch(processor, IMAGE_PATTERNS[pattern])
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert max(lengths) > 8 * min(lengths) and (inputs["attention_mask"] == 0).any()
    padded = logprobs_and_grads(model, inputs, mask, packed=False)
    packed = logprobs_and_grads(model, inputs, mask, packed=True)
    valid = inputs["attention_mask"][:, :-1].bool() & inputs["attention_mask"][:, 1:].bool()
    assert torch.allclose(packed[0][valid], padded[0][valid], atol=ATOL, rtol=0)
    assert torch.allclose(packed[1][valid], padded[1][valid], atol=ATOL, rtol=0)
    assert (packed[0][~valid] == 0).all() and (packed[1][~valid] == 0).all()  # nothing on padding
    assert torch.allclose(packed[2], padded[2], atol=ATOL, rtol=0)
    scale = padded[3].abs().max()
    assert scale > 1e-2 and torch.allclose(packed[3], padded[3], atol=ATOL * scale, rtol=0)


def test_packed_attention_stays_inside_each_sequence(toy_model):
    """Changing one sequence changes nothing in the others (and the varlen path is not vacuous:
    the same row read as ONE sequence, positions not restarting, gives other values)."""
    model, processor = toy_model
    inputs, _ = rl_micro_batch(processor, [1, 0, 1])
    with torch.no_grad():
        before, _ = logprobs.token_logprobs(model, inputs, packed=True)
        changed = {k: v.clone() for k, v in inputs.items()}
        end = int(inputs["attention_mask"][0].sum())
        changed["input_ids"][0, end - 30 : end - 5] = torch.tensor(
            text_ids(processor, 40)[15:]
        )  # sequence 0's response
        after, _ = logprobs.token_logprobs(model, changed, packed=True)
        assert torch.equal(before[1:], after[1:]) and not torch.equal(before[0], after[0])
        packed = logprobs.pack(model, inputs)
        glued = dict(packed.inputs, position_ids=packed.inputs["position_ids"].clone())
        glued["position_ids"][0] = torch.arange(glued["input_ids"].shape[1])  # one long sequence
        glued.pop("attention_mask", None)
        hidden_glued = logprobs.hidden_states(model, glued)[0, packed.source]
        hidden = logprobs.hidden_states(model, packed.inputs)[0, packed.source]
        assert (hidden_glued - hidden).abs().max() > 1e-2


def test_pack_positions_restart_per_sequence(toy_model):
    """Each sequence's slice of the packed position_ids (4, 1, N) is what the model computes for
    that sequence alone: text positions 0..L-1, then Qwen2.5-VL's 3-D rope positions."""
    model, processor = toy_model
    inputs, _ = rl_micro_batch(processor, [2, 1, 0])
    packed = logprobs.pack(model, inputs)
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert packed.inputs["input_ids"].shape == (1, sum(lengths))
    assert packed.inputs["position_ids"].shape == (4, 1, sum(lengths))
    images = [0, 2, 3, 3]  # image index boundaries of the three sequences
    start = 0
    for b, n in enumerate(lengths):
        alone = inputs["input_ids"][b : b + 1, :n]
        grid_thw = inputs["image_grid_thw"][images[b] : images[b + 1]]
        rope, _ = model.model.get_rope_index(alone, inputs["mm_token_type_ids"][b : b + 1, :n],
                                             image_grid_thw=grid_thw if len(grid_thw) else None)  # fmt: skip
        positions = packed.inputs["position_ids"][:, 0, start : start + n]
        assert positions[0].tolist() == list(range(n))
        assert torch.equal(positions[1:], rope[:, 0])
        assert torch.equal(packed.inputs["input_ids"][0, start : start + n], alone[0])
        start += n
    # flash-attention (GPU) gets its varlen boundaries from the same first row: the sequence starts
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    (cu_seqlens, _), (max_length, _) = prepare_fa_kwargs_from_position_ids(packed.inputs["position_ids"][0])
    assert cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()] and max_length == max(lengths)
    # targets never cross a boundary: no source position is a sequence's last token
    ends = torch.tensor(lengths).cumsum(0) - 1
    assert not torch.isin(packed.source, ends).any() and len(packed.source) == sum(lengths) - len(lengths)


@pytest.mark.parametrize("max_tokens, max_seqs", [(100, 0), (100, 3), (250, 4), (0, 4)])
def test_plan_micro_batches_budget_and_cover(max_tokens, max_seqs):
    lengths = [int(x) for x in torch.randint(5, 90, (23,), generator=torch.Generator().manual_seed(1))] + [130]
    plan = batches.plan_micro_batches(lengths, max_tokens, max_seqs)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))  # every sequence exactly once
    assert all(b == sorted(b) for b in plan)
    if max_tokens:
        assert all(len(b) == 1 or sum(lengths[i] for i in b) <= max_tokens for b in plan)
        if lengths[23] > max_tokens:
            assert [b for b in plan if 23 in b] == [[23]]  # longer than the budget: alone
        if not max_seqs:  # first-fit decreasing uses at most 11/9 of the optimum + 1 (>= total / budget)
            assert len(plan) <= 11 / 9 * math.ceil(sum(lengths) / max_tokens) + 1
    else:
        assert plan == [list(range(s, min(s + 4, 24))) for s in range(0, 24, 4)]
    if max_seqs:
        assert all(len(b) <= max_seqs for b in plan)


def test_plan_micro_batches_same_count_on_every_rank(monkeypatch):
    """A rank whose sequences fit in fewer micro-batches than another rank needs splits its own
    (FSDP2: every rank must run as many forward/backward passes); budget still respected."""
    d = dist.Dist(0, 2, 0, torch.device("cpu"))
    short = [30] * 8  # fits in 2 micro-batches of 120 tokens
    assert len(batches.plan_micro_batches(short, 120, 0)) == 2
    monkeypatch.setattr(batches, "all_reduce_max", lambda value, device: max(value, 5))  # the other rank needs 5
    plan = batches.plan_micro_batches(short, 120, 0, d)
    assert len(plan) == 5 and sorted(i for b in plan for i in b) == list(range(8))
    assert sorted(len(b) for b in plan) == [1, 1, 2, 2, 2]  # balanced: 30 or 60 tokens each
    with pytest.raises(ValueError, match="cannot fill"):
        batches.plan_micro_batches([30] * 4, 120, 0, d)


def test_sft_micro_batches_equal_sft_batch(toy_model):
    """Rows processed one by one and collated give exactly sft_batch of the same rows."""
    _, processor = toy_model
    rows = [
        {"messages": [{"role": "user", "content": "<image><image>Which?"}, {"role": "assistant", "content": "A"}],
         "images": [grid(), grid(("blue", "blue", "red", "red"))]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}]},
        {"messages": [{"role": "user", "content": "<image>Count."}, {"role": "assistant", "content": "4"}],
         "images": [grid()]},
    ]  # fmt: skip
    (micro,) = batches.sft_micro_batches(processor, rows, 3136, 50176, 0, max_tokens=10_000, max_seqs=0)
    whole = batches.sft_batch(processor, rows, 3136, 50176)
    assert set(micro) == set(whole)
    for key in whole:
        assert torch.equal(micro[key], whole[key]), key


def test_packed_equals_padded_with_left_padding(toy_model):
    """Generation-style left-padded prompts (0, 1 and 2 images) pack to the same log-probs."""
    model, processor = toy_model
    rows = [{"problem": "<image><image>Which one has more red?", "images": [grid(), grid(("red",) * 4)]},
            {"problem": "Hi"}, {"problem": "<image>Count.", "images": [grid()]}]  # fmt: skip
    inputs = batches.processor_inputs(processor, prompt_texts(processor, rows), [r.get("images", []) for r in rows])
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padding
    with torch.no_grad():
        padded, _ = logprobs.token_logprobs(model, inputs)
        packed, _ = logprobs.token_logprobs(model, inputs, packed=True)
    valid = inputs["attention_mask"][:, :-1].bool() & inputs["attention_mask"][:, 1:].bool()
    assert torch.allclose(packed[valid], padded[valid], atol=ATOL, rtol=0) and (packed[~valid] == 0).all()
