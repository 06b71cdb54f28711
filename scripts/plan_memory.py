"""Prints the per-rank memory plan of `grpo.py --preset paper` for Qwen2.5-VL-3B and -7B on 80 GB and
141 GB cards (arithmetic from the model configs and the code's settings; mmr1/memory.py).

    python scripts/plan_memory.py                      # the table of docs/paper-scale.md (world size 8)
    python scripts/plan_memory.py --world-size 16      # another world size
    python scripts/plan_memory.py --no-reshard-reference   # before the fix: the reference root stays gathered
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmr1 import memory  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=8, help="ranks (GPUs) of the run")
    parser.add_argument("--tokens-per-micro-batch", type=int, default=16384, help="--max-tokens-per-micro-batch")
    parser.add_argument("--reshard-reference", action=argparse.BooleanOptionalAction, default=True,
                        help="the reference root resharded after its forward (what grpo.py does)")  # fmt: skip
    args = parser.parse_args(argv)
    run = memory.RunSettings(
        world_size=args.world_size,
        tokens_per_micro_batch=args.tokens_per_micro_batch,
        reshard_reference=args.reshard_reference,
    )
    configs = {size: memory.qwen25_vl_config(size) for size in ("7B", "3B")}
    text = memory.table(configs, memory.CARDS_GIB, run)
    print(f"grpo.py --preset paper, world size {run.world_size}, {run.tokens_per_micro_batch} tokens per micro-batch\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
