"""The memory plan of a colocated GRPO run on one GPU, as arithmetic from the model config and the
run's settings: what the trainer holds in each phase, what is left for vLLM, and the
`gpu_memory_utilization` that fits. Printed by scripts/plan_memory.py (docs/paper-scale.md holds the
table); grpo.py takes its share for vLLM from here unless --gpu-memory-utilization is given.

Two phases on every rank: rollout (trainer resident + vLLM awake, its share u of the card) and training
(trainer resident + gradients, gathered blocks, activations, log-prob chunk; vLLM asleep). vLLM sizes its KV
cache once, at creation, so u is planned for the trainer of step 1 (docs/paper-scale.md "Memory plan").
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 2**30
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces per process (CUDA 13 loads kernels lazily)
# NCCL's communicators per rank (channel buffers per peer, NVLS buffers on NVSwitch nodes): 1-2 GB per
# rank on 8-GPU H100/H200 nodes; the plan takes the upper end.
NCCL_GIB = 2.0
# The caching allocator's reserved-but-unused blocks: a free block inside a segment serves only a request
# that fits it, and empty_cache returns whole free segments only (expandable segments: docs/paper-scale.md).
FRAGMENTATION_GIB = 3.0
VLLM_ACTIVATION_GIB = 3.0  # vLLM's profiled activation peak + CUDA graphs (sampler over 152k vocab, ViT encoder)
VLLM_ASLEEP_GIB = 1.0  # what a level-1 sleeping vLLM keeps on the card (CUDA graph pools, buffers)
CARDS_GIB = {"80GB": 79.1, "141GB": 139.7}  # what torch reports as total memory of an H100 80GB / H200 141GB


def shapes(config) -> dict[str, int]:
    """The sizes the plan needs from a model config of a supported family (transformers config); the
    vision tower's from families.vision_sizes, which knows where each family keeps them."""
    from .families import vision_sizes

    text = config.text_config if hasattr(config, "text_config") else config
    heads = text.num_attention_heads
    return {
        "vocab": text.vocab_size,
        "hidden": text.hidden_size,
        "intermediate": text.intermediate_size,
        "layers": text.num_hidden_layers,
        "heads": heads,
        "kv_heads": text.num_key_value_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // heads,
        "tied": int(bool(getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))),
        **vision_sizes(config),  # v_hidden, v_intermediate, v_depth, v_out, v_mlp, v_mergers, v_patch, v_merge
    }


def parameter_counts(s: dict[str, int]) -> dict[str, int]:
    """Parameters by FSDP2 unit (modeling.shard_model): one text decoder layer, one vision block, the
    vision unit (patch embedding + v_mergers mergers), the root (embeddings, lm_head unless tied,
    final norm), and the total. Biases: q/k/v in the text attention; every vision linear. The vision
    MLP has v_mlp matrices (3 gated, 2 plain)."""
    h, i, kv = s["hidden"], s["intermediate"], s["kv_heads"] * s["head_dim"]
    text_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h  # q, k+v, o, gate/up/down, 2 norms
    vh, vi = s["v_hidden"], s["v_intermediate"]
    mlp = (s["v_mlp"] - 1) * (vh * vi + vi) + (vi * vh + vh)  # gate/up (or fc1), then down (fc2)
    vision_block = (vh * 3 * vh + 3 * vh) + (vh * vh + vh) + mlp + 2 * vh  # qkv, proj, MLP, 2 norms
    merged = vh * s["v_merge"]  # a merged token: v_merge patches side by side
    merger = vh + (merged * merged + merged) + (merged * s["v_out"] + s["v_out"])  # norm, MLP in, MLP out
    vision_unit = s["v_patch"] * vh + s["v_mergers"] * merger
    root = s["vocab"] * h * (1 if s["tied"] else 2) + h
    total = s["layers"] * text_layer + s["v_depth"] * vision_block + vision_unit + root
    return {"text_layer": text_layer, "vision_block": vision_block, "vision_unit": vision_unit, "root": root,
            "total": total}  # fmt: skip


@dataclass
class RunSettings:
    """The settings of grpo.py that size memory (defaults: --preset paper)."""

    world_size: int = 8
    tokens_per_micro_batch: int = 16384  # --max-tokens-per-micro-batch
    max_prompt_length: int = 2048
    max_response_length: int = 4096
    logprob_chunk: int = 1024
    gradient_checkpointing: bool = True
    reference: bool = True  # kl_coef > 0
    reshard_reference: bool = True  # the reference's root resharded after its forward (grpo.update_policy)
    fused_adamw: bool = True  # modeling.create_optimizer on CUDA; foreach AdamW makes a 4 B x params temporary
    autocast_cache: bool = False  # modeling.autocast keeps none; with it, fp32 unsharded weights get a bf16 copy


def run_settings(cfg, world_size: int) -> RunSettings:
    """The RunSettings of a grpo.py run (its GRPOConfig `cfg`) on `world_size` ranks."""
    tokens = cfg.max_tokens_per_micro_batch or cfg.micro_batch_size * (cfg.max_prompt_length + cfg.max_response_length)
    return RunSettings(
        world_size=world_size, tokens_per_micro_batch=tokens, max_prompt_length=cfg.max_prompt_length,
        max_response_length=cfg.max_response_length, logprob_chunk=cfg.logprob_chunk,
        gradient_checkpointing=cfg.gradient_checkpointing, reference=cfg.kl_coef > 0,
    )  # fmt: skip


def plan(config, card_gib: float, run: RunSettings = RunSettings()) -> dict[str, float]:
    """The memory plan of one rank, in GiB (and the vLLM share u, KV tokens): see the module docstring.

    Every entry is a named term so the table in docs/paper-scale.md can show where memory goes.
    """
    s = shapes(config)
    p = parameter_counts(s)
    w, n = run.world_size, run.tokens_per_micro_batch
    g = {}
    # --- trainer, resident in both phases ---
    g["policy fp32 shard"] = 4 * p["total"] / w
    g["AdamW shard (2 x fp32)"] = 8 * p["total"] / w
    g["reference bf16 shard"] = 2 * p["total"] / w if run.reference else 0.0
    g["reference root, gathered"] = 2 * p["root"] if run.reference and not run.reshard_reference else 0.0
    resident = sum(g.values())
    # --- training phase only ---
    t = {}
    t["gradients fp32 shard"] = 4 * p["total"] / w
    # gathered bf16 parameters: the policy's root (kept for the chunked lm_head), a block and the prefetched next
    t["gathered params (root + 2 blocks)"] = 2 * p["root"] + 2 * 2 * max(p["text_layer"], p["vision_block"])
    t["gathered block grads fp32"] = 4 * max(p["text_layer"], p["vision_block"])
    h, i = s["hidden"], s["intermediate"]
    one_layer = n * (4 * h + 3 * i) * 2 * 2  # q, k, v, o + gate, up, act*up in bf16, and their gradients
    if run.gradient_checkpointing:
        t["activations (checkpointed)"] = s["layers"] * n * h * 2 + one_layer
    else:
        t["activations"] = s["layers"] * one_layer / 2 + one_layer / 2
    # vision tower: image tokens at most the prompt's share of the budget, v_merge patches each
    patches = n * run.max_prompt_length // (run.max_prompt_length + run.max_response_length) * s["v_merge"]
    vh, vi = s["v_hidden"], s["v_intermediate"]
    v_block = patches * (4 * vh + 3 * vi) * 2 * 2
    ckpt_vision = s["v_depth"] * patches * vh * 2 + v_block
    t["vision activations"] = ckpt_vision if run.gradient_checkpointing else s["v_depth"] * v_block
    t["log-prob chunk (fp32 logits, softmax, grad)"] = 3 * run.logprob_chunk * s["vocab"] * 4
    t["hidden states + targets"] = n * h * (2 + 4) + n * 8
    # autocast's cache: a bf16 copy of every fp32 weight it casts, kept for the whole forward (one process
    # only: under FSDP2 the gathered weights are bf16 already and nothing is cast)
    t["autocast weight cache"] = 2 * p["total"] if run.autocast_cache and w == 1 else 0.0
    # the optimizer step runs after backward (activations freed, gradients and the gathered root still
    # there): foreach AdamW's _foreach_sqrt of the second moments is one fp32 copy of the shard
    step = {"AdamW step temporary (foreach)": 0.0 if run.fused_adamw else 4 * p["total"] / w}
    out = {k: v / GIB for k, v in {**g, **t, **step}.items()}
    out["trainer resident"] = resident / GIB
    nccl = NCCL_GIB if w > 1 else 0.0  # one process: no communicator
    out["CUDA context"], out["NCCL buffers"], out["fragmentation margin"] = CUDA_CONTEXT_GIB, nccl, FRAGMENTATION_GIB
    kept = t["gradients fp32 shard"] + 2 * p["root"]  # what the step phase shares with backward
    tensors = resident + max(sum(t.values()), kept + sum(step.values()))  # backward peak or step peak
    out["training peak"] = tensors / GIB + VLLM_ASLEEP_GIB + CUDA_CONTEXT_GIB + nccl
    # --- rollout phase: what is left for vLLM, and its KV cache ---
    free = card_gib - out["trainer resident"] - CUDA_CONTEXT_GIB - nccl - FRAGMENTATION_GIB
    u = max(0.0, int(100 * free / card_gib) / 100)  # rounded down to 0.01
    weights = 2 * p["total"] / GIB
    kv_per_token = 2 * s["layers"] * s["kv_heads"] * s["head_dim"] * 2  # K and V, bf16, bytes
    kv_cache = u * card_gib - weights - VLLM_ACTIVATION_GIB
    sequence = run.max_prompt_length + run.max_response_length
    out |= {
        "vLLM weights bf16": weights,
        "vLLM activations": VLLM_ACTIVATION_GIB,
        "gpu_memory_utilization": u,
        "vLLM KV cache": kv_cache,
        "KV tokens": kv_cache * GIB / kv_per_token,
        "KV sequences (prompt + response)": kv_cache * GIB / kv_per_token / sequence,
        "rollout peak": out["trainer resident"] + u * card_gib + CUDA_CONTEXT_GIB + nccl,
        "card": card_gib,
        "params (B)": p["total"] / 1e9,
    }  # fmt: skip
    out["fits"] = float(out["training peak"] <= card_gib and out["KV tokens"] >= sequence)
    return out


def what_fits(config, card_gib: float, run: RunSettings) -> str:
    """What would fit when `run` does not (plan()'s `fits` is 0): the fewest ranks of this card, or
    a smaller --max-tokens-per-micro-batch at this world size, in words."""
    ranks = next((w for w in (1, 2, 4, 8, 16, 32, 64) if w > run.world_size
                  and plan(config, card_gib, replace(run, world_size=w))["fits"]), None)  # fmt: skip
    tokens = next((t for t in (8192, 4096, 2048) if t < run.tokens_per_micro_batch
                   and plan(config, card_gib, replace(run, tokens_per_micro_batch=t))["fits"]), None)  # fmt: skip
    options = ([f"{ranks} GPUs of this card"] if ranks else []) + (
        [f"--max-tokens-per-micro-batch {tokens}"]
        if tokens and tokens >= run.max_prompt_length + run.max_response_length  # a sequence fits a pass
        else []
    )
    return " or ".join(options) if options else "a card with more memory (no world size up to 64 fits)"


def gpu_memory_utilization(config, card_gib: float, run: RunSettings) -> float:
    """vLLM's share of the card that leaves the trainer of step 1 and later its room; stops with one
    line (before vLLM starts) when the training peak exceeds the card, naming what would fit
    (what_fits), or when nothing useful is left for the KV cache (fewer tokens than one full sequence)."""
    result = plan(config, card_gib, run)
    if result["training peak"] > card_gib:
        raise SystemExit(
            f"error: memory plan: the training peak is {result['training peak']:.1f} GiB per GPU (trainer, CUDA "
            f"context, sleeping vLLM) on a {card_gib:.1f} GiB card with {run.world_size} rank(s); would fit: "
            f"{what_fits(config, card_gib, run)} (python scripts/plan_memory.py)"
        )
    if result["KV tokens"] < run.max_prompt_length + run.max_response_length:
        raise SystemExit(
            f"error: memory plan: {card_gib:.1f} GiB per GPU leaves vLLM {result['vLLM KV cache']:.1f} GiB of KV cache "
            f"after the trainer's {result['trainer resident']:.1f} GiB; use more GPUs or --engine hf"
        )
    return result["gpu_memory_utilization"]


def table(configs: dict[str, object], cards: dict[str, float], run: RunSettings) -> str:
    """The markdown table of plan() for every (model, card) pair: one column each."""
    plans = {f"{m} / {c}": plan(cfg, gib, run) for m, cfg in configs.items() for c, gib in cards.items()}
    rows = list(next(iter(plans.values())))
    out = ["| GiB per rank | " + " | ".join(plans) + " |", "| --- |" + " --- |" * len(plans)]
    for r in rows:
        if r == "fits":
            cells = ["yes" if v[r] else "no" for v in plans.values()]
        else:
            cells = [f"{v[r]:,.0f}" if r.startswith("KV tokens") else f"{v[r]:.2f}" for v in plans.values()]
        out.append(f"| {r} | " + " | ".join(cells) + " |")
    return "\n".join(out)


# The published sizes of Qwen2.5-VL (config.json of Qwen/Qwen2.5-VL-3B-Instruct / -7B-Instruct), to
# plan without a download.
QWEN25_VL = {
    "3B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True, out_hidden_size=2048),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, out_hidden_size=3584),
}  # fmt: skip


def qwen25_vl_config(size: str):
    """A transformers Qwen2_5_VLConfig with the real sizes of Qwen2.5-VL-`size` ("3B" or "7B")."""
    from transformers import Qwen2_5_VLConfig

    sizes = dict(QWEN25_VL[size])
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=sizes.pop("out_hidden_size"))  # fmt: skip
    tied = sizes.pop("tie_word_embeddings")
    text = dict(sizes, max_position_embeddings=128000, rope_theta=1000000.0, tie_word_embeddings=tied)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)
