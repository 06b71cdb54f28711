"""The model and its processor: loading a model of a supported family (mmr1/families.py) with the
attention kernel of this device (mmr1/attention.py), FSDP2 sharding, the one precision context, the
optimizer and its step."""

from __future__ import annotations

import math

import torch

from .attention import TORCH_VARLEN, attention_implementation, use_vision_varlen
from .dist import Dist
from .families import family_of


def load_model(name_or_path: str, device: torch.device, gradient_checkpointing: bool = False, trainable: bool = False):
    """A model of a supported family (families.FAMILIES; any other stops with one line naming them)
    from a hub id or a local folder, never with remote code. Frozen models (reference, evaluation) are
    bf16 on GPU; trainable ones keep fp32 master weights (an AdamW step of lr 1e-6 vanishes in bf16)
    and compute in bf16 on GPU through FSDP2's mixed precision (shard_model) or autocast. CPU: fp32."""
    from transformers import AutoModelForImageTextToText

    family_of(name_or_path)  # an unsupported model type: one line before any weight is read
    dtype = torch.bfloat16 if device.type == "cuda" and not trainable else torch.float32
    implementation = attention_implementation(device)
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=dtype, attn_implementation=implementation, trust_remote_code=False
    ).to(device)
    if implementation == TORCH_VARLEN:
        use_vision_varlen(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None):
    """The model's processor, left padding (generation), pixel range overridden when given; a model
    of an unsupported family stops here with one line (families.family_of), before any data is read."""
    from transformers import AutoProcessor

    family_of(name_or_path)
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
    # Sum the ranks' gradients (a plain SUM collective): each rank's loss is already its share of the
    # GLOBAL token mean (grpo.policy_loss_backward, sft.sft_loss), so the sum is the full-batch gradient.
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
    on a tiny blank image whose output is added times 0 when the call has no image, so the ranks'
    FSDP2 collectives line up (docs/gpu.md); values and gradients are unchanged. A forward whose tower
    already ran (generate() encodes the images before the prefill) gets no second run.
    """
    inner = model.model
    call = {"images": False, "vision_ran": False}  # this forward's images; the tower ran since the last text forward

    def note_images(module, args, kwargs):  # the VL model's forward: were images given to this call?
        encoded = kwargs.get("mm_encoder_outputs") or {}  # generate() encodes the images before the prefill
        given = (kwargs.get("pixel_values"), kwargs.get("pixel_values_videos"), *encoded.values())
        call["images"] = any(v is not None for v in given)

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
    pixels = torch.zeros(merge * merge, patch, device=device)  # (4, 1176 at a 14-px patch): one merged token
    grid = torch.tensor([[1, merge, merge]], device=device)  # (images, 3) t, h, w in patches
    out = inner.visual(pixels, grid_thw=grid)
    # mergers whose features feed the text layers directly (deepstack) take part in the step too
    extra = sum(f.sum() for f in getattr(out, "deepstack_features", None) or [])
    return out.pooler_output + 0.0 * extra


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
    AdamW creates it lazily in its first step, so the update is bit for bit the same; made before vLLM
    starts, so its start-up check sees the trainer's real footprint (docs/paper-scale.md). Parameters
    that already have state (a resumed optimizer) keep it."""
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32  # AdamW's step dtype
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")  # else AdamW keeps `step` on the host
        for p in group["params"]:
            if not p.requires_grad or optimizer.state[p]:
                continue
            state = optimizer.state[p]
            if on_device:
                state["step"] = torch.zeros((), dtype=torch.float32 if group.get("fused") else scalar, device=p.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=scalar)
            for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group.get("amsgrad") else ()):
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)


def autocast(device: torch.device) -> torch.autocast:
    """The one precision context of every forward: bf16 autocast on GPU (over fp32 master weights
    or bf16 frozen ones), plain fp32 on CPU. Without autocast's weight cache, which on one process keeps
    a bf16 copy of every fp32 weight, 2 bytes x parameters (6.9 GiB at 3B; docs/paper-scale.md)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)


def create_optimizer(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.999) over `params`; fused on CUDA (one kernel per step, and no full-size
    fp32 temporary: foreach AdamW's step makes one, 4 bytes x parameters on a rank, from
    `_foreach_sqrt` of the second moments), foreach on CPU (the numbers the CPU tests pin)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), fused=device.type == "cuda")


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
