"""The attention kernels of the trainable and frozen models: which one a model is loaded with
(flash-attn, PyTorch's fused varlen kernel, or per-sequence SDPA), and the two transformers attention
functions this project registers for packed (padding-free) rows, plus the vision tower's one-call
path. modeling.load_model loads models with attention_implementation's choice; docs/gpu.md has the table."""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import types

import torch

VARLEN_SDPA = "sdpa_varlen"  # per-sequence SDPA on packed rows: the CPU kernel, and the GPU's last resort
TORCH_VARLEN = "torch_varlen"  # torch.nn.attention.varlen.varlen_attn on packed rows (CUDA only)
PACKED_KERNELS = (VARLEN_SDPA, TORCH_VARLEN)  # find the sequences of a packed row themselves; no (N, N) mask


def attention_implementation(device: torch.device) -> str:
    """The attention kernel models are loaded with, fastest first: 'flash_attention_2' on a GPU where
    flash-attn imports; else TORCH_VARLEN on a GPU whose torch ships `torch.nn.attention.varlen`
    (torch >= 2.10, no flash-attn install needed); else VARLEN_SDPA (the CPU)."""
    if device.type == "cuda" and importable("flash_attn"):
        return "flash_attention_2"
    register_packed_attention()
    if device.type == "cuda" and importable("torch.nn.attention.varlen", "varlen_attn"):
        return TORCH_VARLEN
    return VARLEN_SDPA


def importable(module: str, name: str = "__name__") -> bool:
    """Whether the optional dependency `module` imports and holds `name` (flash-attn, torch's varlen, vLLM)."""
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def packed_starts(query: torch.Tensor, key: torch.Tensor, attention_mask, kwargs: dict) -> list[int] | None:
    """Start offsets of the sequences of a packed row, then N: [0, s_1, ..., N]; None when this call
    is no packed causal self-attention (a mask is given, batch > 1, no text position_ids, or keys of
    another length: padded batches, generation with a KV cache, the vision tower).

    query (B, heads, N, D), key (B, kv_heads, N_k, D); position_ids (1, N) text positions that
    restart at 0 at the first token of each sequence (logprobs.pack writes them), read once per forward."""
    positions = kwargs.get("position_ids")
    n = query.shape[2]
    packed = attention_mask is None and positions is not None and query.shape[0] == 1 and key.shape[2] == n
    if not packed or positions.numel() != n:
        return None
    return BOUNDARIES.read(positions, lambda: (positions.reshape(-1) == 0).nonzero().flatten().tolist() + [n])


class BoundaryCache:
    """The last few boundary reads (each a device-to-host sync), keyed by the very tensor read from:
    every layer of one forward gets the same position_ids / cu_seqlens tensor, so one read per forward
    (docs/gpu.md). Holds its keys alive; a key written in place since (version counter) is read again."""

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
    query's own when it is fp16/bf16, else bf16. Under autocast Qwen2.5-VL's rotary embedding returns
    fp32 q and k beside a bf16 v; transformers' flash_attention_2 path casts the same way."""
    if torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def sdpa_varlen(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs):
    """transformers attention function: SDPA, but on a packed row (packed_starts) causal attention
    runs over each sequence on its own, as flash-attention's varlen kernel does on GPU.

    query (1, heads, N, D), key / value (1, kv_heads, N, D); returns ((1, N, heads, D), None). Exact:
    the same as SDPA under the packed row's block-diagonal causal mask, at sum(L_i^2) rather than N^2
    cost. Everything else (padded batches, generation, the vision tower) goes to SDPA unchanged."""
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
    """transformers attention function: a packed row through PyTorch's fused varlen kernel, causal
    (fused_varlen), with cu_seq (S + 1,) int32 = [0, L_1, ..., N] from the text positions.

    query (1, heads, N, D), key / value (1, kv_heads, N, D) -> ((1, N, heads, D), None). What is not a
    packed row goes to SDPA as in sdpa_varlen; the vision tower has its own path (vision_varlen)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = packed_starts(query, key, attention_mask, kwargs)
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # `starts` is the cached list itself, the same object in every layer: its device copy is made once too
    cu_seq = BOUNDARIES.read(starts, lambda: torch.tensor(starts, dtype=torch.int32, device=query.device))
    max_len = max(e - s for s, e in zip(starts[:-1], starts[1:]))
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (N, heads, D) each
    out = fused_varlen(q, k, v, cu_seq, max_len, getattr(module, "scaling", None), causal=True)
    return out[None], None  # (1, N, heads, D)


def fused_varlen(q, k, v, cu_seq: torch.Tensor, max_len: int, scale: float | None, causal: bool) -> torch.Tensor:
    """torch.nn.attention.varlen.varlen_attn over (N, heads, D) q and (N, kv_heads, D) k, v, the same
    boundaries for queries and keys, q, k, v cast to kernel_dtype. Returns (N, heads, D), cast back to
    the query's dtype when autocast is off. Causal: window (-1, 0); not causal (the vision tower): window
    (max_len, max_len), full attention within each segment that keeps the call off cuDNN (docs/gpu.md).
    `enable_gqa` goes only to a varlen_attn that takes it (torch 2.13 and later)."""
    from torch.nn.attention import varlen

    dtype = kernel_dtype(q)
    window = (-1, 0) if causal else (max_len, max_len)
    gqa = {"enable_gqa": q.shape[1] != k.shape[1]} if takes_keyword(varlen.varlen_attn, "enable_gqa") else {}
    cast = [t.to(dtype) for t in (q, k, v)]  # the kernel refuses fp32 or mixed dtypes
    out = varlen.varlen_attn(*cast, cu_seq, cu_seq, max_len, max_len, scale=scale, window_size=window, **gqa)
    return out if torch.is_autocast_enabled(q.device.type) else out.to(q.dtype)


@functools.lru_cache(maxsize=8)
def takes_keyword(function, name: str) -> bool:
    """Whether `function`'s signature has a parameter `name` (read once per function)."""
    return name in inspect.signature(function).parameters


def vision_varlen(module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings=None, **kwargs):
    """A vision block's attention forward (Qwen-VL layout: qkv, vision rotary, proj) through ONE fused
    varlen call per block: every attention window (or image, in the full-attention blocks) is a
    segment of cu_seqlens, attended both ways (fused_varlen, causal=False), where transformers would
    make one SDPA call per window (docs/gpu.md). hidden_states (N, hidden) -> (N, hidden); cu_seqlens
    (segments + 1,) int32 on the device, its longest segment read once per forward (BOUNDARIES)."""
    apply_rotary_pos_emb_vision = sys.modules[type(module).__module__].apply_rotary_pos_emb_vision  # its model's own
    n = hidden_states.shape[0]
    qkv = module.qkv(hidden_states).reshape(n, 3, module.num_heads, -1)
    q, k, v = qkv.permute(1, 0, 2, 3).unbind(0)  # (N, heads, D) each
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    max_len = BOUNDARIES.read(cu_seqlens, lambda: int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    out = fused_varlen(q, k, v, cu_seqlens.to(torch.int32), max_len, module.scaling, causal=False)
    return module.proj(out.reshape(n, -1))


def use_vision_varlen(model) -> None:
    """Routes every vision block's attention through vision_varlen (models loaded with TORCH_VARLEN),
    for the families whose vision attention it fits (families.Family.vision_varlen)."""
    from .families import family

    if not family(model.config).vision_varlen:
        return
    inner = model.model if hasattr(model, "model") else model
    for block in inner.visual.blocks:
        block.attn.forward = types.MethodType(vision_varlen, block.attn)


def packed_row_mask(*, batch_size: int, q_length: int, kv_length: int, q_offset=0, attention_mask=None, **kwargs):
    """The mask function of VARLEN_SDPA and TORCH_VARLEN (transformers' sdpa_mask keywords): None for one
    row with no padding mask and no cache (a packed row, or one whole sequence), whose sequences the
    kernel reads from the text positions itself (packed_starts); SDPA's mask for everything else
    (padded batches, generation)."""
    from transformers.masking_utils import sdpa_mask

    no_cache = isinstance(q_offset, int) and q_offset == 0 and kv_length == q_length
    if batch_size == 1 and attention_mask is None and no_cache:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     attention_mask=attention_mask, **kwargs)  # fmt: skip


def register_packed_attention() -> None:
    """Makes VARLEN_SDPA and TORCH_VARLEN transformers attention implementations, with
    packed_row_mask as their mask function (SDPA's mask where they fall back to SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, function in ((VARLEN_SDPA, sdpa_varlen), (TORCH_VARLEN, torch_varlen)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, packed_row_mask)
