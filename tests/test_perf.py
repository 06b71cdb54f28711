"""mmr1.perf: the FLOPs of a token and of a GRPO step against hand counts, the peak table, MFU."""

from types import SimpleNamespace

import pytest

from mmr1.perf import flops_per_token, matmul_params, mean_causal_context, mfu, peak_flops, step_flops

# The tiny text decoder of the tests: hidden 64, 2 layers, MLP 96, 4 heads of 16 (hidden / heads),
# 2 KV heads (GQA: k and v are 2 x 16 = 32 wide), vocabulary 100.
H, L, MLP, HEADS, KV, D, V = 64, 2, 96, 4, 2, 16, 100


def tiny_vl_config():
    """A transformers Qwen2_5_VLConfig with the tiny text decoder above (its vision tower unused)."""
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=H, num_hidden_layers=L, intermediate_size=MLP, num_attention_heads=HEADS,
                num_key_value_heads=KV, vocab_size=V, tie_word_embeddings=False)  # fmt: skip
    return Qwen2_5_VLConfig(text_config=text)


def hand_n() -> int:
    """N by listing every matrix a token passes through, (in, out) each."""
    layer = [
        (H, HEADS * D),  # q
        (H, KV * D),  # k
        (H, KV * D),  # v
        (HEADS * D, H),  # o
        (H, MLP),  # gate
        (H, MLP),  # up
        (MLP, H),  # down
    ]
    return L * sum(a * b for a, b in layer) + H * V  # + lm_head


def hand_forward(context: float) -> float:
    """2 N + the q.k scores and the weighted sum of v: 2 x heads x head_dim x context FLOPs each, per layer."""
    return 2 * hand_n() + L * 2 * (2 * HEADS * D * context)


def test_matmul_params_equals_the_matrices_listed_by_hand():
    # per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12,288; MLP 3 x 64x96 = 18,432; 2 layers
    # = 61,440; lm_head 64x100 = 6,400: N = 67,840
    assert hand_n() == 67_840
    assert matmul_params(tiny_vl_config()) == 67_840


def test_flops_per_token_forward_and_train_by_hand():
    config = tiny_vl_config()
    # forward at context 10: 2 x 67,840 + 4 x 2 layers x 4 heads x 16 x 10 = 135,680 + 5,120
    assert flops_per_token(config, 10, train=False) == hand_forward(10) == 140_800
    assert flops_per_token(config, 10, train=True) == 3 * 140_800  # forward + backward = 3 x forward
    assert flops_per_token(config, 0, train=False) == 2 * 67_840  # no attention: the 2N rule


def test_flops_per_token_reads_a_plain_config_and_an_explicit_head_dim():
    """A Qwen2-style config without text_config is read as the text config; head_dim, when given, is
    used rather than hidden / heads (here 32 against 64 / 4 = 16)."""
    plain = SimpleNamespace(hidden_size=H, num_hidden_layers=L, intermediate_size=MLP, num_attention_heads=HEADS,
                            num_key_value_heads=KV, vocab_size=V, head_dim=None)  # fmt: skip
    assert matmul_params(plain) == hand_n()
    wide = SimpleNamespace(**{**vars(plain), "head_dim": 32})
    layer = H * HEADS * 32 * 2 + H * KV * 32 * 2 + 3 * H * MLP  # q, o; k, v; MLP
    assert matmul_params(wide) == L * layer + H * V
    assert flops_per_token(wide, 5, train=False) == 2 * (L * layer + H * V) + 4 * L * HEADS * 32 * 5


def test_qwen25_vl_7b_text_decoder_has_about_7_07e9_matmul_parameters():
    """By hand, Qwen2.5-VL-7B's text decoder (hidden 3584, 28 layers, MLP 18944, 28 heads of 128, 4 KV
    heads, vocabulary 152064, untied): per layer q and o 3584 x 3584 = 12,845,056 each, k and v
    3584 x 512 = 1,835,008 each, MLP 3 x 3584 x 18944 = 203,685,888: 233,046,016; x 28 layers =
    6,525,288,448; lm_head 3584 x 152064 = 544,997,376; N = 7,070,285,824 (about 7.07e9)."""
    from mmr1.memory import qwen25_vl_config

    n = matmul_params(qwen25_vl_config("7B"))
    assert n == pytest.approx(7_070_285_824, rel=0.01)
    assert n == 7_070_285_824  # the formula is exact, not just close


def test_mean_causal_context_by_hand():
    assert mean_causal_context([1]) == 1.0  # one token, attends to itself
    assert mean_causal_context([3]) == 2.0  # (1 + 2 + 3) / 3
    assert mean_causal_context([2, 4]) == pytest.approx(13 / 6)  # (1 + 2 + 1 + 2 + 3 + 4) / 6
    assert mean_causal_context([]) == 0.0


def brute_force_step(train_lengths, generated, forward_passes, prefills) -> dict[str, float]:
    """step_flops token by token: token i of a trained sequence attends to i + 1 positions, costs
    3 forwards (policy) + one per extra pass; a prompt token of a prefill likewise; a response token
    at position p (after its prompt of P tokens) attends to p + 1."""
    update = rollout = 0.0
    for length in train_lengths:
        for i in range(length):
            update += (3 + forward_passes) * hand_forward(i + 1)
    for p in prefills:
        for i in range(p):
            rollout += hand_forward(i + 1)
    for p, r in generated:
        for position in range(p, p + r):
            rollout += hand_forward(position + 1)
    return {"update": update, "rollout": rollout}


def test_step_flops_equals_a_loop_over_tokens():
    config = tiny_vl_config()
    generated = [(5, 3), (5, 7), (9, 1), (9, 4)]  # two prompts of 5 and 9 tokens, two responses each
    train_lengths = [p + r for p, r in generated]
    got = step_flops(config, train_lengths, generated, forward_passes=2)
    want = brute_force_step(train_lengths, generated, 2, prefills=[5, 5, 9, 9])  # a prefill per response
    assert got == pytest.approx(want, rel=1e-12)
    shared = step_flops(config, train_lengths, generated, forward_passes=0, prefill_lengths=[5, 9])
    assert shared == pytest.approx(brute_force_step(train_lengths, generated, 0, prefills=[5, 9]), rel=1e-12)
    assert step_flops(config, [], [], forward_passes=1) == {"update": 0.0, "rollout": 0.0}


def test_step_flops_update_is_train_flops_plus_a_forward_per_extra_pass():
    config = tiny_vl_config()
    # one sequence of 3 tokens: contexts 1, 2, 3, mean 2; policy train + reference forward = 4 forwards
    got = step_flops(config, [3], [(1, 2)], forward_passes=1)
    assert got["update"] == 3 * (3 * hand_forward(2) + hand_forward(2))
    # two updates per batch: two train passes, plus the reference and the old policy's forwards
    two = step_flops(config, [3], [(1, 2)], forward_passes=2, updates=2)
    assert two["update"] == 3 * (2 * 3 * hand_forward(2) + 2 * hand_forward(2))
    # rollout: prompt token at context 1, response tokens at contexts 2 and 3
    assert got["rollout"] == hand_forward(1) + hand_forward(2) + hand_forward(3)


def test_peak_flops_matches_device_names():
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_flops("NVIDIA H100 PCIe") == 756e12  # the longer fragment wins
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA L40") == 181e12  # not L40S, not L4
    assert peak_flops("NVIDIA B200") == 2250e12
    assert peak_flops("NVIDIA GB200") == 2500e12  # not B200
    assert peak_flops("nvidia h800") == 989e12  # case-insensitive


@pytest.mark.parametrize(
    "name", ["NVIDIA GeForce RTX 4090", "NVIDIA A10G", "NVIDIA H20", "Tesla V100-SXM2-16GB", "cpu"]
)
def test_peak_flops_is_none_for_unknown_cards(name):
    assert peak_flops(name) is None  # whole-word fragments: H20 is not H200, A10G is not A10


def test_mfu_arithmetic():
    # 4e15 FLOPs in 2 s on 4 GPUs of 1e15 FLOP/s: 4e15 / 8e15
    assert mfu(4e15, 2.0, 4, 1e15) == 0.5
    # one step of 8 H200s: 2.0e17 FLOPs in 60 s -> 2.0e17 / (60 x 8 x 989e12) = 0.4213
    assert mfu(2.0e17, 60.0, 8, peak_flops("NVIDIA H200")) == pytest.approx(2.0e17 / 4.7472e17)
    with pytest.raises(ValueError, match="positive"):
        mfu(1.0, 0.0, 1, 1e12)
