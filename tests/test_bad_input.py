"""Bad input never crashes deep and never scores silently wrong.

Each test feeds one kind of bad input and asserts the promised outcome: a one-line error naming
the file / row / flag, a counted skip, or the right score. docs/data.md's "What bad input gets"
table lists the same cases.
"""

import dataclasses
import json
import math
import re

import pytest
import torch
from PIL import Image

import grpo
import reward
from conftest import launch, run_script
from data import toy
from mmr1 import checkpoint, checkpoint_checks, config, dist, families, images, modeling, prepare


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def image_file(folder, name="img.png", size=(112, 112)):
    path = folder / name
    (toy.draw_grid(["red", "blue", "green", "yellow"]) if size == (112, 112) else Image.new("RGB", size)).save(path)
    return str(path)


def rl_row(i, img, **extra):
    return {"id": str(i), "problem": f"<image>Q{i}", "answer": str(i), "images": [img], **extra}


# ---------------------------------------------------------------------------------------------
# 1. Non-string answers: normalised at load time, or rejected with the row named
# ---------------------------------------------------------------------------------------------


def test_answer_text_rules():
    assert [reward.answer_text(a) for a in ("7", 1, -3, 2.5, 3.0, 1e-7, [3, 4], ["x"], ("1/2", 0.25))] == [
        "7",
        "1",
        "-3",
        "2.5",
        "3",
        "1e-07",
        "3, 4",
        "x",
        "1/2, 0.25",
    ]
    for bad, message in [
        (True, "bool"),
        (float("nan"), "nan"),
        ([], "empty list"),
        ([[1]], "nested"),
        ({"a": 1}, "dict"),
        (["1,000", "2"], "','"),
        (None, "NoneType"),
    ]:
        with pytest.raises(ValueError, match=message):
            reward.answer_text(bad)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_number_and_list_answers_load_as_text_and_score(tmp_path, suffix):
    img = image_file(tmp_path)
    answers = [1, 12, 40] if suffix == ".parquet" else [1, 2.5, [3, 4]]  # a parquet column has one type
    rows = [dict(rl_row(i, img), answer=a) for i, a in enumerate(answers)]
    path = (write_parquet if suffix == ".parquet" else write_jsonl)(tmp_path / f"rows{suffix}", rows)
    loaded = prepare.load_rows(str(path), "rl")
    golds = [r["answer"] for r in loaded]
    assert golds == (["1", "12", "40"] if suffix == ".parquet" else ["1", "2.5", "3, 4"])
    for gold in golds:  # a right response earns accuracy 1, whatever the type of the gold
        assert reward.accuracy_reward(f"<think>t</think><answer>\\boxed{{{gold}}}</answer>", gold) == 1.0
    assert reward.accuracy_reward("<answer>\\boxed{(3, 4)}</answer>", "3, 4") == 1.0  # a list answer, element-wise


def test_unusable_answer_and_plain_string_choices_name_the_line(tmp_path):
    img = image_file(tmp_path)
    rows = [
        rl_row(0, img),
        dict(rl_row(1, img), answer=True),
        dict(rl_row(2, img), answer={"x": 1}),
        dict(rl_row(3, img), choices="A B C"),
    ]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(config.BadRowError, match=r"rows\.jsonl line 2 \(id=1\): answer is a bool"):
        prepare.load_rows(str(path), "rl")
    kept = prepare.load_rows(str(path), "rl", skip_bad_rows=True)
    assert [r["id"] for r in kept] == ["0"]
    for i, message in [(2, "answer is a dict"), (3, "'choices' is a str; give a list")]:
        with pytest.raises(config.BadRowError, match=rf"line 1 \(id={i}\): {message}"):
            prepare.load_rows(str(write_jsonl(tmp_path / "one.jsonl", [rows[i]])), "rl")
    choices = prepare.load_rows(str(write_jsonl(tmp_path / "c.jsonl", [rl_row(0, img, choices=[3, 4.5])])), "rl")
    assert choices[0]["choices"] == ["3", "4.5"]


# ---------------------------------------------------------------------------------------------
# 2. Malformed jsonl lines and empty / unreadable files
# ---------------------------------------------------------------------------------------------


def test_malformed_jsonl_lines_are_named_or_skipped_and_counted(tmp_path, capsys):
    img = image_file(tmp_path)
    lines = [
        json.dumps(rl_row(0, img)).encode(),
        b'{"id": "1", "problem": "Q", "answer": }',
        b"\xff\xfe junk",
        b"",
        b"[1, 2]",
        json.dumps(rl_row(5, img)).encode(),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(config.BadRowError) as error:
        prepare.load_rows(str(path), "rl")
    assert str(error.value) == f"{path} line 2: not valid JSON (Expecting value at column 39)"
    kept = prepare.load_rows(str(path), "rl", skip_bad_rows=True)
    assert [r["id"] for r in kept] == ["0", "5"]
    out = capsys.readouterr().out
    assert "5 rows, 3 left out (3 bad fields)" in out and "line 2: not valid JSON" in out
    for line, message in [(3, "not UTF-8 (byte 0xff at column 1)"), (5, "a JSON list, not an object")]:
        bad = tmp_path / f"bad{line}.jsonl"
        bad.write_bytes(b"\n".join([lines[0]] * (line - 1) + [lines[line - 1]]) + b"\n")
        with pytest.raises(config.BadRowError, match=rf"bad{line}\.jsonl line {line}: {re.escape(message)}"):
            prepare.load_rows(str(bad), "rl", skip_bad_rows=False)


def test_json_nested_too_deep_names_the_file_and_the_row(tmp_path):
    """A line of 100,000 `[` in an RL jsonl, an element nested as deep in an sft.json array: the same
    one-line bad-row error as any JSON that does not parse, never a RecursionError."""
    img = image_file(tmp_path)
    deep = "[" * 100_000 + "]" * 100_000
    rl = tmp_path / "rows.jsonl"
    rl.write_text(json.dumps(rl_row(0, img)) + "\n" + deep + "\n")
    with pytest.raises(config.BadRowError) as error:
        prepare.load_rows(str(rl), "rl")
    assert str(error.value) == f"{rl} line 2: not valid JSON (nested too deeply at column 1)"
    good = {"id": "g", "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
            "images": [img]}  # fmt: skip
    sft_json = tmp_path / "sft.json"
    sft_json.write_text(f"[{json.dumps(good)}, {deep}]")
    with pytest.raises(config.BadRowError) as error:
        prepare.load_rows(str(sft_json), "sft")
    assert str(error.value) == f"{sft_json}: not valid JSON at element 1 (nested too deeply)"


def test_empty_and_unreadable_files_are_one_line_errors(tmp_path):
    img = image_file(tmp_path)
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("\n\n")
    zero_byte = tmp_path / "zero.parquet"
    zero_byte.write_bytes(b"")
    no_rows = write_parquet(tmp_path / "norows.parquet", [rl_row(0, img)])
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(no_rows).slice(0, 0), no_rows)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    for path, message in [
        (empty_jsonl, "empty (no rows)"),
        (no_rows, "empty (no rows)"),
        (zero_byte, "not a readable parquet file"),
        (garbage, "not a readable parquet file"),
    ]:
        for skip in (False, True):
            with pytest.raises(config.BadRowError) as error:
                prepare.load_rows(str(path), "rl", skip_bad_rows=skip)
            assert str(error.value).startswith(f"{path}: {message}") and "\n" not in str(error.value)


def test_a_hub_id_that_does_not_load_is_one_line(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'no/such' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(config.BadRowError) as error:
        prepare.load_rows("no/such@val", "rl")
    assert str(error.value) == (
        "no/such@val: not a local file or folder, and not loadable from the hub "
        "(ConnectionError: Couldn't reach 'no/such' on the Hub (OfflineModeIsEnabled))"
    )


def test_a_bad_data_file_stops_grpo_with_one_line(toy_dir, tmp_path):
    """End to end: the stage script prints `error: <file> line <n>: ...`, no traceback, exit 1."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(rl_row(0, image_file(tmp_path))) + "\n{oops\n")
    proc = launch(
        ["grpo.py", "--model", str(toy_dir / "model"), "--data", str(path), "--output-dir", str(tmp_path / "run")]
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path} line 2: not valid JSON")


def test_vas_score_with_bad_data_or_a_missing_split_is_one_line(toy_dir, tmp_path):
    """vas.py score stops like the stage scripts: `error: ...`, no traceback, exit 1."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(rl_row(0, image_file(tmp_path))) + "\n{oops\n")
    folder = toy_dir / "data" / "rl"
    for spec, message in (
        (str(path), f"error: {path} line 2: not valid JSON"),
        (f"{folder}@nosuchsplit", f"error: {folder} has no nosuchsplit.parquet/.jsonl"),
    ):
        proc = launch(
            [
                "vas.py",
                "score",
                "--model",
                str(toy_dir / "model"),
                "--data",
                spec,
                "--engine",
                "hf",
                "--out",
                str(tmp_path / "v.parquet"),
            ]
        )
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(message)


# ---------------------------------------------------------------------------------------------
# 3. Images the processor would refuse are refused by the row check, with the same rule
# ---------------------------------------------------------------------------------------------


def test_extreme_aspect_ratio_is_a_bad_row(tmp_path):
    good, thin = image_file(tmp_path), image_file(tmp_path, "thin.png", (20000, 1))
    path = write_jsonl(tmp_path / "rows.jsonl", [rl_row(0, good), rl_row(1, thin)])
    with pytest.raises(config.BadRowError, match=r"line 2 \(id=1\): image 0 is 20000x1 pixels.*aspect ratio"):
        prepare.load_rows(str(path), "rl", min_pixels=3136, max_pixels=50176)  # the door reads the header's shape
    rows = prepare.load_rows(str(path), "rl", skip_bad_rows=True, min_pixels=3136, max_pixels=50176)
    assert [r["id"] for r in rows] == ["0"]  # left out by the door, counted in its report


def test_row_check_accepts_exactly_what_the_image_processor_accepts(toy_dir):
    processor = modeling.load_processor(str(toy_dir / "model"), 3136, 50176)
    # not the raw aspect ratio: 1700x1 becomes 1708x28 and passes, 1900x1 becomes 9744x28 and fails
    sizes = [(20000, 1), (1900, 1), (1, 1900), (1700, 1), (1, 250), (6000, 20), (112, 112), (1, 1), (4000, 3000)]
    outcomes = []
    for w, h in sizes:
        image = images.resize_image(Image.new("RGB", (w, h)), 3136, 50176, families.image_factor(processor))
        try:
            processor.image_processor(images=[image], return_tensors="pt")
            processor_ok = True
        except ValueError:
            processor_ok = False
        try:
            images.check_image_shape(w, h, 3136, 50176, families.image_factor(processor))
            check_ok = True
        except ValueError:
            check_ok = False
        assert check_ok == processor_ok, (w, h)
        outcomes.append(check_ok)
    assert outcomes == [False, False, False, True, True, True, True, True, True]


# ---------------------------------------------------------------------------------------------
# 4. SFT messages with null content; 9. relative image paths
# ---------------------------------------------------------------------------------------------


def test_sft_null_content_is_a_bad_row(tmp_path, capsys):
    img = image_file(tmp_path)
    good = {
        "id": "g",
        "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": "A"}],
        "images": [img],
    }
    null = {
        "id": "n",
        "messages": [{"role": "user", "content": "<image>Q"}, {"role": "assistant", "content": None}],
        "images": [img],
    }
    for suffix, where in [(".jsonl", "line 2"), (".parquet", "row 1")]:
        path = (write_parquet if suffix == ".parquet" else write_jsonl)(tmp_path / f"sft{suffix}", [good, null])
        with pytest.raises(config.BadRowError, match=rf"{where} \(id=n\): message 1 \(assistant\) has content null"):
            prepare.load_rows(str(path), "sft")
        assert [r["id"] for r in prepare.load_rows(str(path), "sft", skip_bad_rows=True)] == ["g"]
    assert "2 rows, 1 left out (1 bad fields)" in capsys.readouterr().out


def test_relative_image_paths_resolve_against_the_data_file(tmp_path, monkeypatch):
    folder = tmp_path / "set"
    folder.mkdir()
    image_file(folder, "a.png")
    write_jsonl(folder / "train.jsonl", [rl_row(0, "a.png"), rl_row(1, {"path": "a.png"})])
    monkeypatch.chdir(tmp_path)  # a.png is not in the working directory
    rows = prepare.load_rows("set/train.jsonl", "rl")
    first, second = rows.undecoded(0), rows.undecoded(1)
    assert first["images"] == second["images"] == [str(folder / "a.png")]  # the door's rows: absolute paths
    assert rows[1]["images"][0].size == (112, 112)  # and it decodes from there


# ---------------------------------------------------------------------------------------------
# 5. Settings that would run but train nothing useful
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--group-size", "1"], "--group-size 1: .* use at least 2"),
        (["--group-size", "0"], "--group-size 0: .* use at least 2"),
        (["--vas", "--vas-rollouts", "1"], "--vas-rollouts 1: .* use at least 2"),
        (["--max-steps", "0", "--episodes", "0"], "--max-steps 0 --episodes 0.0: no step would run"),
        (["--rollout-batch-size", "0"], "error: --rollout-batch-size must be >= 1, got 0"),  # its own bound
        (["--min-pixels", "60000", "--max-pixels", "50000"], "--min-pixels 60000 is above --max-pixels 50000"),
    ],
)
def test_useless_grpo_settings_are_refused(flags, message):
    with pytest.raises(SystemExit, match=message):  # parse_config checks the bounds, validate_config the rest
        grpo.validate_config(config.parse_config(grpo.GRPOConfig, grpo.PRESETS, flags))
    grpo.validate_config(config.parse_config(grpo.GRPOConfig, grpo.PRESETS, ["--vas"]))  # the defaults are fine


def test_useless_sft_settings_are_refused():
    import sft

    with pytest.raises(SystemExit, match="--max-steps 0 --epochs 0.0: no step would run"):
        sft.validate_config(config.parse_config(sft.SFTConfig, sft.PRESETS, ["--max-steps", "0", "--epochs", "0"]))
    with pytest.raises(SystemExit, match="--min-pixels 60000 is above --max-pixels 50000"):
        sft.validate_config(
            config.parse_config(sft.SFTConfig, sft.PRESETS, ["--min-pixels", "60000", "--max-pixels", "50000"])
        )


def stage_configs() -> list[tuple[type, dict | None]]:
    """Every stage's config dataclass with its presets (grpo, sft, eval, vas score, vas plot)."""
    import eval as evaluation
    import sft
    import vas

    return [
        (grpo.GRPOConfig, grpo.PRESETS),
        (sft.SFTConfig, sft.PRESETS),
        (evaluation.EvalConfig, None),
        (vas.ScoreConfig, None),
        (vas.PlotConfig, None),
    ]


def refused(cls, presets, flags) -> str:
    """The one-line message parse_config stops with."""
    with pytest.raises(SystemExit) as stop:
        config.parse_config(cls, presets, flags)
    return str(stop.value.code)


def test_every_float_flag_of_every_stage_must_be_finite():
    """NaN passes every bound check and inf means nothing for any setting: --tis-cap nan (TIS silently
    off), --overlong-penalty nan, --format-weight nan, --accuracy-weight inf (a run that diverges later)
    and every other float flag of every stage stop before any work."""
    checked = set()
    for cls, presets in stage_configs():
        for f in dataclasses.fields(cls):
            if f.type not in ("float", float):
                continue
            flag = "--" + f.name.replace("_", "-")
            for bad in ("nan", "inf", "-inf"):
                given = [f"{flag}={bad}"]  # `--x -inf` would read as two flags
                assert refused(cls, presets, given) == f"error: {flag} must be a finite number, got {float(bad)}"
            checked.add(flag)
    assert {"--tis-cap", "--overlong-penalty", "--format-weight", "--accuracy-weight", "--warmup-ratio"} <= checked


def test_seed_sinks_and_output_dir_follow_one_rule_in_every_stage():
    lo, hi = config.SEED_RANGE
    for cls, presets in stage_configs():
        names = {f.name for f in dataclasses.fields(cls)}
        if "seed" in names:  # numpy's range: 2**32 was a numpy traceback at setup
            assert refused(cls, presets, ["--seed", str(hi + 1)]) == (
                f"error: --seed must be in [0, {hi}] (numpy's seed range), got {hi + 1}"
            )
            assert config.parse_config(cls, presets, ["--seed", str(hi)]).seed == hi
            assert refused(cls, presets, ["--seed", "-1"]).startswith("error: --seed must be")
        if "report_to" in names:  # a typo logged nothing anywhere
            assert refused(cls, presets, ["--report-to", "wandbb"]) == (
                "error: --report-to names unknown metric sink(s) ['wandbb']; choose from wandb,tensorboard "
                "(or leave it empty)"
            )
            assert config.parse_config(cls, presets, ["--report-to", "tensorboard,wandb"]).report_to
        if "output_dir" in names:  # "" wrote into the working directory
            assert refused(cls, presets, ["--output-dir", ""]) == (
                "error: --output-dir is empty; give the folder the run writes into"
            )
    assert lo == 0 and hi == 2**32 - 1


# ---------------------------------------------------------------------------------------------
# 6. Damaged checkpoints; trainer_state.pt loads with weights_only=True
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def two_checkpoints(tmp_path, toy_dir):
    """out/step-2 and out/step-4, complete training checkpoints of the toy model."""
    d = dist.Dist(0, 1, 0, torch.device("cpu"))
    model = modeling.load_model(str(toy_dir / "model"), d.device, trainable=True)
    processor = modeling.load_processor(str(toy_dir / "model"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = grpo.GRPOConfig()
    for step in (2, 4):
        checkpoint.save_training_checkpoint(
            model, processor, optimizer, tmp_path / "out" / f"step-{step}", d, step, cfg
        )
    return tmp_path / "out", model, processor, optimizer, d


def test_trainer_state_loads_with_weights_only_and_restores_rng(two_checkpoints):
    import random

    import numpy as np

    out, model, processor, optimizer, d = two_checkpoints
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.save_training_checkpoint(model, processor, optimizer, out / "step-6", d, 6, grpo.GRPOConfig())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    state = torch.load(out / "step-6" / "trainer_state.pt", weights_only=True)  # plain types and tensors only
    assert state["step"] == 6 and state["config"] == dataclasses.asdict(grpo.GRPOConfig())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.load_training_checkpoint(out / "step-6", model, optimizer, d)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(two_checkpoints, capsys):
    out = two_checkpoints[0]
    assert checkpoint.latest_checkpoint(out) == out / "step-4"
    (out / "step-4" / "trainer_state.pt").write_bytes(b"")  # an empty trainer state (EOFError inside torch.load)
    assert checkpoint.latest_checkpoint(out) == out / "step-2"
    assert f"passing over damaged checkpoint(s): {out / 'step-4' / 'trainer_state.pt'} is unreadable" in (
        capsys.readouterr().out
    )
    weights = out / "step-2" / "model.safetensors"  # a truncated weight file (SafetensorError)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(config.CheckpointError) as error:
        checkpoint.latest_checkpoint(out)
    message = str(error.value)
    assert message.startswith(f"no complete checkpoint in {out} to resume from: ")
    assert f"{out / 'step-4' / 'trainer_state.pt'} is unreadable" in message
    assert f"{weights} is unreadable (SafetensorError" in message and "\n" not in message


def test_checkpoint_with_pickled_objects_is_refused(two_checkpoints):
    out = two_checkpoints[0]
    import numpy as np

    torch.save(
        {"step": 4, "optimizer": {}, "config": {}, "rng": [{"numpy": np.random.get_state()}]},
        out / "step-4" / "trainer_state.pt",
    )
    with pytest.raises(config.CheckpointError, match=r"step-4/trainer_state\.pt is unreadable"):
        checkpoint_checks.load_trainer_state(out / "step-4")
    assert checkpoint.latest_checkpoint(out, master=False) == out / "step-2"


# ---------------------------------------------------------------------------------------------
# 7. Resume with changed settings
# ---------------------------------------------------------------------------------------------


def fake_checkpoint(folder, cfg, step=2, rows=16):
    folder.mkdir(parents=True)
    torch.save(
        {"step": step, "optimizer": {}, "rng": [], "config": dataclasses.asdict(cfg), "rows": rows},
        folder / "trainer_state.pt",
    )
    return folder


def test_resume_refuses_changes_that_break_exactness(tmp_path):
    saved = grpo.GRPOConfig(train_limit=16, rollout_batch_size=4)
    ckpt = fake_checkpoint(tmp_path / "step-2", saved)
    changed = dataclasses.replace(saved, rollout_batch_size=8, train_limit=12, seed=1, resume=True)
    with pytest.raises(config.CheckpointError) as error:
        checkpoint.check_resume(ckpt, changed, grpo.RESUME_MAY_CHANGE, 12, 30, tmp_path, True)
    message = str(error.value)
    for part in (
        "--train-limit 16 -> 12",
        "--rollout-batch-size 4 -> 8",
        "--seed 0 -> 1",
        "the data now gives 12 rows, the checkpoint was trained on 16",
        "or a new --output-dir",
    ):
        assert part in message
    assert "--resume False -> True" not in message  # resume itself is no change of the run
    with pytest.raises(config.CheckpointError, match="end at step 1, before the checkpoint's step 2"):
        checkpoint.check_resume(
            ckpt, dataclasses.replace(saved, max_steps=1), grpo.RESUME_MAY_CHANGE, 16, 1, tmp_path, True
        )
    assert not (tmp_path / "config_changes.jsonl").exists()


def test_resume_records_harmless_changes(tmp_path, capsys):
    saved = grpo.GRPOConfig(train_limit=16, rollout_batch_size=4)
    ckpt = fake_checkpoint(tmp_path / "step-2", saved)
    longer = dataclasses.replace(saved, max_steps=60, report_to="tensorboard", resume=True, stop_after=3)
    checkpoint.check_resume(ckpt, longer, grpo.RESUME_MAY_CHANGE, 16, 60, tmp_path, True)
    record = json.loads((tmp_path / "config_changes.jsonl").read_text())
    assert record["step"] == 2 and record["changes"] == {"max_steps": [30, 60], "report_to": ["", "tensorboard"]}
    assert "with changed settings" in capsys.readouterr().out


def test_resume_compares_options_the_checkpoint_predates_as_their_defaults(tmp_path):
    """A checkpoint written before --dynamic-sampling / --tis-cap / --ratio-level existed lacks them in its
    config: they read as their defaults (the behaviour before the option), so turning one on is refused
    like any other change, the same settings resume silently, and a harmless one is recorded."""
    saved = grpo.GRPOConfig(train_limit=16, rollout_batch_size=4)
    newer = ("dynamic_sampling", "tis_cap", "ratio_level", "reward_workers")
    ckpt = tmp_path / "step-2"
    ckpt.mkdir()
    old_config = {k: v for k, v in dataclasses.asdict(saved).items() if k not in newer}
    torch.save({"step": 2, "rng": [], "config": old_config, "rows": 16}, ckpt / "trainer_state.pt")
    checkpoint.check_resume(ckpt, saved, grpo.RESUME_MAY_CHANGE, 16, 30, tmp_path, True)
    assert not (tmp_path / "config_changes.jsonl").exists()
    changed = dataclasses.replace(saved, dynamic_sampling=True, tis_cap=2.0, ratio_level="sequence")
    with pytest.raises(config.CheckpointError) as error:
        checkpoint.check_resume(ckpt, changed, grpo.RESUME_MAY_CHANGE, 16, 30, tmp_path, True)
    for part in ("--dynamic-sampling False -> True", "--tis-cap 0.0 -> 2.0", "--ratio-level 'token' -> 'sequence'"):
        assert part in str(error.value)
    workers = grpo.GRPOConfig.reward_workers
    checkpoint.check_resume(ckpt, dataclasses.replace(saved, reward_workers=0), grpo.RESUME_MAY_CHANGE, 16, 30,
                            tmp_path, True)  # fmt: skip
    assert json.loads((tmp_path / "config_changes.jsonl").read_text())["changes"] == {"reward_workers": [workers, 0]}


def test_sft_resume_with_another_batch_size_is_refused_and_a_longer_run_allowed(toy_dir, tmp_path):
    data_dir = toy_dir / "data"
    args = [
        "sft.py",
        "--model",
        str(toy_dir / "model"),
        "--data",
        f"{data_dir / 'sft'}@train",
        "--val-data",
        "",
        "--acc-limit",
        "-1",
        "--output-dir",
        str(tmp_path / "run"),
        "--batch-size",
        "4",
        "--micro-batch-size",
        "4",
        "--save-every",
        "1",
    ]
    run_script(args + ["--max-steps", "2"])
    proc = launch(args + ["--max-steps", "2", "--resume", "--batch-size", "8"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"error: --resume from {tmp_path / 'run' / 'final'} would not continue")
        and "--batch-size 4 -> 8" in last
    )
    out = run_script(args + ["--max-steps", "3", "--resume"])
    assert "with changed settings: {'max_steps': [2, 3]}" in out.stdout
    assert json.loads((tmp_path / "run" / "config_changes.jsonl").read_text())["changes"] == {"max_steps": [2, 3]}
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and json.loads((tmp_path / "run" / "config.json").read_text())["max_steps"] == 3


# ---------------------------------------------------------------------------------------------
# 8. reward.py input errors; 9. its output file and the unclosed \boxed
# ---------------------------------------------------------------------------------------------


def test_reward_cli_scores_every_readable_line_and_names_the_rest(tmp_path, capsys):
    good = {"id": "a", "response": "<think>t</think><answer>\\boxed{4}</answer>", "answer": "4"}
    number = {"id": "b", "response": "<think>t</think><answer>\\boxed{2.5}</answer>", "answer": 2.5}
    lines = [
        json.dumps(good).encode(),
        b'{"id": "x", "response": "\xff\xfe", "answer": "1"}',
        b'{"id": "y", "response": "r", "answer": }',
        json.dumps(number).encode(),
        b'{"id": "z", "response": "r"}',
    ]
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(b"\n".join(lines) + b"\n")
    reward.main([str(preds), "--workers", "0"])
    captured = capsys.readouterr()
    assert f"{preds} line 2: not UTF-8 (byte 0xff at column 26)" in captured.err
    assert f"{preds} line 3: not valid JSON (Expecting value at column 40)" in captured.err
    assert f"{preds} line 5: needs an object with 'response' and 'answer'" in captured.err
    assert "rows       2" in captured.out and "accuracy   1.0000" in captured.out and "skipped    3" in captured.out
    scores = [json.loads(x) for x in (tmp_path / "preds.scores.jsonl").read_text().splitlines()]
    assert [(s["id"], s["line"], s["accuracy"]) for s in scores] == [("a", 1, 1.0), ("b", 4, 1.0)]
    reward.main([str(preds), "--workers", "0"])  # a second run says it replaces the scores file
    assert "(replaced the previous file)" in capsys.readouterr().out


def test_reward_cli_without_a_readable_row_is_one_line(tmp_path):
    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(b"\xff\n")
    with pytest.raises(SystemExit, match=r"preds\.jsonl: no scorable rows \(1 unreadable lines"):
        reward.main([str(preds), "--workers", "0"])


def test_unclosed_boxed_in_the_answer_block_earns_nothing():
    text = "<think>t</think><answer>\\boxed{3</answer>"
    assert reward.extract_answer(text) is None
    assert reward.accuracy_reward(text, "3") == 0.0 and reward.format_reward(text) == 0.0
    assert reward.extract_answer("<answer>3</answer>") == "3"  # a bare answer still counts
    assert reward.extract_answer("<think>\\boxed{2}</think><answer>\\boxed{3</answer>") == "2"  # the last closed box
    assert math.isclose(reward.accuracy_reward("<answer>\\boxed{3}</answer>", reward.answer_text(3.0)), 1.0)
