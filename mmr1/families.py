"""The model families this project trains, and every place they differ, in one table.

A model's family is its config's `model_type`; the stages look it up here once, at load (an
unknown one stops with one line naming the supported families), and ask the Family what they
need; no other module decides anything by family (the published sizes to plan without a
download, memory.qwen25_vl_config and qwen3_vl_8b_config below, and the toy builders of
data/toy.py name theirs). What differs (checkpoint names, packing, vLLM's CPU build, the vision
tower's sizes), what does not, and why: docs/models.md, each checked on a tiny random model of the family
(`python -m data.toy --family F`, tests/test_families.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import InputError


@dataclass(frozen=True)
class Family:
    """What a stage needs to know about one model family (module docstring)."""

    name: str  # as the model cards write it
    legacy_checkpoint_names: bool  # saved / loaded by vLLM as model.x + visual.x (else the in-memory names)
    packs: bool  # packed (padding-free) rows are exact for it
    vision_varlen: bool  # attention.vision_varlen may replace its vision attention (CUDA without flash-attn)
    vllm_cpu: bool = True  # vLLM's CPU build (chunked prefill off: vllm_engine.vllm_platform_args) runs it
    vision_mlp_matrices: int = 2  # weight matrices of one vision block's MLP (3: gated)
    vision_width: str = "hidden_size"  # the vision config field of the tower's width
    vision_output: str = "out_hidden_size"  # ... of the merger's output width


FAMILIES = {  # model_type -> Family
    "qwen2_vl": Family("Qwen2-VL", legacy_checkpoint_names=True, packs=True, vision_varlen=True,
                       vision_width="embed_dim", vision_output="hidden_size"),
    "qwen2_5_vl": Family("Qwen2.5-VL", legacy_checkpoint_names=True, packs=True, vision_varlen=True,
                         vision_mlp_matrices=3),
    "qwen3_vl": Family("Qwen3-VL", legacy_checkpoint_names=False, packs=True, vision_varlen=True),
    "qwen3_5": Family("Qwen3.5", legacy_checkpoint_names=False, packs=False, vision_varlen=False, vllm_cpu=False),
}  # fmt: skip


def family(config) -> Family:
    """The Family of a transformers config (or a model: its `.config`); InputError naming the
    supported families for any other model type."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        supported = ", ".join(f"{f.name} ({t})" for t, f in FAMILIES.items())
        raise InputError(f"model type {model_type!r} is not supported; supported families: {supported}")
    return FAMILIES[model_type]


def family_of(name_or_path: str) -> Family:
    """The Family of a hub id or local folder, from its config alone (no weights read); InputError,
    one line, for an unreadable config or a model type not in FAMILIES."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:  # no config, or a model type this transformers does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{name_or_path}: cannot read its model config ({first})") from e
    return family(config)


def check_packing(name_or_path: str, packed: bool) -> Family:
    """The model's Family; InputError (one line, naming --no-pack) when packed rows are asked for a
    family they are not exact for."""
    fam = family_of(name_or_path)
    if packed and not fam.packs:
        raise InputError(
            f"{name_or_path} is {fam.name}: its linear-attention layers would carry state across the "
            "sequences of a packed row; run with --no-pack"
        )
    return fam


def check_vllm_cpu(name_or_path: str) -> None:
    """InputError (one line) for a model vLLM's CPU build cannot run as the CPU engine starts it."""
    fam = family_of(name_or_path)
    if not fam.vllm_cpu:
        raise InputError(
            f"{name_or_path} is {fam.name}: vLLM's CPU build needs chunked prefill for its linear-attention "
            "cache, which the CPU engine turns off (per-request seeds); use --engine hf on a CPU"
        )


def image_factor(processor) -> int:
    """Pixels per merged image token along one side: the image processor's patch_size x merge_size
    (14 x 2 = 28 for Qwen2-VL / Qwen2.5-VL, 16 x 2 = 32 for Qwen3-VL). Images are resized to
    multiples of it (images.resize_image) and an image of H x W such pixels is (H / f) * (W / f)
    tokens."""
    images = processor.image_processor
    return int(images.patch_size) * int(images.merge_size)


def checkpoint_name(fam: Family, name: str) -> str:
    """The on-disk (save_pretrained, vLLM loader) name of an in-memory transformers-5 parameter name:
    the legacy layout's 'model.visual.x' -> 'visual.x', 'model.language_model.x' -> 'model.x' for
    the families that use it; the same name for the others."""
    if not fam.legacy_checkpoint_names:
        return name
    for prefix, on_disk in (("model.visual.", "visual."), ("model.language_model.", "model.")):
        if name.startswith(prefix):
            return on_disk + name[len(prefix) :]
    return name


def vision_sizes(config) -> dict[str, int]:
    """The vision tower's sizes the memory plan needs, from a model config (or its dict form):
    v_hidden (tower width), v_intermediate (MLP width), v_depth (blocks), v_out (merger output),
    v_mlp (matrices per block MLP), v_mergers (patch mergers: 1 + deepstack), v_patch (values per
    patch), v_merge (patches per image token)."""
    fam = family(config)
    vision = config.vision_config
    width = getattr(vision, fam.vision_width)
    intermediate = getattr(vision, "intermediate_size", None) or width * vision.mlp_ratio
    return {
        "v_hidden": width,
        "v_intermediate": intermediate,
        "v_depth": vision.depth,
        "v_out": getattr(vision, fam.vision_output),
        "v_mlp": fam.vision_mlp_matrices,
        "v_mergers": 1 + len(getattr(vision, "deepstack_visual_indexes", None) or ()),
        "v_patch": vision.in_channels * vision.temporal_patch_size * vision.patch_size**2,
        "v_merge": vision.spatial_merge_size**2,
    }


# The published sizes of Qwen3-VL-8B-Instruct (its config.json), to plan its memory without a download.
QWEN3_VL_8B_TEXT = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                        tie_word_embeddings=False)  # fmt: skip
QWEN3_VL_8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                          spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=4096,
                          num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])  # fmt: skip


def qwen3_vl_8b_config():
    """A transformers Qwen3VLConfig with the published sizes of Qwen3-VL-8B-Instruct."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(text_config=dict(QWEN3_VL_8B_TEXT), vision_config=dict(QWEN3_VL_8B_VISION),
                         tie_word_embeddings=False)  # fmt: skip
