"""Writes the flag tables of docs/*.md from the config dataclasses (their --help text).

python scripts/flag_tables.py          # rewrite every <!-- flags:Config --> ... <!-- /flags:Config --> block
python scripts/flag_tables.py --check  # exit 1 naming the stale tables (tests/test_docs.py runs this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BLOCK = re.compile(r"(<!-- flags:(\w+) -->\n)(.*?)(<!-- /flags:\2 -->)", re.S)


def configs() -> dict[str, type]:
    """Config dataclass name -> class, for every stage script."""
    import eval as eval_script
    import grpo
    import sft
    import vas

    return {
        "SFTConfig": sft.SFTConfig,
        "GRPOConfig": grpo.GRPOConfig,
        "EvalConfig": eval_script.EvalConfig,
        "ScoreConfig": vas.ScoreConfig,
        "PlotConfig": vas.PlotConfig,
    }


def render(text: str, classes: dict[str, type]) -> str:
    """`text` with each marked block replaced by the current table of its config class."""
    from mmr1.config import flag_table

    def table(m: re.Match) -> str:
        if m.group(2) not in classes:
            raise SystemExit(f"error: unknown config {m.group(2)!r} in a flags marker; known: {sorted(classes)}")
        return f"{m.group(1)}{flag_table(classes[m.group(2)])}\n{m.group(4)}"

    return BLOCK.sub(table, text)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--check", action="store_true", help="only check: exit 1 naming the stale tables")
    check = parser.parse_args().check
    classes = configs()
    stale = []
    for path in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        text = path.read_text()
        new = render(text, classes)
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not check:
                path.write_text(new)
    if stale and check:
        raise SystemExit(f"error: stale flag tables in {', '.join(stale)}: run python scripts/flag_tables.py")
    print(f"flag tables {'up to date' if not stale else 'rewritten in ' + ', '.join(stale)}")


if __name__ == "__main__":
    main()
