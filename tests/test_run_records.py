"""Reading back what runs wrote: scripts/compare_runs.py's table (runs keyed by path, NaN left out and
counted, --out into a missing folder) and vas.py plot's refresh files (written whole; one cut by other
means is one error line)."""

import json
import sys

import numpy as np
import pytest

import vas
from conftest import ROOT
from mmr1 import config

sys.path.insert(0, str(ROOT / "scripts"))
import compare_runs  # noqa: E402 - scripts/ is no package


def write_run(folder, accuracies) -> None:
    """<folder>/metrics.jsonl with one line per step: val/accuracy and the tokens generated so far."""
    folder.mkdir(parents=True)
    lines = [{"step": s, "val/accuracy": a, "rollout/generated_tokens": 100 * s} for s, a in enumerate(accuracies)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def table_rows(capsys) -> list[str]:
    return [x for x in capsys.readouterr().out.splitlines() if x.startswith("| ") and "---" not in x][1:]


def test_runs_with_one_folder_name_in_two_experiments_are_two_rows(tmp_path, capsys):
    """exp1/base-seed0 and exp2/base-seed0 are not two seeds of one `base-seed*` (keyed by folder name they
    would be); keyed by path they are two rows, while exp1's two seeds still form one group."""
    write_run(tmp_path / "exp1" / "base-seed0", [0.1, 0.5])
    write_run(tmp_path / "exp1" / "base-seed1", [0.3, 0.7])
    write_run(tmp_path / "exp2" / "base-seed0", [0.9, 0.9])
    runs = [str(tmp_path / e / r) for e, r in [("exp1", "base-seed0"), ("exp1", "base-seed1"), ("exp2", "base-seed0")]]
    compare_runs.main([*runs, runs[0], "--metrics", "val/accuracy", "--out", str(tmp_path / "c.png")])
    # exp1: last (0.5 + 0.7) / 2 = 0.6, best the same, mean (0.3 + 0.5) / 2 = 0.4; the repeated run counts once
    assert table_rows(capsys) == [
        "| exp1/base-seed* | val/accuracy | 0.6 | 0.6 | 0.4 | 2 |",
        "| exp2/base-seed* | val/accuracy | 0.9 | 0.9 | 0.9 | 1 |",
    ]


def test_nan_is_left_out_of_last_best_and_mean_and_counted(tmp_path, capsys):
    """max() over [0.2, nan, 0.6] is 0.6 but over [nan, 0.2, 0.6] is nan: where a NaN sits must not decide "best".
    Left out, each run gives last 0.6, best 0.6, mean 0.4, and the runs column counts the NaN."""
    for name, values in [("a", [0.2, float("nan"), 0.6]), ("b", [float("nan"), 0.2, 0.6])]:
        write_run(tmp_path / name, values)
    for name in ("a", "b"):
        compare_runs.main([str(tmp_path / name), "--metrics", "val/accuracy", "--out", str(tmp_path / "c.png")])
        assert table_rows(capsys) == [f"| {name} | val/accuracy | 0.6 | 0.6 | 0.4 | 1, 1 NaN left out |"]
    write_run(tmp_path / "c", [float("nan")])
    compare_runs.main([str(tmp_path / "c"), "--metrics", "val/accuracy", "--out", str(tmp_path / "c.png")])
    assert table_rows(capsys) == ["| c | val/accuracy | - | - | - | 0, 1 NaN left out |"]


def test_out_into_a_missing_folder_is_made_and_an_unwritable_one_is_one_line(tmp_path):
    write_run(tmp_path / "run", [0.1, 0.2])
    out = tmp_path / "new" / "deeper" / "compare.png"
    compare_runs.main([str(tmp_path / "run"), "--metrics", "val/accuracy", "--out", str(out)])
    assert out.stat().st_size > 1000
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stop:
        compare_runs.main([str(tmp_path / "run"), "--metrics", "val/accuracy", "--out", str(blocker / "c.png")])
    message = str(stop.value.code)
    assert (
        message.startswith(f"error: --out {blocker / 'c.png'}: cannot write the plot there (") and "\n" not in message
    )


def test_a_broken_metrics_line_names_the_file_and_the_line(tmp_path):
    write_run(tmp_path / "run", [0.1])
    path = tmp_path / "run" / "metrics.jsonl"
    with path.open("a") as f:
        f.write("[" * 100_000 + "\n")
    with pytest.raises(SystemExit) as stop:
        compare_runs.main([str(tmp_path / "run")])
    assert str(stop.value.code) == f"error: {path} line 2: not JSON (nested too deeply)"


def test_vas_plot_reads_whole_refresh_files_and_names_a_cut_one(tmp_path, capsys):
    """grpo.py writes each refresh through config.atomic_file (whole or absent); one cut in half by other
    means (a copy, a full disk elsewhere) stops `vas.py plot` with one line naming it."""
    rng = np.random.default_rng(0)
    (tmp_path / "vas").mkdir()
    for step in (0, 10):
        with config.atomic_file(tmp_path / "vas" / f"refresh-{step}.npz", "wb") as f:
            np.savez(f, vps=rng.random(50), pass_rate=rng.random(50))
    assert sorted(p.name for p in (tmp_path / "vas").iterdir()) == ["refresh-0.npz", "refresh-10.npz"]
    assert [r["step"] for r in vas.load_refreshes(tmp_path)] == [0, 10]
    vas.main(["plot", str(tmp_path), "--out", str(tmp_path / "dyn.png")])
    assert (tmp_path / "dyn.png").stat().st_size > 1000 and "wrote" in capsys.readouterr().out
    cut = tmp_path / "vas" / "refresh-10.npz"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.raises(SystemExit) as stop:
        vas.main(["plot", str(tmp_path)])
    message = str(stop.value.code)
    assert message.startswith(f"error: {cut} is unreadable (BadZipFile: ") and "\n" not in message


def test_every_bench_reader_of_metrics_names_a_cut_file_and_line(tmp_path):
    """The bench scripts read metrics.jsonl through config.read_jsonl: a record cut mid-line (a run
    killed while writing elsewhere, a copy cut short) is one error naming the file and the line."""
    import bench.grpo_variants
    import bench.rl_bench
    import bench.vas_experiment

    run = tmp_path / "run"
    write_run(run, [0.5, 0.6])
    path = run / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 2, "val/acc')  # the last line cut
    readers = [bench.rl_bench.metrics, lambda p: bench.vas_experiment.load_run(p.parent),
               lambda p: bench.grpo_variants.load_run(p.parent)]  # fmt: skip
    for read in readers:
        with pytest.raises(config.BadRowError, match=rf"{path} line 3: not JSON"):
            read(path)
