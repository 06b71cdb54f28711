"""Self-BLEU-123: NLTK's sentence_bleu loop (the recipe) vs vas.self_bleu, one core.

python bench/vas_bench.py              # prints a markdown table
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vas  # noqa: E402


def nltk_self_bleu(group: list[list[int]]) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    smooth = SmoothingFunction().method1
    scores = [
        sentence_bleu(group[:i] + group[i + 1 :], group[i], weights=(1 / 3, 1 / 3, 1 / 3), smoothing_function=smooth)
        for i in range(len(group))
    ]
    return float(np.mean(scores))


def make_group(n: int, length: int, rng: np.random.Generator) -> list[list[int]]:
    """Responses that share structure like real rollouts of one prompt: noisy copies of a common
    draft (20% of tokens replaced, lengths +-25%) over a Zipf-distributed 151,936-token vocabulary."""
    draft = np.minimum(rng.zipf(1.2, size=2 * length), 151_935)
    group = []
    for _ in range(n):
        size = int(length * rng.uniform(0.75, 1.25))
        seq = draft[:size].copy()
        noise = rng.random(size) < 0.2
        seq[noise] = np.minimum(rng.zipf(1.2, size=int(noise.sum())), 151_935)
        group.append(seq.tolist())
    return group


def timed(fn, group, repeat: int) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(repeat):
        value = fn(group)
    return (time.perf_counter() - start) / repeat, value


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--groups", type=int, default=3, help="groups per shape (NLTK is slow)")
    parser.add_argument("--prompts", type=int, default=15_000, help="data set size for the refresh estimate")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| responses x tokens | NLTK s/group | ours ms/group | speed-up | max abs diff |")
    print("| --- | --- | --- | --- | --- |")
    per_group = {}
    for n, length in [(8, 256), (16, 1000), (16, 2000), (32, 1000)]:
        t_nltk = t_ours = diff = 0.0
        for _ in range(args.groups):
            group = make_group(n, length, rng)
            vas.self_bleu(group)  # warm
            a, ref = timed(nltk_self_bleu, group, 1)
            b, ours = timed(vas.self_bleu, group, 10)
            t_nltk, t_ours, diff = t_nltk + a, t_ours + b, max(diff, abs(ours - ref))
        t_nltk, t_ours = t_nltk / args.groups, t_ours / args.groups
        per_group[(n, length)] = (t_nltk, t_ours)
        print(f"| {n} x {length} | {t_nltk:.3f} | {t_ours * 1e3:.2f} | {t_nltk / t_ours:.0f}x | {diff:.1e} |")
    t_nltk, t_ours = per_group[(16, 1000)]
    print(f"\nwhole refresh, {args.prompts} prompts x 16 x 1000 tokens, one core: "
          f"NLTK {t_nltk * args.prompts / 3600:.2f} CPU-hours, ours {t_ours * args.prompts:.0f} CPU-seconds")  # fmt: skip


if __name__ == "__main__":
    main()
