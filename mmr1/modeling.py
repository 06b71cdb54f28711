"""The model and its processor: loading Qwen2.5-VL, choosing the attention kernel (flash-attn or
PyTorch's varlen kernel on GPU, `sdpa_varlen` on CPU), FSDP2 sharding, the one precision context
and the optimizer step."""

from __future__ import annotations

import math

import torch

from .dist import Dist


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
    `varlen_attn(q, k, v, cu_seq, cu_seq, max_len, max_len, window_size=(-1, 0))` (causal) over
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
    out, so the next fp32 linear takes it)."""
    from torch.nn.attention.varlen import varlen_attn

    dtype = kernel_dtype(q)
    out = varlen_attn(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        cu_seq,
        cu_seq,
        max_len,
        max_len,
        scale=scale,
        window_size=(-1, 0) if causal else (-1, -1),  # causal: no key after the query; else every key of the segment
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out if torch.is_autocast_enabled(q.device.type) else out.to(q.dtype)


def vision_varlen(module, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings=None, **kwargs):
    """Qwen2_5_VLVisionAttention.forward through ONE fused varlen call per block: every attention
    window (or, in the full-attention blocks, every image) is a segment of cu_seqlens, attended in
    both directions (window_size=(-1, -1)).

    transformers hands cu_seqlens to the attention function only when its name says "flash"; any
    other implementation gets one call per window (7B at 672x672: 1,012 SDPA calls per image and
    forward). hidden_states (N, hidden) -> (N, hidden); cu_seqlens (segments + 1,) int32 on the device,
    its longest segment read once per forward (BOUNDARIES). Installed by use_vision_varlen.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

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
    """Routes every vision block's attention of a Qwen2.5-VL through vision_varlen (models loaded with
    TORCH_VARLEN: CUDA without flash-attn; flash_attention_2 already gets one call per block)."""
    import types

    inner = model.model if hasattr(model, "model") else model
    for block in inner.visual.blocks:
        block.attn.forward = types.MethodType(vision_varlen, block.attn)


def register_packed_attention() -> None:
    """Makes VARLEN_SDPA and TORCH_VARLEN transformers attention implementations (their masks are
    SDPA's, used where they fall back to SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    for name, function in ((VARLEN_SDPA, sdpa_varlen), (TORCH_VARLEN, torch_varlen)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)


def load_model(name_or_path: str, device: torch.device, gradient_checkpointing: bool = False, trainable: bool = False):
    """Qwen2.5-VL from a hub id or a local folder, never with remote code.

    Frozen models (reference, evaluation) are bf16 on GPU. Trainable ones keep fp32 master
    weights everywhere (an AdamW step of lr 1e-6 vanishes in bf16) and compute in bf16 on GPU
    through FSDP2's mixed precision (shard_model) or autocast. CPU: fp32 throughout.
    """
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if device.type == "cuda" and not trainable else torch.float32
    implementation = attention_implementation(device)
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path,
        dtype=dtype,
        attn_implementation=implementation,
        trust_remote_code=False,
    ).to(device)
    if implementation == TORCH_VARLEN:
        use_vision_varlen(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The model's processor, left padding (generation), pixel range overridden when given."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    if min_pixels or max_pixels:
        size = dict(processor.image_processor.size)
        size["shortest_edge"] = min_pixels or size["shortest_edge"]
        size["longest_edge"] = max_pixels or size["longest_edge"]
        processor.image_processor.size = type(processor.image_processor.size)(**size)
    return processor


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one: vision blocks, then text decoder layers."""
    inner = model.model if hasattr(model, "model") else model
    return list(inner.visual.blocks) + list(inner.language_model.layers)


def shard_model(model, d: Dist):
    """FSDP2 (`fully_shard`) per decoder layer and at the root; a no-op on one process."""
    if not d.enabled:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if d.device.type == "cuda" and next(model.parameters()).dtype == torch.float32:  # fp32 master weights
        # cast_forward_inputs=False: the default casts every float input of every unit (pixel_values, rope
        # tables) to bf16; the one precision context (autocast) decides instead, as on one process.
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model.model.visual, **kwargs)  # patch embed + merger: a unit of its own, callable by itself
    fully_shard(model, reshard_after_forward=False, **kwargs)  # root: lm_head stays gathered for chunked log-probs
    # Sum the ranks' gradients instead of averaging them: each rank's loss is already its share of the
    # GLOBAL token mean (token sum / global token count; grpo.policy_loss_backward, sft.sft_loss), so the
    # sum is the full-batch gradient.
    # (A plain SUM collective: gloo has no pre-multiplied sum, and a factor of 1 needs none.)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    keep_vision_in_step(model)
    # FSDP2 initialises lazily on the first forward through the ROOT; generation can reach the
    # vision tower by itself first, so run one tiny text-only forward now.
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=d.device), use_cache=False, logits_to_keep=1)
    model.reshard()
    return model


def keep_vision_in_step(model) -> None:
    """Under FSDP2, makes every forward that is not a one-token decoding step run the vision tower,
    on a tiny blank image whose output is added times 0 when the call has no image.

    Every FSDP2 unit all-gathers its parameters in forward (and reduce-scatters in backward) as a
    collective: a rank whose micro-batch holds no image would skip the vision tower's 33 units
    while another rank runs them, and the ranks' collectives stop lining up (gloo: "Received data
    size doesn't match expected size"; NCCL: a hang). The dummy costs 4 patches through the tower;
    its zero contribution leaves values and gradients unchanged (the gradients it adds are zeros).
    A forward whose vision tower already ran (generate() encodes the images before the prefill, and
    the HF engine then runs blank_vision at that same place on an image-less rank) gets no second run.
    """
    inner = model.model
    call = {"images": False, "vision_ran": False}  # this forward's images; the tower ran since the last text forward

    def note_images(module, args, kwargs):  # Qwen2_5_VLModel.forward: were images given to this call?
        encoded = kwargs.get("mm_encoder_outputs") or {}  # generate() encodes the images before the prefill
        call["images"] = (
            kwargs.get("pixel_values") is not None
            or kwargs.get("pixel_values_videos") is not None
            or any(v is not None for v in encoded.values())
        )

    def note_vision(module, args, output):  # the tower ran (inside this forward, or before a prefill)
        call["vision_ran"] = True

    def run_vision(module, args, kwargs):  # the text model's forward, after the vision tower's place
        embeds = kwargs.get("inputs_embeds")
        ran, call["vision_ran"] = call["vision_ran"], False
        if call["images"] or ran or embeds is None or embeds.shape[1] <= 1:  # one token: a decoding step
            return None
        kwargs["inputs_embeds"] = embeds + 0.0 * blank_vision(model).sum().to(embeds.dtype)
        call["vision_ran"] = False
        return args, kwargs

    inner.register_forward_pre_hook(note_images, with_kwargs=True)
    inner.visual.register_forward_hook(note_vision)
    inner.language_model.register_forward_pre_hook(run_vision, with_kwargs=True)


def blank_vision(model) -> torch.Tensor:
    """(1, text hidden) output of the vision tower on a tiny blank image (one merged token, 4 patches):
    the tower's FSDP2 collectives on a rank that has no image where another rank has one."""
    inner = model.model
    vision = inner.visual.config
    merge = vision.spatial_merge_size
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    device = inner.get_input_embeddings().weight.device
    pixels = torch.zeros(merge * merge, patch, device=device)  # (4, 1176): one merged token's patches
    grid = torch.tensor([[1, merge, merge]], device=device)  # (images, 3) t, h, w in patches
    return inner.visual(pixels, grid_thw=grid).pooler_output


def generate_encodes_images_first(model) -> bool:
    """Whether `model.generate` runs the vision tower BEFORE the prefill forward (transformers passes the
    images' features to it as `mm_encoder_outputs`) instead of inside it."""
    supports = getattr(model, "_supports_mm_encoder_outputs", None)
    return bool(supports and supports())


def full_state_dict(model, d: Dist) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU state dict; a collective under FSDP2, so every rank must call it."""
    if not d.enabled:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model.reshard()  # the root keeps gathered tensors after a forward; state dicts want the shards

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def create_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates AdamW's state now (step 0, exp_avg and exp_avg_sq zeros shaped like each parameter,
    also max_exp_avg_sq with amsgrad) for every trainable parameter that has none yet, exactly as
    AdamW creates it lazily in its first step, so the update is bit for bit the same.

    Why: at 7B the state is 2 x fp32 per parameter (7.7 GiB per rank on 8 GPUs). Created lazily it
    first exists in step 1, after vLLM has sized its KV cache against the memory free at its start;
    created before vLLM starts, vLLM's start-up check sees the trainer's real footprint and a plan
    that does not fit fails in seconds, not hours into a run. Parameters that already have state
    (a resumed optimizer) keep it."""
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # AdamW's step dtype
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")  # else AdamW keeps `step` on the host
        for p in group["params"]:
            if not p.requires_grad or optimizer.state[p]:
                continue
            state = optimizer.state[p]
            state["step"] = (
                torch.zeros((), dtype=torch.float32 if group.get("fused") else scalar, device=p.device)
                if on_device
                else torch.tensor(0.0, dtype=scalar)
            )
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def autocast(device: torch.device) -> torch.autocast:
    """The one precision context of every forward: bf16 autocast on GPU (over fp32 master weights
    or bf16 frozen ones), plain fp32 on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The same dict with every tensor moved to `device`."""
    return {k: v.to(device) for k, v in batch.items()}


def clip_and_step(params, optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clips the gradient to `max_norm` (global L2 norm over all ranks under FSDP2), takes the
    optimizer step, clears the gradients; returns the norm before clipping. A non-finite norm
    (inf/NaN gradients) skips the step, so the weights stay finite (see guards.NonFiniteGuard)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP2
    if math.isfinite(norm):  # the same on every rank: the global norm
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
