"""Throughput and model FLOPs utilisation (MFU = FLOPs / (seconds x ranks x peak)) of a GRPO step, as
arithmetic from the model config: the text decoder only, pure functions, no CUDA. The formulas and what
is left out: docs/grpo.md ("Throughput and MFU")."""

from __future__ import annotations

import re


def _text_sizes(config) -> tuple[int, int, int, int, int, int, int]:
    """(hidden, layers, intermediate, heads, kv_heads, head_dim, vocab) of the text decoder of a
    Qwen2.5-VL config (its `text_config`) or of a plain Qwen2 config (the config itself)."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return (text.hidden_size, text.num_hidden_layers, text.intermediate_size, heads,
            text.num_key_value_heads, head_dim, text.vocab_size)  # fmt: skip


def matmul_params(config) -> int:
    """N: the matmul weights one token passes through in the text decoder (a count): per layer q, k, v, o
    (GQA) and the SwiGLU MLP, plus the lm_head (tied or not); no embeddings, norms or biases."""
    hidden, layers, intermediate, heads, kv_heads, head_dim, vocab = _text_sizes(config)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o + k, v
    mlp = 3 * hidden * intermediate  # gate, up, down
    return layers * (attention + mlp) + hidden * vocab


def flops_per_token(config, context: float, train: bool) -> float:
    """FLOPs of one token through the text decoder that attends to `context` positions:
    forward = 2 N + 4 x layers x heads x head_dim x context (N = matmul_params: the q.k scores and the
    weighted sum of v are the 4 x ...); train=True gives forward + backward = 3 x forward."""
    _, layers, _, heads, _, head_dim, _ = _text_sizes(config)
    forward = 2 * matmul_params(config) + 4 * layers * heads * head_dim * context
    return 3 * forward if train else forward


def causal_context_sum(lengths: list[int]) -> int:
    """Sum over all tokens of sequences of these lengths of the positions each attends to under a
    causal mask: token i (0-based) attends to i + 1, so a sequence of T tokens gives T (T + 1) / 2."""
    return sum(t * (t + 1) // 2 for t in lengths)


def mean_causal_context(lengths: list[int]) -> float:
    """Mean over all tokens of sequences of these lengths of the positions each attends to under a causal
    mask (0.0 for no tokens): attention FLOPs are linear in it, so a batch costs tokens x flops_per_token."""
    tokens = sum(lengths)
    return causal_context_sum(lengths) / tokens if tokens else 0.0


def step_flops(config, train_lengths: list[int], generated: list[tuple[int, int]], forward_passes: int,
               prefill_lengths: list[int] | None = None, updates: int = 1) -> dict[str, float]:  # fmt: skip
    """FLOPs of one GRPO step, {"update": ..., "rollout": ...}, over the sequences given (every rank's for
    the step's total). update: `updates` forward + backward passes and `forward_passes` forward-only ones
    (reference, old policy) over every token of `train_lengths` (prompt + response of each sequence).
    rollout: for each (prompt length P, response length R) in `generated`, its R tokens at positions
    P .. P+R-1, one forward each, plus the causal prefill of its prompt; `prefill_lengths` gives the
    prompt lengths actually prefilled when an engine shares a prompt's prefill (vLLM's prefix cache)."""
    prompts = [p for p, _ in generated] if prefill_lengths is None else prefill_lengths
    # --- update: the trained sequences, causal ---
    tokens, context = sum(train_lengths), mean_causal_context(train_lengths)
    train = flops_per_token(config, context, train=True)
    forward = flops_per_token(config, context, train=False)
    update = tokens * (updates * train + forward_passes * forward)
    # --- rollout: the prompts' prefill, then each response token with its KV cache ---
    prefill = sum(prompts) * flops_per_token(config, mean_causal_context(prompts), train=False)
    response_tokens = sum(r for _, r in generated)
    # positions attended by the response tokens: P+1 .. P+R, the whole sequence's less the prompt's
    attended = sum(causal_context_sum([p + r]) - causal_context_sum([p]) for p, r in generated)
    decode = response_tokens * flops_per_token(config, attended / max(response_tokens, 1), train=False)
    return {"update": float(update), "rollout": float(prefill + decode)}


# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s per GPU from NVIDIA's data sheets, keyed by
# fragments of torch.cuda.get_device_name(), matched as whole words, the longest first ("H100 PCIe" first).
PEAK_BF16_TFLOPS: dict[str, float] = {
    "B200": 2250.0,  # HGX B200 (1,000 W); GB200's B200 runs at 1,200 W: its own entry
    "GB200": 2500.0,
    "B100": 1750.0,
    "H200": 989.0,  # SXM (the H100's GH100 die, HBM3e)
    "H200 NVL": 835.0,
    "GH200": 989.0,
    "H100": 989.0,  # SXM5
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H800": 989.0,  # SXM
    "H800 PCIe": 756.0,
    "A100": 312.0,  # SXM4 and PCIe alike
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,  # not the A10G of AWS, a different clock: unknown here
}


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak in FLOP/s (not TFLOP/s) of the GPU named like torch.cuda.get_device_name()
    ("NVIDIA H200", "NVIDIA A100-SXM4-80GB"), from PEAK_BF16_TFLOPS; None when no fragment matches."""
    for fragment in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![a-z0-9]){re.escape(fragment)}(?![a-z0-9])", device_name, flags=re.IGNORECASE):
            return PEAK_BF16_TFLOPS[fragment] * 1e12
    return None


def mfu(flops: float, seconds: float, world_size: int, peak: float) -> float:
    """Model FLOPs utilisation: flops (the step's FLOPs summed over all ranks) / (seconds x world_size
    x peak), peak in FLOP/s per GPU (peak_flops). A fraction in [0, 1] for a correct count."""
    if seconds <= 0 or world_size <= 0 or peak <= 0:
        raise ValueError(f"mfu needs positive seconds, world_size and peak, got {seconds}, {world_size}, {peak}")
    return flops / (seconds * world_size * peak)
