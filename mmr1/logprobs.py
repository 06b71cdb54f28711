"""Per-token log-probs of sequences under the policy: the naive definition first, then the chunked
version every stage uses (no full-vocabulary log-softmax in memory) and the packed (padding-free) one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import PACKED_KERNELS
from .modeling import autocast


def naive_token_logprobs(model, inputs: dict[str, torch.Tensor], temperature: float = 1.0):
    """The definition: log-probs (B, T-1) of input_ids[:, 1:] under log_softmax(logits / T), and the
    entropies (B, T-1) in nats of those distributions.

    Materialises the (B, T, V) logits in fp32 (0.6 GB for a 1k-token sequence at 151,936 words), which
    is why the stages use token_logprobs below; the tests tie the two."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    logp_all = (logits[:, :-1].float() / temperature).log_softmax(-1)  # (B, T-1, V)
    logp = logp_all.gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# --- Chunked: the same numbers without the (T, V) log-softmax ---


def hidden_states(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T, H) final (post-norm) hidden states of the decoder for the given model inputs: the whole
    model runs (FSDP2's root hooks, the model's own rope index over the image inputs) but makes one
    logit only; the hidden states are caught on their way out of the inner model."""
    caught = {}
    hook = model.model.register_forward_hook(lambda m, a, out: caught.__setitem__("h", out.last_hidden_state))
    try:
        model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return caught["h"]


def _chunk_logprobs(
    weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, entropy: bool, temperature: float
):
    logits = torch.nn.functional.linear(hidden, weight).float() / temperature  # (B, C, V), C positions at a time
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    ent = lse - (logits.softmax(-1) * logits).sum(-1) if entropy else torch.zeros_like(logp)  # H = lse - E_p[logit]
    return logp, ent


def logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024,
                         entropy: bool = False,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Log-probs (B, T) in fp32 of `targets` (B, T) under softmax(hidden (B, T, H) @ weight.T (V, H) / temperature).

    temperature: that of the sampler (the ratio, the KL and the entropy are those of the distribution
    the rollouts sample from). lm_head + logsumexp run over chunks of `chunk_size` positions, each under
    activation checkpointing, so peak memory grows with chunk_size x V instead of T x V. Entropies
    (B, T), in nats, are zeros unless entropy=True (they carry no gradient)."""
    if temperature <= 0:
        raise ValueError(f"log-probs need a positive temperature, got {temperature}")
    logps, ents = [], []
    for s in range(0, hidden.shape[1], chunk_size):
        chunk = (weight, hidden[:, s : s + chunk_size], targets[:, s : s + chunk_size], entropy, temperature)
        if torch.is_grad_enabled():
            lp, ent = torch.utils.checkpoint.checkpoint(_chunk_logprobs, *chunk, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*chunk)
        logps.append(lp)
        ents.append(ent.detach())
    return torch.cat(logps, 1), torch.cat(ents, 1)


def token_logprobs(model, inputs: dict[str, torch.Tensor], chunk_size: int = 1024, entropy: bool = False,
                   temperature: float = 1.0, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Log-probs (B, T-1) in fp32 of input_ids[:, 1:] given the prefix under softmax(logits /
    temperature), and entropies (B, T-1) of that distribution.

    The decoder runs once to hidden states; the vocabulary projection is chunked (see
    logprobs_from_hidden), so the full (T, V) log-softmax never exists. packed=True runs the same
    computation on the micro-batch's sequences packed into one row (pack): equal values on every
    real target, zeros on padding, no decoder or lm_head compute on a single pad token.
    """
    targets = inputs["input_ids"][:, 1:]
    if not packed:
        hidden = hidden_states(model, inputs)[:, :-1]
        return logprobs_from_hidden(hidden, model.lm_head.weight, targets, chunk_size, entropy, temperature)
    rows = pack(model, inputs)
    hidden = hidden_states(model, rows.inputs)[0, rows.source]  # (M, H): positions that predict a real target
    targets = targets[rows.valid][None]  # (1, M) in the same order
    logp, ent = logprobs_from_hidden(hidden[None], model.lm_head.weight, targets, chunk_size, entropy, temperature)
    return unpack(logp[0], rows), unpack(ent[0], rows)


def batch_logprobs(model, inputs: dict[str, torch.Tensor], device: torch.device, *args, **kwargs):
    """token_logprobs(model, inputs, *args, **kwargs) of a CPU batch: moved to `device`, run under the
    precision context. Every training and scoring forward of the stages goes through here."""
    with autocast(device):
        return token_logprobs(model, {k: v.to(device) for k, v in inputs.items()}, *args, **kwargs)


# --- Packed (padding-free) sequences ---
# A right-padded micro-batch (B, T) spends compute on B*T - sum(L_b) pad tokens; packing puts the B
# sequences back to back in ONE row of N = sum(L_b) tokens. Rope positions are the model's own per
# sequence; attention stays inside each sequence through a fourth, 1-D "text position" row that
# restarts at 0 per sequence (position_ids (4, 1, N), no attention_mask), from which transformers and
# the packed kernels (attention.py) read the sequence boundaries. Why this is exact: docs/grpo.md.

PACKED_ATTENTION = (*PACKED_KERNELS, "sdpa", "eager", "flash_attention_2", "flash_attention_3")  # with a packed path


@dataclass
class Packed:
    """A padded micro-batch put into one row, and the way back.

    inputs: model inputs of the packed row: input_ids (1, N), position_ids (4, 1, N) (text
    positions, then the temporal / height / width rope positions), mm_token_type_ids
    (1, N), and pixel_values / image_grid_thw unchanged. valid: (B, T-1) bool, the positions of the
    padded layout whose target input_ids[:, t+1] is a real token of the same sequence. source: (M,)
    with M = valid.sum(), the packed position whose hidden state predicts each valid target, in
    the row-major order of valid; no source is a sequence's last token, so no target crosses into
    the next sequence.
    """

    inputs: dict[str, torch.Tensor]
    valid: torch.Tensor
    source: torch.Tensor


def pack(model, inputs: dict[str, torch.Tensor]) -> Packed:
    """Packs padded model inputs (B, T) (input_ids, attention_mask, optional mm_token_type_ids,
    pixel_values, image_grid_thw; each row's real tokens contiguous: right or left padding) into
    one row of N = attention_mask.sum() tokens; see Packed."""
    implementation = model.config._attn_implementation
    if implementation not in PACKED_ATTENTION:
        raise ValueError(f"packed sequences need one of {PACKED_ATTENTION} attention, the model uses {implementation}")
    ids, real = inputs["input_ids"], inputs["attention_mask"].bool()  # (B, T)
    mm = inputs.get("mm_token_type_ids")
    mm = torch.zeros_like(ids) if mm is None else mm
    # (3, B, T) rope positions of each sequence on its own, from the model's own function
    rope, _ = model.model.get_rope_index(ids, mm, image_grid_thw=inputs.get("image_grid_thw"), attention_mask=real)
    text = real.long().cumsum(1) - 1  # (B, T): 0, 1, ..., L_b - 1 over each row's real tokens
    positions = torch.cat([text[None].to(rope.device), rope])[:, real]  # (4, N), sequences back to back
    packed = {"input_ids": ids[real][None], "position_ids": positions[:, None], "mm_token_type_ids": mm[real][None]}
    packed.update({k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs})
    # no attention_mask: the packed kernels' mask function then builds none (attention.packed_row_mask),
    # flash-attention reads the boundaries from the text positions, SDPA / eager get the block-diagonal mask
    valid = real[:, :-1] & real[:, 1:]  # (B, T-1): token t and its target t + 1 both real
    index = real.flatten().long().cumsum(0).view_as(ids) - 1  # (B, T): packed position of each real token
    return Packed(packed, valid, index[:, :-1][valid])


def unpack(values: torch.Tensor, packed: Packed) -> torch.Tensor:
    """(B, T-1) padded layout of per-target values (M,) given in the order of packed.valid; zeros
    where there is no target (padding). Differentiable."""
    return values.new_zeros(packed.valid.shape).masked_scatter(packed.valid, values)
