"""Padded vs packed (padding-free) micro-batches: forward + backward of the GRPO log-prob pass on CPU.

    python bench/packing_bench.py                 # ~3 minutes on 2 cores; the last line is the summary

The model is the toy Qwen2.5-VL (same classes, tokenizer, 112-px images = 16 image tokens) with
the text decoder widened to hidden 512 / MLP 1536 / 8 heads (4 KV heads), 4 layers, so the pass
is dominated by the decoder's matmuls, as at paper scale, not by Python overhead. One update =
4 prompts x 8 responses = 32 sequences, a prompt of about 45 tokens (one image) each, response
lengths drawn from a long-tailed distribution shaped like real rollouts: log-normal with median
96 tokens and sigma 1.0, clipped to [8, 1024] (the paper's ~100 to 4,096-token range, scaled
down 4x; a few responses run 5-10x the median, most are short).
  padded: 8 sequences per micro-batch in rollout order, right-padded to the micro-batch's longest
          (today's fixed-count recipe, `--no-pack --max-tokens-per-micro-batch 0`);
  packed: micro-batches by a 2,048-token budget, each packed into one row (the default).
Each repetition runs both, alternating, each in a fresh process on one thread (peak = growth of
the max RSS over the forward + backward). Time is the median over repetitions.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SEQUENCES, MICRO, BUDGET = 32, 8, 2048


MODEL_DIR = ROOT / "runs" / "bench-packing-model"


def build_model() -> None:
    """Writes the widened toy model (random init, seed 0) to MODEL_DIR, once."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from data import toy
    from mmr1.modeling import load_processor

    toy_dir = ROOT / "runs" / "toy-init"
    if not (toy_dir / "config.json").exists():
        toy.build_toy_model(toy_dir)
    config = Qwen2_5_VLConfig.from_pretrained(toy_dir)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads, text.num_key_value_heads = 512, 1536, 8, 4
    text.rope_parameters["mrope_section"] = [8, 12, 12]  # sums to head_dim / 2 = 32
    config.vision_config.out_hidden_size = 512  # the merger projects image tokens to the text width
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(MODEL_DIR)
    load_processor(str(toy_dir)).save_pretrained(MODEL_DIR)


def build(seed: int = 0):
    """(model, processor, rows, responses): the widened toy model and one update's sequences."""
    import numpy as np
    import torch

    from data import toy
    from mmr1 import modeling

    model = modeling.load_model(str(MODEL_DIR), torch.device("cpu"), trainable=True)
    processor = modeling.load_processor(str(MODEL_DIR))
    rng = np.random.default_rng(seed)
    prompts = [{"problem": f"<image>How many {c} squares are there?", "images": [toy.draw_grid([c] * 4)]}
               for c in ("red", "blue", "green", "yellow")]  # fmt: skip
    words = processor.tokenizer.encode("four red squares so the answer is", add_special_tokens=False)
    lengths = np.clip(rng.lognormal(np.log(96), 1.0, SEQUENCES), 8, 1024).astype(int)
    rows = [prompts[i // 8] for i in range(SEQUENCES)]
    responses = [(words * (int(n) // len(words) + 1))[: int(n)] for n in lengths]
    return model, processor, rows, responses


def micro_batches(processor, rows, responses, packed: bool):
    from mmr1 import batches, chat

    budget = BUDGET if packed else 0
    prompts = batches.build_prompts(processor, rows, chat.PromptFormat(), 3136, 50176)
    return batches.rl_micro_batches(processor, prompts, responses, budget, MICRO)


def one_case(packed: bool) -> dict:
    """One update's forward + backward in this process: seconds, peak RSS growth (MiB), token counts."""
    import torch

    from mmr1 import logprobs

    torch.set_num_threads(1)  # the machine is shared; one thread keeps the two cases comparable
    model, processor, rows, responses = build()
    plan = micro_batches(processor, rows, responses, packed)
    real = sum(int(inputs["attention_mask"].sum()) for _, inputs, _ in plan)
    computed = real if packed else sum(inputs["input_ids"].numel() for _, inputs, _ in plan)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    for _, inputs, mask in plan:
        logp, _ = logprobs.token_logprobs(model, inputs, 1024, True, 0.6, packed=packed)
        (logp * mask).sum().backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"seconds": seconds, "peak_mib": peak, "real": real, "computed": computed, "micro": len(plan)}


def max_logp_difference() -> float:
    """max |packed - padded| log-prob over every response token of the update (no gradient)."""
    import torch

    from mmr1 import logprobs

    model, processor, rows, responses = build()
    worst = 0.0
    with torch.no_grad():
        for _, inputs, mask in micro_batches(processor, rows, responses, packed=False):
            padded, _ = logprobs.token_logprobs(model, inputs, temperature=0.6)
            packed, _ = logprobs.token_logprobs(model, inputs, temperature=0.6, packed=True)
            worst = max(worst, float(((packed - padded) * mask).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each case")
    parser.add_argument("--case", default="", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(args.case == "packed")))
        return
    if not (MODEL_DIR / "config.json").exists():
        build_model()
    runs = {"padded": [], "packed": []}
    for _ in range(args.reps):
        for case in runs:
            cmd = [sys.executable, __file__, "--case", case]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            runs[case].append(json.loads(out))
    print("| case | micro-batches | tokens computed | real tokens | padding share | median s | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    summary = {}
    for case, rs in runs.items():
        r = rs[0]
        seconds = statistics.median(x["seconds"] for x in rs)
        peak = statistics.median(x["peak_mib"] for x in rs)
        share = 1 - r["real"] / r["computed"]
        summary[case] = (seconds, peak)
        times = ", ".join(f"{x['seconds']:.2f}" for x in rs)
        print(f"| {case} | {r['micro']} | {r['computed']} | {r['real']} | {share:.2f} | {seconds:.2f} ({times}) | "
              f"{peak:.0f} |")  # fmt: skip
    ratio_t = summary["packed"][0] / summary["padded"][0]
    ratio_m = summary["packed"][1] / summary["padded"][1]
    print(f"packed/padded time {ratio_t:.2f}, peak {ratio_m:.2f}, max |dlogp| {max_logp_difference():.2e}")


if __name__ == "__main__":
    main()
