"""The docs stay true to the code: flag tables equal the config dataclasses, links resolve."""

import re
import subprocess
import sys

from conftest import ROOT


def test_flag_tables_match_the_config_dataclasses():
    """scripts/flag_tables.py --check passes: every table in docs/ is the --help of its dataclass."""
    proc = subprocess.run(
        [sys.executable, "scripts/flag_tables.py", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    tables = sum(len(re.findall(r"<!-- flags:\w+ -->", p.read_text())) for p in (ROOT / "docs").glob("*.md"))
    assert tables >= 5  # sft, grpo, eval, vas score, vas plot


def test_flag_table_renders_every_field_of_a_config():
    from dataclasses import dataclass

    from mmr1.config import field, flag_table

    @dataclass
    class Demo:
        """demo"""

        run_dir: str = field("", "the run", positional=True)
        lr: float = field(1e-6, "learning rate | per step")
        vas: bool = field(False, "switch")

    assert flag_table(Demo).splitlines() == [
        "| flag | default | meaning |",
        "| --- | --- | --- |",
        "| `run_dir` (positional) | - | the run |",
        "| `--lr` | 1e-06 | learning rate \\| per step |",
        "| `--vas` / `--no-vas` | off | switch |",
    ]


def test_markdown_links_resolve():
    """Every relative link and image of README.md and docs/*.md names a file that exists."""
    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
