"""Throughput of reward.compute_rewards: worker processes vs a serial in-process loop.

python bench/reward_bench.py            # 2,000 toy + math-style responses, 2 workers
"""

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import reward  # noqa: E402


def responses(n: int, seed: int = 0) -> tuple[list[str], list[str], list]:
    """Realistic responses: toy answers, multiple choice, numbers, fractions, radicals, sets."""
    rng = random.Random(seed)
    out, golds, choices = [], [], []
    for i in range(n):
        kind = i % 6
        if kind == 0:
            k = rng.randint(0, 19)
            gold, pred, ch = str(k), str(k if rng.random() < 0.6 else k + 1), None
        elif kind == 1:
            gold, ch = rng.choice("ABCD"), ["red", "green", "blue", "yellow"]
            pred = rng.choice(["(" + gold + ")", gold, "green", rng.choice("ABCD")])
        elif kind == 2:
            a, b = rng.randint(1, 9), rng.randint(2, 9)
            gold, pred, ch = (
                f"\\frac{{{a}}}{{{b}}}",
                rng.choice([f"{a}/{b}", f"{a / b:.6f}", f"\\frac{{{a + 1}}}{{{b}}}"]),
                None,
            )
        elif kind == 3:
            a = rng.randint(2, 9)
            gold, pred, ch = (
                f"{a}\\sqrt{{3}}",
                rng.choice([f"\\sqrt{{{3 * a * a}}}", f"{a}\\sqrt{{3}}", f"{a}\\sqrt{{2}}"]),
                None,
            )
        elif kind == 4:
            gold, pred, ch = "x^2 + 2x + 1", rng.choice(["(x+1)^2", "x^2+2x+1", "x^2+1"]), None
        else:
            gold, pred, ch = "[0, 2, 0]", rng.choice(["[0,2,0]", "(0, 2, 0)", "[0, 2, 1]"]), None
        reasoning = " ".join(rng.choice(["so", "then", "we get", "the area", "is", "3 + 4 = 7"]) for _ in range(60))
        out.append(f"<think>{reasoning}</think><answer>The answer is \\boxed{{{pred}}}</answer>")
        golds.append(gold)
        choices.append(ch)
    return out, golds, choices


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="responses to score")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the parallel run")
    parser.add_argument("--timeout-s", type=float, default=5.0, help="per-response hard limit")
    args = parser.parse_args()
    texts, golds, choices = responses(args.n)

    t0 = time.perf_counter()
    serial = reward.compute_rewards(texts, golds, choices, workers=0)
    t_serial = time.perf_counter() - t0

    with reward.RewardPool(args.workers, args.timeout_s) as pool:
        reward.compute_rewards(texts[:20], golds[:20], choices[:20], pool=pool)  # warm the workers' imports
        t0 = time.perf_counter()
        parallel = reward.compute_rewards(texts, golds, choices, pool=pool)
        t_parallel = time.perf_counter() - t0
    same = all(a["overall"] == b["overall"] for a, b in zip(serial, parallel))
    timeouts = sum(s["timed_out"] for s in parallel)
    print("| mode | responses | seconds | responses/s |\n| --- | --- | --- | --- |")
    print(f"| serial, in-process | {args.n} | {t_serial:.2f} | {args.n / t_serial:.0f} |")
    print(f"| {args.workers} worker processes | {args.n} | {t_parallel:.2f} | {args.n / t_parallel:.0f} |")
    print(f"\nspeed-up {t_serial / t_parallel:.2f}x, identical scores: {same}, timeouts: {timeouts}, "
          f"mean accuracy {sum(s['accuracy'] for s in serial) / args.n:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
