"""The door (mmr1/prepare.py) and the trusting loop (issue 27).

Every row-level case of the issue ends in a one-line `error:` naming the row, or with
--skip-bad-rows in a counted removal reported once; the door counts tokens as the prompt builder
does; the loops stay short; a decode failure at use follows the same rule.
"""

import ast
import json

import pytest
import torch
from PIL import Image

from conftest import ROOT, launch, prompt_texts, run_script, sft_cut_problem
from data import toy
from mmr1 import batches, chat, config, data, dist, modeling, prepare, rollout

ONE = dist.Dist(0, 1, 0, torch.device("cpu"))
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json.dumps keeps "\ud83d" as an escape
    return path


def grid(path):
    toy.draw_grid(["red", "blue", "green", "yellow"]).save(path)
    return str(path)


def rl_rows(tmp_path):
    """Two good RL rows, then one row for each bad case of the issue (ids say which)."""
    img = grid(tmp_path / "img.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "garbage.png").write_bytes(b"this is no image at all")

    def row(i, problem="<image>How many red squares?", image=img):
        return {"id": i, "problem": problem, "answer": "1", "images": [image]}

    return [
        row("good0"),
        row("good1"),
        row("missing", image=str(tmp_path / "gone.png")),
        row("folder", image=str(tmp_path / "folder.png")),
        row("corrupt", image=str(tmp_path / "garbage.png")),
        row("surrogate", problem="<image>How many \ud83d squares?"),
        row("placeholder", problem=f"{PLACEHOLDER}How many red squares?"),
        row("long", problem="<image>" + "How many red squares? " * 40),
    ]


def sft_rows(tmp_path):
    """ShareGPT rows (the MMR1-SFT layout): two good ones, a lone surrogate, Qwen's placeholder typed in."""
    img = grid(tmp_path / "img.png")

    def row(i, human="<image>How many red squares?"):
        turns = [{"from": "human", "value": human}, {"from": "gpt", "value": "<think>one</think>\\boxed{1}"}]
        return {"id": i, "conversations": turns, "images": [img]}

    return [row("good0"), row("good1"), row("surrogate", "<image>Count \ud83d them"), row("placeholder", PLACEHOLDER)]


@pytest.fixture(scope="module")
def processor(toy_dir):
    return modeling.load_processor(str(toy_dir / "model"), 3136, 50176)


def test_door_names_every_rl_case_and_reports_counts(processor, tmp_path, capsys):
    path = write_jsonl(tmp_path / "rl.jsonl", rl_rows(tmp_path))
    door = prepare.Door("rl", 3136, 50176, 96)
    with pytest.raises(config.BadRowError) as stopped:
        prepare.prepare_split(str(path), door, processor, ONE)
    assert str(stopped.value).startswith(f"{path} line 3 (id=missing): image 0: no such file ")
    report = capsys.readouterr().out.strip().splitlines()[-1]
    assert report.startswith(f"[data] {path}: 8 rows, 6 left out (") and "(--skip-bad-rows leaves them out)" in report
    for count in ("2 missing image", "1 unreadable image", "1 invalid text", "1 special token in text",
                  "1 prompt too long"):  # fmt: skip
        assert count in report, count
    assert "first: " in report and "(id=missing)" in report and "(id=folder)" in report  # first rows named

    rows = prepare.prepare_split(str(path), door, processor, ONE, skip_bad_rows=True)
    assert [r["id"] for r in rows] == ["good0", "good1"] and isinstance(rows, data.Rows)
    messages = {line.split("(id=")[1].split(")")[0]: line for line in report.split("; ")[1:]}
    assert set(messages) <= {"missing", "folder", "corrupt"}  # the first three named, in row order


@pytest.mark.parametrize(
    "bad, message",
    [
        ("missing", "image 0: no such file"),
        ("folder", "is a folder, not an image file"),
        ("corrupt", "image 0 is unreadable (UnidentifiedImageError"),
        ("surrogate", "'problem' holds a lone surrogate '\\ud83d' at character 16"),
        ("placeholder", "'problem' contains the model's own token <|image_pad|>"),
        ("long", "the prompt is "),
    ],
)
def test_each_rl_case_alone_is_one_named_error(processor, tmp_path, bad, message):
    rows = [r for r in rl_rows(tmp_path) if r["id"] in ("good0", bad)]
    path = write_jsonl(tmp_path / "rl.jsonl", rows)
    with pytest.raises(config.BadRowError) as stopped:
        prepare.prepare_split(str(path), prepare.Door("rl", 3136, 50176, 96), processor, ONE)
    assert str(stopped.value).startswith(f"{path} line 2 (id={bad}): ") and message in str(stopped.value)


def test_sft_surrogate_and_typed_placeholder(processor, tmp_path, capsys):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(sft_rows(tmp_path)))  # a JSON array, as MMR1-SFT's sft.json
    door = prepare.Door("sft", 3136, 50176, 0)
    with pytest.raises(config.BadRowError, match=r"row 2 \(id=surrogate\): message 0 \(user\) holds a lone surrogate"):
        prepare.prepare_split(str(path), door, processor, ONE)
    assert "4 rows, 2 left out (1 invalid text, 1 special token in text)" in capsys.readouterr().out
    rows = prepare.prepare_split(str(path), door, processor, ONE, skip_bad_rows=True)
    assert [r["id"] for r in rows] == ["good0", "good1"]
    micro = batches.sft_micro_batches(processor, list(rows), 3136, 50176, 0, 0, 2)  # the processor takes them
    assert micro[0]["input_ids"].shape[0] == 2


def test_door_counts_tokens_as_the_prompt_builder(processor, tmp_path):
    """decode=False (headers) gives the ids of the decoded prompt, which are the processor's own."""
    Image.new("RGB", (300, 90), "red").save(tmp_path / "wide.png")
    exif = Image.new("RGB", (200, 60), "blue")
    info = exif.getexif()
    info[0x0112] = 6  # stored sideways: load_image turns it upright (60 x 200)
    exif.save(tmp_path / "turned.jpg", exif=info)
    rows = [
        {"problem": "<image>How many?", "images": [str(tmp_path / "wide.png")]},
        {
            "problem": "Compare <image> and <image>.",
            "images": [str(tmp_path / "turned.jpg"), str(tmp_path / "wide.png")],
        },
        {"problem": "No image " * 30},
    ]
    fmt = chat.PromptFormat(instruction="Think.")
    headers = batches.build_prompts(processor, rows, fmt, 3136, 50176, decode=False)
    decoded = batches.build_prompts(processor, rows, fmt, 3136, 50176)
    assert [p.ids for p in headers] == [p.ids for p in decoded]
    reference = batches.processor_inputs(processor, prompt_texts(processor, rows, fmt), [p.images for p in decoded])
    padded = rollout.left_padded(decoded, processor.tokenizer.pad_token_id, processor.image_token_id)
    for key in reference:  # what HF generate gets equals the processor's batch, tensor for tensor
        assert torch.equal(reference[key], padded[key]), key


def test_sft_cut_rule_from_headers_equals_the_batch_rule(processor, tmp_path):
    img = grid(tmp_path / "img.png")
    answer = {"role": "assistant", "content": "<think>two</think><answer>\\boxed{2}</answer>"}
    rows = [
        {"messages": [{"role": "user", "content": "<image>How many?"}, answer], "images": [img]},
        {"messages": [{"role": "user", "content": "<image>" + "red blue " * 40}, answer], "images": [img]},
        {"messages": [{"role": "user", "content": "red blue " * 16 + "<image>How many?"}, answer], "images": [img]},
    ]
    for max_length in (40, 64, 120, 0):
        for row in rows:
            uncut = batches.sft_batch(processor, [row], 3136, 50176, 0)
            n, last_image, first_label = batches.sft_layout(processor, row, 3136, 50176)
            assert n == int(uncut["attention_mask"].sum())
            assert batches.cut_problem(n, last_image, first_label, max_length) == sft_cut_problem(
                uncut, max_length, processor.image_token_id
            )


def test_door_table_is_cached_by_content_settings_and_image_files(processor, tmp_path, monkeypatch):
    """The door's table is reused for the same data, settings and image files (no row judged again);
    another setting, or an image replaced by a larger one, makes the door look again: the larger
    image's prompt no longer fits and is named, where a verdict keyed by the data alone kept it."""
    path = write_jsonl(tmp_path / "rl.jsonl", rl_rows(tmp_path)[:3])
    door = prepare.Door("rl", 3136, 50176, 96)
    first = [r["id"] for r in prepare.prepare_split(str(path), door, processor, ONE, skip_bad_rows=True)]
    calls = []
    real = prepare.judge
    monkeypatch.setattr(prepare, "judge", lambda *a: calls.append(a) or real(*a))
    again = prepare.prepare_split(str(path), door, processor, ONE, skip_bad_rows=True)
    assert [r["id"] for r in again] == first == ["good0", "good1"] and calls == []  # from the table
    prepare.prepare_split(str(path), prepare.Door("rl", 3136, 50176, 97), processor, ONE, skip_bad_rows=True)
    assert len(calls) == 3  # another setting: every row judged
    fits = prepare.Door("rl", 3136, 50176, int(again.prompt_tokens[0]) + 8)  # the door's own token count
    assert len(prepare.prepare_split(str(path), fits, processor, ONE, skip_bad_rows=True)) == 2
    calls.clear()
    toy.draw_grid(["red", "blue", "green", "yellow"]).resize((224, 224)).save(tmp_path / "img.png")  # 4x the tokens
    with pytest.raises(config.BadRowError, match=r"line 1 \(id=good0\): the prompt is \d+ tokens, above"):
        prepare.prepare_split(str(path), fits, processor, ONE, skip_bad_rows=False)
    assert len(calls) == 3


def test_only_regular_files_are_read_as_images(processor, tmp_path):
    """A FIFO would block open() forever and a device never ends: the door names them in one line
    (and image decoding refuses them too), never hangs."""
    import os

    os.mkfifo(tmp_path / "pipe.png")
    for image in (str(tmp_path / "pipe.png"), "/dev/zero"):
        path = write_jsonl(
            tmp_path / "rl.jsonl", [{"id": "x", "problem": "<image>Q", "answer": "1", "images": [image]}]
        )
        with pytest.raises(config.BadRowError, match=rf"\(id=x\): image 0: {image} is not a regular file"):
            prepare.prepare_split(str(path), prepare.Door("rl", 3136, 50176, 96), processor, ONE)
        with pytest.raises(ValueError, match="is not a regular file"):
            data.decode_images({"images": [image]}, 3136, 50176)
    os.mkfifo(tmp_path / "pipe.jsonl")  # nor as data
    with pytest.raises(config.BadRowError, match="pipe.jsonl: not a regular file or folder"):
        prepare.load_rows(str(tmp_path / "pipe.jsonl"), "rl")


def test_a_decode_failure_at_use_follows_the_same_rule(processor, tmp_path):
    """The header decodes, the pixels do not (a truncated PNG): the door passes it, the loop's one
    check names it, or with --skip-bad-rows the row is passed over (the next row takes its place)."""
    img = grid(tmp_path / "img.png")
    blob = open(img, "rb").read()
    (tmp_path / "cut.png").write_bytes(blob[: len(blob) // 2])
    path = write_jsonl(tmp_path / "rl.jsonl", [
        {"id": "cut", "problem": "<image>Q", "answer": "1", "images": [str(tmp_path / "cut.png")]},
        {"id": "good", "problem": "<image>Q", "answer": "1", "images": [img]},
    ])  # fmt: skip
    door = prepare.Door("rl", 3136, 50176, 96)
    rows = prepare.prepare_split(str(path), door, processor, ONE)
    with pytest.raises(config.BadRowError, match=r"line 1 \(id=cut\): image 0 is unreadable"):
        rows[0]
    rows = prepare.prepare_split(str(path), door, processor, ONE, skip_bad_rows=True)
    assert [r["id"] for r in rows] == ["good", "good"] and rows.skipped == 1


def grpo_args(toy_dir, data_path, out, *extra):
    return ["grpo.py", "--model", str(toy_dir / "model"), "--data", str(data_path), "--max-prompt-length", "96",
            "--rollout-batch-size", "2", "--group-size", "2", "--max-steps", "1", "--val-every", "0",
            "--reward-workers", "0", "--max-response-length", "4", "--updates-per-batch", "1",
            "--output-dir", str(out), *extra]  # fmt: skip


def run_failing(args):

    proc = launch(args)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("bad", ["missing", "folder", "corrupt", "surrogate"])
def test_grpo_bad_rows_are_one_line_errors(toy_dir, tmp_path, bad):
    rows = [r for r in rl_rows(tmp_path) if r["id"] in ("good0", "good1", bad)]
    path = write_jsonl(tmp_path / "rl.jsonl", rows)
    proc = run_failing(grpo_args(toy_dir, path, tmp_path / "run"))
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: {path} line 3 (id={bad}): ")


def test_grpo_skip_bad_rows_removes_them_counted_and_trains(toy_dir, tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", rl_rows(tmp_path))
    proc = run_script(grpo_args(toy_dir, path, tmp_path / "run", "--skip-bad-rows", "--vas", "--vas-rollouts", "2"))
    assert f"[data] {path}: 8 rows, 6 left out (" in proc.stdout
    assert "[grpo] 2 prompts, 1 steps" in proc.stdout
    (step,) = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert step["rollout/generated_responses"] == 2 * 2 + 2 * 2  # VAS scored the 2 kept prompts, then one step
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_sft_surrogate_and_placeholder_stop_or_are_skipped(toy_dir, tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(sft_rows(tmp_path)))
    args = ["sft.py", "--model", str(toy_dir / "model"), "--data", str(path), "--val-data", "", "--acc-limit", "-1",
            "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "1"]  # fmt: skip
    proc = run_failing(args + ["--output-dir", str(tmp_path / "run")])
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {path} row 2 (id=surrogate): message 0 (user)")
    proc = run_script(args + ["--output-dir", str(tmp_path / "skip"), "--skip-bad-rows"])
    assert "4 rows, 2 left out (1 invalid text, 1 special token in text)" in proc.stdout
    assert "[sft] 2 rows, 1 steps" in proc.stdout


def test_the_loops_are_short():
    """grpo.py:main and sft.py:main read as the algorithm: at most 100 lines each."""
    for script in ("grpo.py", "sft.py"):
        tree = ast.parse((ROOT / script).read_text())
        (main,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
        assert main.end_lineno - main.lineno + 1 <= 100, script
        body = ast.get_source_segment((ROOT / script).read_text(), main)
        for name in ("fitting_prompts", "skip_bad_rows", "undecoded", "BadRowError", "load_rows", "all_gather"):
            assert name not in body, (script, name)  # no row checks or skip bookkeeping inside


def test_run_teardown_closes_the_logger_however_the_loop_ends(tmp_path, monkeypatch):
    """mmr1/run.py is the one loop tail: --stop-after and preemption end without final/ but close
    the metric logger (sft.py's --stop-after used to leave wandb / tensorboard runs unfinished);
    a complete run saves final/."""
    import signal
    from types import SimpleNamespace

    from mmr1 import run

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for stop_after, steps_run, final in ((2, [1, 2], False), (0, [1, 2, 3], True)):
            cfg = SimpleNamespace(resume=False, model="m", skip_nonfinite=0, report_to="", save_every=0,
                                  stop_after=stop_after)  # fmt: skip
            out = tmp_path / f"stop{stop_after}"
            r = run.Run(cfg, ONE, out, "sft", set(), 10, 3)
            saved = []
            assert r.start(None, None, lambda folder, step, saved=saved: saved.append((folder.name, step))) is None
            closed = []
            monkeypatch.setattr(r.logger, "close", lambda closed=closed: closed.append(True))
            ran = []
            for step in r.steps():
                ran.append(step + 1)
                if r.end_step(step + 1, {"train/loss": 1.0}):
                    break
            r.finish()
            assert ran == steps_run and closed == [True]
            assert saved == ([("final", 3)] if final else [])
            logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
            assert logged == steps_run
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
