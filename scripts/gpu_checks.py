"""Two checks scripts/gpu_smoke.sh runs beside the stages (both also run on the CPU, where the tests run them):

    python scripts/gpu_checks.py logprobs --model runs/gpu-smoke/sft/final     # packed vs padded log-probs
    python scripts/gpu_checks.py plan --model runs/gpu-smoke/sft/final --gpus 2 [--card-gib 139.7] [-- grpo flags]

`logprobs` loads the model as the trainer does (fp32 master weights, the attention kernel of this
device) and compares the log-probs of three prompt + response sequences of very different lengths
(one image of 256 patches: the vision tower's full-attention call past 128 queries, the branch torch
may send to cuDNN) packed into one row against the padded batch, under the one precision context (bf16 autocast on GPU);
it exits 1 when they differ by more than the bound. `plan` prints what mmr1/memory.py predicts for
the smoke run's grpo.py settings, the numbers gpu_smoke.sh puts beside the measured peaks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Bounds on |packed - padded| of a log-prob. fp32 (CPU): only the summation order differs, ~1e-6;
# under bf16 autocast both paths round q, k, v and the activations to bf16 (8 mantissa bits) in
# different kernels: measured 0.0034 on the CPU stand-in (tests/test_gpu_path.py). One attended token
# of a neighbouring sequence moves the toy's log-probs by 0.1 and more.
BOUND_FP32 = 1e-4
BOUND_BF16 = 0.05


def check_logprobs(model_dir: str, device: str) -> float:
    """Max |packed - padded| over the response-token log-probs (nats); prints one line."""
    import torch

    from data import toy
    from mmr1 import batches, logprobs, modeling
    from mmr1.chat import PromptFormat

    dev = torch.device(device)
    model = modeling.load_model(model_dir, dev, trainable=True)  # fp32 master weights: the one-GPU crash case
    processor = modeling.load_processor(model_dir, 3136, 50176)
    picture = toy.draw_grid(["red", "blue", "red", "green"])  # 112 x 112 px: 8 x 8 = 64 patches
    large = picture.resize((224, 224))  # 16 x 16 = 256 patches: past 128, where torch 2.14 may pick cuDNN
    rows = [
        {"problem": "<image><image>Compare the squares.", "images": [picture, picture]},
        {"problem": "Hi"},
        {"problem": "<image>How many red squares are there?", "images": [large]},
    ]
    text = processor.tokenizer.encode("the answer is four because I count them one by one " * 40)
    inputs, mask = batches.rl_batch(
        processor,
        batches.build_prompts(processor, rows, PromptFormat(), 3136, 50176),
        [text[:320], text[:1], text[:50]],
    )
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        padded, _ = logprobs.batch_logprobs(model, inputs, dev, 64, False, 0.6, False)
        packed, _ = logprobs.batch_logprobs(model, inputs, dev, 64, False, 0.6, True)
    valid = (inputs["attention_mask"][:, :-1].bool() & inputs["attention_mask"][:, 1:].bool()).to(dev)
    diff = float((packed[valid] - padded[valid]).abs().max())
    bf16 = dev.type == "cuda"
    bound = BOUND_BF16 if bf16 else BOUND_FP32
    peak = f", peak {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB allocated" if bf16 else ""
    kernel = model.config._attn_implementation
    patches = int(inputs["image_grid_thw"].prod(-1).max())  # the vision tower's longest full-attention segment
    print(
        f"packed vs padded log-probs on {dev} ({kernel}, {'bf16 autocast' if bf16 else 'fp32'}): max |diff| "
        f"{diff:.2e} over {int(valid.sum())} positions (bound {bound:g}), images up to {patches} patches{peak}"
    )
    return diff if diff <= bound else float("inf")


def memory_plan(model_dir: str, gpus: int, card_gib: float | None, grpo_args: list[str]) -> dict[str, float]:
    """The plan of mmr1/memory.py for grpo.py run with `grpo_args` on `gpus` ranks (GiB); prints one line."""
    import torch
    from transformers import AutoConfig

    import grpo
    from mmr1 import config, memory

    cfg = config.parse_config(grpo.GRPOConfig, grpo.PRESETS, ["--model", model_dir, *grpo_args])
    run = memory.run_settings(cfg, gpus)
    if card_gib is None:
        card_gib = torch.cuda.get_device_properties(0).total_memory / memory.GIB
    p = memory.plan(AutoConfig.from_pretrained(model_dir), card_gib, run)
    u = cfg.gpu_memory_utilization or p["gpu_memory_utilization"]
    rollout = p["rollout peak"] - p["gpu_memory_utilization"] * card_gib + u * card_gib
    print(
        f"plan: training peak {p['training peak']:.1f} GiB, rollout peak {rollout:.1f} GiB "
        f"(vLLM {u:.2f} of {card_gib:.1f} GiB), trainer resident {p['trainer resident']:.2f} GiB per rank"
    )
    return {"training": p["training peak"], "rollout": rollout}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="check", required=True)
    lp = sub.add_parser("logprobs", help="packed vs padded log-probs")
    lp.add_argument("--model", required=True, help="a Qwen2.5-VL folder (the smoke's SFT output)")
    lp.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    pl = sub.add_parser("plan", help="the memory plan's peaks for grpo.py's settings")
    pl.add_argument("--model", required=True, help="a Qwen2.5-VL folder (its config sizes the plan)")
    pl.add_argument("--gpus", type=int, default=1, help="ranks of the run")
    pl.add_argument("--card-gib", type=float, default=None, help="GiB per GPU (default: what torch reports)")
    pl.add_argument("grpo_args", nargs="*", help="grpo.py flags after --")
    args = parser.parse_args(argv)
    if args.check == "logprobs":
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        return 0 if check_logprobs(args.model, device) != float("inf") else 1
    memory_plan(args.model, args.gpus, args.card_gib, args.grpo_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
