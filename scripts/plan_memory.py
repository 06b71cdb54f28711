"""Prints the per-rank memory plan of `grpo.py --preset paper` for Qwen2.5-VL-3B and -7B on 80 GB and
141 GB cards (arithmetic from the model configs and the code's settings; mmr1/memory.py), and with
--measure one training update measured with torch's memory trackers beside the plan.

    python scripts/plan_memory.py                      # the table of docs/paper-scale.md (world size 8)
    python scripts/plan_memory.py --world-size 16      # another world size
    python scripts/plan_memory.py --no-reshard-reference   # before the fix: the reference root stays gathered
    nice -n 10 python scripts/plan_memory.py --measure 7B:8 --measure 3B:1   # measured (minutes of CPU each)

--measure SIZE:RANKS builds the real Qwen2.5-VL-SIZE config (no download, no weights) on fake tensors
(FakeTensorMode) and runs one micro-batch of the update on rank 0 of RANKS (a fake process group;
FSDP2 per decoder layer with bf16 mixed precision when RANKS > 1, autocast over fp32 weights on one
rank): the packed paper micro-batch (--tokens-per-micro-batch tokens, four 1008x1008 images), the
project's attention path (attention.TORCH_VARLEN: the varlen kernel's own fake implementation),
gradient checkpointing, the chunked log-prob, backward into the gradients of the step's earlier
micro-batches, clipping and the AdamW step of modeling.create_optimizer (fused on CUDA). The trackers
(torch.distributed._tools: MemTracker, FSDPMemTracker) count every tensor by category; the CUDA
context, NCCL's buffers and the allocator's fragmentation are no tensors and stay arithmetic.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmr1 import memory  # noqa: E402

PAPER_IMAGES, PAPER_IMAGE_PX = 4, 1008  # a micro-batch's images at the paper's max_pixels (1008 x 1008 < 1048576)


def micro_batch(config, tokens: int, images: int, image_px: int) -> dict:
    """Host tensors (real, not fake) of one packed micro-batch of `tokens` tokens: `images` sequences
    of equal length, each with one image_px x image_px image after a 16-token prefix; text positions
    restarting per sequence (4 rows, as logprobs.pack writes them), and the vision tower's windows,
    cu_seqlens and rotary positions computed as transformers computes them (integer work that fake
    tensors cannot do: it reads values)."""
    import torch
    from transformers import vision_utils

    v = config.vision_config
    side = image_px // v.patch_size
    grid = torch.tensor([[1, side, side]] * images)
    image_tokens = side * side // v.spatial_merge_size**2
    length = tokens // images
    if image_tokens + 16 > length:
        raise SystemExit(f"error: --measure: {images} images of {image_px} px do not fit {tokens} tokens")
    ids = torch.full((images * length,), 100, dtype=torch.long)
    for j in range(images):
        ids[j * length + 16 : j * length + 16 + image_tokens] = config.image_token_id
    text = torch.arange(length).repeat(images)
    window_index, cu_windows = vision_utils.get_vision_window_index(grid, v.spatial_merge_size, v.window_size,
                                                                    v.patch_size)  # fmt: skip
    cu_images = vision_utils.get_vision_cu_seqlens(grid)
    vision = {
        "position_ids": vision_utils.get_vision_position_ids(grid, v.spatial_merge_size),
        "cu_seqlens": cu_images,
        "max_seqlen": int((cu_images[1:] - cu_images[:-1]).max()),
        "window_index": window_index,
        "cu_window_seqlens": cu_windows,
        "max_window_seqlen": int((cu_windows[1:] - cu_windows[:-1]).max()),
    }
    patch = v.in_channels * v.temporal_patch_size * v.patch_size**2
    return {"ids": ids, "positions": text[None, None].expand(4, 1, -1).clone(), "grid": grid, "vision": vision,
            "starts": list(range(0, images * length + 1, length)), "patches": (images * side * side, patch)}  # fmt: skip


def measure(config, world_size: int, run: memory.RunSettings, images: int = PAPER_IMAGES,
            image_px: int = PAPER_IMAGE_PX) -> dict[str, dict[str, float]]:  # fmt: skip
    """One micro-batch of the training update of `config` on rank 0 of `world_size`, on fake tensors.

    The gradients of the step's earlier micro-batches exist before it (the steady state of a step of
    several micro-batches), the AdamW state too (grpo.py makes it before vLLM starts), and the
    reference's resident bf16 shard. Returns {"backward": by category, "step": by category} in GiB,
    each with "Total": the trackers' peak snapshot before the optimizer step, and over the whole update."""
    import torch
    import torch.distributed as tdist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mmr1 import attention, modeling

    batch = micro_batch(config, run.tokens_per_micro_batch, images, image_px)
    n = len(batch["ids"])
    attention.register_packed_attention()
    for key in (batch["vision"]["cu_seqlens"], batch["vision"]["cu_window_seqlens"]):  # read once, as on a GPU
        attention.BOUNDARIES.read(key, lambda key=key: int((key[1:] - key[:-1]).max()))
    real_starts = attention.packed_starts

    def packed_starts(query, key, attention_mask, kwargs):  # the boundaries of the micro-batch, known here
        if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2] == n:
            return batch["starts"]
        return real_starts(query, key, attention_mask, kwargs)

    attention.packed_starts = packed_starts
    mesh = None
    if world_size > 1:
        import torch.distributed.tensor._sharding_prop as sharding_prop
        from torch.distributed.device_mesh import init_device_mesh
        from torch.testing._internal.distributed.fake_pg import FakeStore

        tdist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        mesh = init_device_mesh("cpu", (world_size,))  # outside the fake mode
        # DTensor infers output shapes by running each op on global-shape fake tensors in the ACTIVE fake
        # mode, where the tracker would count them: a fresh fake mode per inference keeps them uncounted
        sharding_prop.detect_fake_mode = lambda *args: None
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model = Qwen2_5_VLForConditionalGeneration._from_config(
            config, attn_implementation=attention.TORCH_VARLEN, dtype=torch.float32
        )
        attention.use_vision_varlen(model)
        if run.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if mesh is not None:
            shard(model, mesh)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.01, fused=run.fused_adamw or None,
                                      foreach=not run.fused_adamw or None)  # fmt: skip
        modeling.create_optimizer_state(optimizer)
        for p in params:
            p.grad = torch.zeros_like(p)  # the gradients of the step's earlier micro-batches
        counts = memory.parameter_counts(memory.shapes(config))
        reference = torch.empty(-(-counts["total"] // world_size), dtype=torch.bfloat16) if run.reference else None
        pixels = torch.empty(batch["patches"])
        targets = torch.zeros(1, n - 1, dtype=torch.long)
        advantages = torch.ones(1, n - 1)
    model.forward = types.MethodType(update_forward(batch, run), model)  # through the root: FSDP2's hooks run
    if mesh is None:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(model, optimizer, *([reference] if reference is not None else []))
    else:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

        tracker = FSDPMemTracker(model, optimizer)  # its categories have no "Other": the reference counts as input
        tracker.track_inputs((pixels, targets, advantages, *([reference] if reference is not None else [])))
    out = {}
    with fake, tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=run.autocast_cache):
            logp = model(pixels=pixels, targets=targets)
        loss = -(logp * advantages).sum() / n
        loss.backward()
        out["backward"] = snapshot(tracker)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the next step's first micro-batch: gradients kept
        out["step"] = snapshot(tracker)
    attention.packed_starts = real_starts
    if world_size > 1:
        tdist.destroy_process_group()
    return out


def shard(model, mesh) -> None:
    """modeling.shard_model's FSDP2 units on `mesh` (per decoder layer, the vision unit, the root kept
    gathered after forward), bf16 mixed precision over fp32 master weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from mmr1 import modeling

    policy = MixedPrecisionPolicy(param_dtype=modeling.torch.bfloat16, reduce_dtype=modeling.torch.float32,
                                  cast_forward_inputs=False)  # fmt: skip
    for layer in modeling.decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model.model.visual, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def update_forward(batch: dict, run: memory.RunSettings):
    """The model's forward for the measurement: the vision tower on the images (windows and
    boundaries given), image features into the token embeddings, the decoder over the packed row, the
    chunked log-probs of the targets (logprobs.logprobs_from_hidden). Qwen2_5_VLModel.forward does the
    same but checks counts by reading values, which fake tensors cannot."""
    from mmr1 import logprobs

    def forward(model, pixels, targets):
        inner = model.model
        image = inner.visual(pixels, grid_thw=batch["grid"], **batch["vision"]).pooler_output
        embeds = inner.get_input_embeddings()(batch["ids"][None])
        mask = (batch["ids"] == model.config.image_token_id)[None, :, None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
        hidden = inner.language_model(inputs_embeds=embeds, position_ids=batch["positions"], use_cache=False,
                                      attention_mask={"full_attention": None, "sliding_attention": None})  # fmt: skip
        logp, _ = logprobs.logprobs_from_hidden(hidden.last_hidden_state[:, :-1], model.lm_head.weight, targets,
                                                run.logprob_chunk, True, 0.6)  # fmt: skip
        return logp

    return forward


def snapshot(tracker) -> dict[str, float]:
    """The tracker's peak so far by category (GiB), with "Total"."""
    peak = tracker.get_tracker_snapshot("peak")
    values = next(iter(peak.values()))
    return {str(getattr(k, "value", k)): v / memory.GIB for k, v in values.items()}


def measured_table(size: str, world_size: int, run: memory.RunSettings, card: str = "80GB") -> str:
    """Measured peaks by category beside the plan's terms, one rank (markdown)."""
    t0, c0 = time.time(), time.process_time()
    got = measure(memory.qwen25_vl_config(size), world_size, run)
    minutes, cpu = (time.time() - t0) / 60, (time.process_time() - c0) / 60
    p = memory.plan(memory.qwen25_vl_config(size), memory.CARDS_GIB[card], run)
    overheads = memory.VLLM_ASLEEP_GIB + p["CUDA context"] + p["NCCL buffers"]
    lines = [f"{size} on rank 0 of {world_size}, {run.tokens_per_micro_batch} tokens + {PAPER_IMAGES} images of "
             f"{PAPER_IMAGE_PX} px per micro-batch, fused AdamW {run.fused_adamw}, autocast cache "
             f"{run.autocast_cache} ({cpu:.1f} CPU-minutes, {minutes:.1f} minutes wall)", "",
             "| measured (GiB, tracker peak) | before the step | whole update |", "| --- | ---: | ---: |"]  # fmt: skip
    names = {
        "Other": "Other (the reference's bf16 shard)",
        "Inputs": "Inputs (pixels, targets, the reference's bf16 shard)",
    }
    for k in got["step"]:
        lines.append(f"| {names.get(k, k)} | {got['backward'].get(k, 0.0):.2f} | {got['step'][k]:.2f} |")
    lines += ["", "| planned (GiB) | |", "| --- | ---: |"]
    skip = {"CUDA context", "NCCL buffers", "fragmentation margin", "trainer resident", "training peak"}
    for k, v in p.items():
        if k in skip:
            break
        lines.append(f"| {k} | {v:.2f} |")
    lines.append(f"| tensors (training peak - context - NCCL - sleeping vLLM) | {p['training peak'] - overheads:.2f} |")
    lines.append(f"| training peak with context, NCCL, sleeping vLLM: planned | {p['training peak']:.2f} |")
    lines.append(f"| the same with the measured tensors | {got['step']['Total'] + overheads:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=8, help="ranks (GPUs) of the run")
    parser.add_argument("--tokens-per-micro-batch", type=int, default=16384, help="--max-tokens-per-micro-batch")
    parser.add_argument("--logprob-chunk", type=int, default=1024, help="--logprob-chunk")
    parser.add_argument("--reshard-reference", action=argparse.BooleanOptionalAction, default=True,
                        help="the reference root resharded after its forward (what grpo.py does)")  # fmt: skip
    parser.add_argument("--measure", action="append", default=[], metavar="SIZE:RANKS",
                        help="measure one update of Qwen2.5-VL-SIZE (3B, 7B) on RANKS ranks (fake tensors)")  # fmt: skip
    parser.add_argument("--foreach-adamw", action="store_true", help="with --measure: foreach AdamW (not fused)")
    parser.add_argument("--autocast-cache", action="store_true", help="with --measure: autocast's weight cache on")
    args = parser.parse_args(argv)
    run = memory.RunSettings(
        world_size=args.world_size,
        tokens_per_micro_batch=args.tokens_per_micro_batch,
        logprob_chunk=args.logprob_chunk,
        reshard_reference=args.reshard_reference,
        fused_adamw=not args.foreach_adamw,
        autocast_cache=args.autocast_cache,
    )
    configs = {size: memory.qwen25_vl_config(size) for size in ("7B", "3B")}
    text = memory.table(configs, memory.CARDS_GIB, run)
    print(f"grpo.py --preset paper, world size {run.world_size}, {run.tokens_per_micro_batch} tokens per micro-batch\n")
    print(text)
    for spec in args.measure:
        size, _, ranks = spec.partition(":")
        if size not in memory.QWEN25_VL or not ranks.isdigit() or int(ranks) < 1:
            raise SystemExit(f"error: --measure {spec}: give SIZE:RANKS with SIZE one of {', '.join(memory.QWEN25_VL)}")
        import dataclasses

        measured = measured_table(size, int(ranks), dataclasses.replace(run, world_size=int(ranks)))
        print("\n" + measured, flush=True)
        text += "\n\n" + measured
    return text


if __name__ == "__main__":
    main()
