"""The attention kernels of the trainable and frozen models: which one a model is loaded with
(flash-attn, PyTorch's fused varlen kernel, or per-sequence SDPA), and the two transformers attention
functions this project registers for packed (padding-free) rows, plus the vision tower's one-call
path. modeling.load_model loads models with attention_implementation's choice."""

from __future__ import annotations

import functools
import inspect

import torch


def attention_implementation(device: torch.device) -> str:
    """The attention kernel models are loaded with, fastest first:

    'flash_attention_2' on a GPU where flash-attn imports; else TORCH_VARLEN on a GPU whose torch
    ships `torch.nn.attention.varlen` (the flash-attention-2 kernel compiled into PyTorch >= 2.10,
    no flash-attn install needed); else VARLEN_SDPA (PyTorch SDPA run over each sequence of a packed
    row on its own: the CPU, and the per-sequence fallback on GPU).
    """
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
        if torch_varlen_available():
            register_packed_attention()
            return TORCH_VARLEN
    register_packed_attention()
    return VARLEN_SDPA


VARLEN_SDPA = "sdpa_varlen"  # per-sequence SDPA on packed rows: the CPU kernel, and the GPU's last resort
TORCH_VARLEN = "torch_varlen"  # torch.nn.attention.varlen.varlen_attn on packed rows (CUDA only)
PACKED_KERNELS = (VARLEN_SDPA, TORCH_VARLEN)  # find the sequences of a packed row themselves; no (N, N) mask


def torch_varlen_available() -> bool:
    """Whether this torch ships varlen_attn (torch >= 2.10; it raises NotImplementedError off CUDA)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        return True
    except ImportError:
        return False


def packed_starts(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict) -> list[int] | None:
    """Start offsets of the sequences of a packed row, then N: [0, s_1, ..., N]; None when this call
    is no packed causal self-attention (a mask is given, batch > 1, no text position_ids, or keys of
    another length: padded batches, generation with a KV cache, the vision tower).

    query (B, heads, N, D), key (B, kv_heads, N_k, D); position_ids (1, N) text positions that
    restart at 0 at the first token of each sequence (logprobs.pack writes them). Reading the
    boundaries is a host sync; every decoder layer of one forward gets the same position tensor,
    so they are read once per forward (BOUNDARIES)."""
    positions = kwargs.get("position_ids")
    n = query.shape[2]
    if attention_mask is not None or positions is None or query.shape[0] != 1 or key.shape[2] != n:
        return None
    if positions.numel() != n:
        return None
    return BOUNDARIES.read(positions, lambda: (positions.reshape(-1) == 0).nonzero().flatten().tolist() + [n])


class BoundaryCache:
    """The last boundary read of a forward, keyed by the very tensor it was read from.

    transformers hands the SAME position_ids tensor to every decoder layer (and the vision tower the
    same cu_seqlens tensor to every block of one kind), and activation checkpointing replays the
    forward with those same tensors; so one read (one device-to-host copy, a sync) per tensor and
    forward replaces one per layer. The cache holds its key alive, so a later tensor can never be
    mistaken for it, and a tensor written in place since (its version counter moved) is read again;
    it keeps the last few keys (text positions and the boundary list read from them, vision windows,
    whole images).
    """

    def __init__(self, size: int = 8):
        self.size, self.entries = size, []

    def read(self, key: object, compute):
        """compute() the first time `key` is seen (of the last `size` keys), its stored result after."""
        version = getattr(key, "_version", None)  # torch bumps it on every in-place write
        for k, v, value in self.entries:
            if k is key and v == version:
                return value
        value = compute()
        self.entries = [(key, version, value)] + self.entries[: self.size - 1]
        return value


BOUNDARIES = BoundaryCache()


def kernel_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype a flash kernel gets q, k and v in: the autocast dtype when autocast is on, else the
    query's own when it is fp16/bf16, else bf16 (the kernel takes fp16/bf16 only, all three equal).

    Needed because with fp32 master weights under autocast Qwen2.5-VL's text rotary embedding
    returns fp32 q and k while v stays bf16; transformers' flash_attention_2 path casts the same way
    (integrations/flash_attention.get_target_dtype)."""
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def sdpa_varlen(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """transformers attention function: SDPA, but on a packed row (batch 1, no mask, text
    position_ids restarting at 0 per sequence) causal attention runs over each sequence on its
    own, as flash-attention's varlen kernel does on GPU.

    query (1, heads, N, D), key / value (1, kv_heads, N, D); returns ((1, N, heads, D), None).
    Exact: the same as SDPA under the block-diagonal causal mask transformers builds for packed
    rows, at sum(L_i^2) rather than N^2 cost (with that mask a packed toy micro-batch took up to
    2x the padded time on CPU). Everything else (padded batches, generation, the vision tower) goes
    to transformers' SDPA unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = packed_starts(query, key, attention_mask, kwargs)
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if len(starts) <= 2:  # one sequence: plain causal attention
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    parts = [
        sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, **kwargs)[0]
        for s, e in zip(starts[:-1], starts[1:])
    ]
    return torch.cat(parts, dim=1), None


def torch_varlen(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """transformers attention function: a packed row through PyTorch's fused varlen kernel.

    query (1, heads, N, D), key / value (1, kv_heads, N, D) -> ((1, N, heads, D), None). One call of
    `varlen_attn(q, k, v, cu_seq, cu_seq, max_len, max_len, window_size=(-1, 0))` (causal, fused_varlen) over
    (N, heads, D) tensors in kernel_dtype, cu_seq (S + 1,) int32 the sequence boundaries
    [0, L_1, L_1 + L_2, ..., N] read from the text positions (once per forward), as flash-attn's
    varlen kernel gets them from transformers. What is not a packed row (padded batches,
    generation) goes to SDPA as in sdpa_varlen; the vision tower has its own path (vision_varlen).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = packed_starts(query, key, attention_mask, kwargs)
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # `starts` is the cached list itself, the same object in every layer: its device copy is made once too
    cu_seq, max_len = BOUNDARIES.read(starts, lambda: boundary_tensor(starts, query.device))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, heads, D) each
    out = fused_varlen(q, k, v, cu_seq, max_len, getattr(module, "scaling", None), causal=True)
    return out[None], None  # (1, N, heads, D)


def boundary_tensor(starts: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
    """(cu_seq (S + 1,) int32 on `device`, longest sequence) of boundaries [0, ..., N] (host ints)."""
    return torch.tensor(starts, dtype=torch.int32, device=device), max(e - s for s, e in zip(starts[:-1], starts[1:]))


def fused_varlen(q, k, v, cu_seq: torch.Tensor, max_len: int, scale: float | None, causal: bool) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn over (N, heads, D) q and (N, kv_heads, D) k, v, the same
    boundaries for queries and keys; q, k, v cast to kernel_dtype (the kernel refuses fp32 or mixed
    dtypes). Returns (N, heads, D), cast back to the query's dtype when autocast is off (fp32 in, fp32
    out, so the next fp32 linear takes it).

    Causal: window (-1, 0), no key after the query. Not causal (the vision tower): window
    (max_len, max_len), which covers every key of the query's segment, so it is full attention within
    each segment; torch sends (-1, -1) calls with max_q > 128 in bf16 to cuDNN on sm90 / sm100, which
    builds and keeps one graph per new shape, while a window keeps them on the flash-attention-2
    kernel. `enable_gqa` goes only to a varlen_attn that takes it (torch 2.13 and later; torch 2.11's
    has none, and its flash-attention-2 kernel takes fewer key / value heads as they are)."""
    from torch.nn.attention import varlen

    dtype = kernel_dtype(q)
    gqa = {"enable_gqa": q.shape[1] != k.shape[1]} if takes_keyword(varlen.varlen_attn, "enable_gqa") else {}
    out = varlen.varlen_attn(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        cu_seq,
        cu_seq,
        max_len,
        max_len,
        scale=scale,
        window_size=(-1, 0) if causal else (max_len, max_len),
        **gqa,
    )
    return out if torch.is_autocast_enabled(q.device.type) else out.to(q.dtype)


@functools.lru_cache(maxsize=8)
def takes_keyword(function, name: str) -> bool:
    """Whether `function`'s signature has a parameter `name` (read once per function)."""
    return name in inspect.signature(function).parameters


def vision_varlen(module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings=None, **kwargs):
    """A vision block's attention forward (Qwen-VL layout: qkv, vision rotary, proj; families.Family.
    vision_varlen says which models have it) through ONE fused varlen call per block: every
    attention window (or, in the full-attention blocks, every image) is a segment of cu_seqlens,
    attended in both directions (fused_varlen with causal=False: a window that covers the longest segment).

    transformers hands cu_seqlens to the attention function only when its name says "flash"; any
    other implementation gets one call per window (7B at 672x672: 1,012 SDPA calls per image and
    forward). hidden_states (N, hidden) -> (N, hidden); cu_seqlens (segments + 1,) int32 on the device,
    its longest segment read once per forward (BOUNDARIES). Installed by use_vision_varlen.
    """
    import sys

    apply_rotary_pos_emb_vision = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision  # its model's own
    n = hidden_states.shape[0]
    q, k, v = (
        module.qkv(hidden_states).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    )  # (N, heads, D)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    max_len = BOUNDARIES.read(cu_seqlens, lambda: int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    out = fused_varlen(q, k, v, cu_seqlens.to(torch.int32), max_len, module.scaling, causal=False)
    return module.proj(out.reshape(n, -1))


def use_vision_varlen(model) -> None:
    """Routes every vision block's attention through vision_varlen (models loaded with TORCH_VARLEN:
    CUDA without flash-attn; flash_attention_2 already gets one call per block), for the families
    whose vision attention it fits (families.Family.vision_varlen); the others keep their own."""
    import types

    from .families import family

    if not family(model.config).vision_varlen:
        return
    inner = model.model if hasattr(model, "model") else model
    for block in inner.visual.blocks:
        block.attn.forward = types.MethodType(vision_varlen, block.attn)


def packed_row_mask(*, batch_size: int, q_length: int, kv_length: int, q_offset=0, attention_mask=None, **kwargs):
    """The mask function of VARLEN_SDPA and TORCH_VARLEN: None for one row with no padding mask and
    no cache (a packed row, or one whole sequence), whose sequences the kernel reads from the text
    positions itself (packed_starts); SDPA's mask for everything else (padded batches, generation).

    Spares every model family the (N, N) block-diagonal mask transformers builds for a packed row
    whose model makes its own mask from attention_mask=None (masking_utils.create_causal_mask)."""
    from transformers.masking_utils import sdpa_mask

    no_cache = isinstance(q_offset, int) and q_offset == 0 and kv_length == q_length
    if batch_size == 1 and attention_mask is None and no_cache:
        return None
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        attention_mask=attention_mask,
        **kwargs,
    )


def register_packed_attention() -> None:
    """Makes VARLEN_SDPA and TORCH_VARLEN transformers attention implementations, with
    packed_row_mask as their mask function (SDPA's mask where they fall back to SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, function in ((VARLEN_SDPA, sdpa_varlen), (TORCH_VARLEN, torch_varlen)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, packed_row_mask)
