"""Nothing silently wrong: a diverged run, two runs into one folder, unusable --model /
--output-dir / --bench-data, a full disk during a save, a resume on another world size, and a
benchmark without a usable row each end in one `error: ...` line, a counted skip or a right result."""

import dataclasses
import errno
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import grpo
from conftest import ROOT, launch, run_script, sft_cut_problem
from mmr1 import checkpoint, checkpoint_checks, config, dist, guards, modeling


def run_failing(args: list[str], torchrun: int = 0, timeout: int = 300) -> str:
    """Runs a stage script that must fail with exit 1 and no traceback; returns its stderr."""
    proc = launch(args, timeout=timeout, torchrun=torchrun)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    if not torchrun:  # torchrun adds its own report of the failed ranks
        assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc.stderr


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def sft_args(toy_dir, out, *extra: str) -> list[str]:
    return ["sft.py", "--model", str(toy_dir / "model"), "--data", f"{toy_dir / 'data' / 'sft'}@train",
            "--val-data", "", "--acc-limit", "-1", "--output-dir", str(out), "--batch-size", "4",
            "--micro-batch-size", "2", *extra]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 1. A diverged run
# ---------------------------------------------------------------------------------------------


def test_nonfinite_guard_counts_then_stops():
    guard = guards.NonFiniteGuard(allowed=1)
    assert guard.check(1, 2.5, 0.3) is True
    assert guard.check(2, math.nan, 0.3) is False and guard.skipped == 1
    guard.last_good = ROOT / "out" / "step-2"
    with pytest.raises(guards.DivergedError) as e:
        guard.check(3, 1.0, math.inf)
    assert str(e.value).startswith("step 3: loss 1.0, grad norm inf: the run diverged (after skipping 1)")
    assert f"last good checkpoint: {ROOT / 'out' / 'step-2'}" in str(e.value)


def test_clip_and_step_takes_no_step_on_a_nonfinite_gradient():
    layer = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in layer.parameters()]
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    (layer(torch.tensor([[1.0, math.nan, 0.0]])).sum()).backward()
    assert math.isnan(modeling.clip_and_step(list(layer.parameters()), optimizer, 1.0))
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters())) and not optimizer.state
    assert all(p.grad is None for p in layer.parameters())
    layer(torch.ones(1, 3)).sum().backward()
    assert math.isfinite(modeling.clip_and_step(list(layer.parameters()), optimizer, 1.0))
    assert not torch.equal(before[0], layer.weight)


def test_sft_diverged_run_stops_before_saving(toy_dir, tmp_path):
    out = tmp_path / "run"
    args = sft_args(toy_dir, out, "--max-steps", "4", "--lr", "1e4", "--save-every", "2")
    line = last_line(run_failing(args))
    assert line.startswith("error: step 2: loss ") and "grad norm nan: the run diverged" in line
    assert line.endswith("last good checkpoint: none (lower --lr, or --skip-nonfinite N to skip up to N such steps)")
    assert not (out / "step-2").exists() and not (out / "final").exists()
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1] and math.isfinite(steps[0]["train/grad_norm"])

    line = last_line(run_failing(args + ["--skip-nonfinite", "1", "--output-dir", str(tmp_path / "skip")]))
    assert line.startswith("error: step 3: ") and "the run diverged (after skipping 1)" in line
    steps = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [(s["step"], s["train/skipped_nonfinite"]) for s in steps] == [(1, 0), (2, 1)]
    # the skipped step took no optimizer step: step-2 holds the finite weights of step 1, the last good one
    assert f"last good checkpoint: {tmp_path / 'skip' / 'step-2'} " in line
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "skip" / "step-2" / "model.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in weights.values())


# ---------------------------------------------------------------------------------------------
# 3. One run per --output-dir; 8. resume on another world size
# ---------------------------------------------------------------------------------------------

HOLD = "import sys, time; sys.path.insert(0, {root!r}); from mmr1 import guards; guards.lock_output_dir({out!r}); print('held', flush=True); time.sleep(600)"  # noqa: E501


def test_output_dir_lock_refuses_a_second_run_and_not_after_a_kill(toy_dir, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(root=str(ROOT), out=str(out))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        line = last_line(run_failing(sft_args(toy_dir, out, "--max-steps", "1")))
        assert line.startswith(f"error: --output-dir {out} is in use by another run (pid {holder.pid} on ")
        assert line.endswith("wait for it or use another --output-dir")
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # as a killed run: the kernel drops its flock
        holder.wait()
    assert f"pid {holder.pid}" in (out / ".lock").read_text()  # the stale file stays and does not block
    run_script(sft_args(toy_dir, out, "--max-steps", "1", "--save-every", "1"))
    assert (out / "final" / "config.json").exists()

    # 8: that 1-process checkpoint resumed by 2 processes is refused in one line
    stderr = run_failing(sft_args(toy_dir, out, "--max-steps", "2", "--resume"), torchrun=2)
    assert (
        f"error: --resume from {out / 'final'} would not continue that run exactly: it was trained on 1 "
        "process(es) and this run has 2" in stderr
    )
    assert "KeyError" not in stderr
    guards.lock_output_dir(out)  # free again; a second holder (another open file) is refused
    try:
        with pytest.raises(config.InputError, match=f"pid {os.getpid()} on "):
            guards.lock_output_dir(out)
    finally:
        guards._HELD_LOCKS.pop().close()


def test_resume_on_another_world_size_is_refused(tmp_path, monkeypatch):
    cfg = grpo.GRPOConfig(train_limit=16)
    folder = tmp_path / "step-2"
    folder.mkdir()
    state = {"step": 2, "optimizer": {}, "rng": [{}, {}], "config": dataclasses.asdict(cfg), "rows": 16}
    torch.save(state, folder / "trainer_state.pt")  # no world_size entry: the world size is its 2 RNG states
    args = (folder, cfg, grpo.RESUME_MAY_CHANGE, 16, 30, tmp_path, True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(config.CheckpointError, match="trained on 2 process\\(es\\) and this run has 1"):
        checkpoint.check_resume(*args)
    monkeypatch.setenv("WORLD_SIZE", "2")
    checkpoint.check_resume(*args)  # the same world size: allowed
    torch.save({**state, "world_size": 4}, folder / "trainer_state.pt")
    with pytest.raises(config.CheckpointError, match="trained on 4 process\\(es\\) and this run has 2"):
        checkpoint.check_resume(*args)


# ---------------------------------------------------------------------------------------------
# 10. Unusable --model, --output-dir, --bench-data; a full disk during a save
# ---------------------------------------------------------------------------------------------


def stage_args(stage: str, toy_dir, model: str, out: str) -> list[str]:
    data = {"sft.py": f"{toy_dir / 'data' / 'sft'}@train", "grpo.py": f"{toy_dir / 'data' / 'rl'}@train"}
    if stage == "eval.py":
        return [stage, "--model", model, "--benchmarks", "mathvista", "--output-dir", out]
    return [stage, "--model", model, "--data", data[stage], "--output-dir", out]


@pytest.mark.parametrize("stage", ["sft.py", "grpo.py", "eval.py"])
def test_model_folder_without_a_model_is_one_line(stage, toy_dir, tmp_path):
    empty, config_only = tmp_path / "empty", tmp_path / "config-only"
    empty.mkdir()
    config_only.mkdir()
    (config_only / "config.json").write_text((toy_dir / "model" / "config.json").read_text())
    line = last_line(run_failing(stage_args(stage, toy_dir, str(empty), str(tmp_path / "out"))))
    assert line == f"error: --model {empty}: an empty folder, not a model (config.json, weights, tokenizer)"
    line = last_line(run_failing(stage_args(stage, toy_dir, str(config_only), str(tmp_path / "out"))))
    assert line == (
        f"error: --model {config_only}: not a model folder, it has no weights (*.safetensors), "
        "a tokenizer (tokenizer.json)"
    )


@pytest.mark.parametrize("stage", ["sft.py", "grpo.py", "eval.py"])
def test_unusable_output_dir_is_one_line(stage, toy_dir, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    model = str(toy_dir / "model")
    line = last_line(run_failing(stage_args(stage, toy_dir, model, str(a_file))))
    assert line == f"error: --output-dir {a_file}: is an existing file, not a folder"
    line = last_line(run_failing(stage_args(stage, toy_dir, model, str(a_file / "sub"))))
    assert line.startswith(f"error: --output-dir {a_file / 'sub'}: cannot write there (")
    assert not list(tmp_path.glob("**/*.jsonl"))  # nothing generated or written first


def test_check_model_dir_accepts_a_model_and_leaves_hub_ids(toy_dir, tmp_path):
    guards.check_model_dir(str(toy_dir / "model"))
    guards.check_model_dir("Qwen/Qwen2.5-VL-7B-Instruct")  # not on disk: the hub loader's business
    with pytest.raises(config.InputError, match="no such folder"):
        guards.check_model_dir(str(tmp_path / "nope"))


def test_missing_bench_data_file_is_one_line(toy_dir, tmp_path):
    missing = tmp_path / "mv.parquet"
    args = ["eval.py", "--model", str(toy_dir / "model"), "--benchmarks", "mathvista",
            "--bench-data", f"mathvista={missing}", "--output-dir", str(tmp_path / "eval")]  # fmt: skip
    assert last_line(run_failing(args)) == f"error: --bench-data mathvista={missing}: no such file"


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(toy_dir, tmp_path, monkeypatch):
    d = dist.Dist(0, 1, 0, torch.device("cpu"))
    model = modeling.load_model(str(toy_dir / "model"), d.device, trainable=True)
    processor = modeling.load_processor(str(toy_dir / "model"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = grpo.GRPOConfig()
    folder = tmp_path / "out" / "step-2"
    checkpoint.save_training_checkpoint(model, processor, optimizer, folder, d, 2, cfg)
    before = sorted(p.name for p in folder.iterdir())

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(config.CheckpointError) as e:
        checkpoint.save_training_checkpoint(model, processor, optimizer, folder, d, 4, cfg)
    assert str(e.value) == (
        f"could not write checkpoint {folder} (OSError: [Errno 28] No space left on device); its temp folder "
        f"{folder.with_name('step-2.tmp')} was removed and the previous checkpoints are intact"
    )
    assert not folder.with_name("step-2.tmp").exists()
    assert sorted(p.name for p in folder.iterdir()) == before and checkpoint_checks.checkpoint_problem(folder) is None
    assert checkpoint_checks.load_trainer_state(folder)["step"] == 2


# ---------------------------------------------------------------------------------------------
# 9. eval: a benchmark with no usable row; relative image paths
# ---------------------------------------------------------------------------------------------


def test_eval_marks_a_benchmark_without_usable_rows_and_resolves_relative_images(toy_dir, tmp_path):
    import datasets

    from data import toy

    bench = tmp_path / "bench"
    (bench / "img").mkdir(parents=True)
    toy.draw_grid(["red", "blue", "green", "yellow"]).save(bench / "img" / "a.png")
    chart = [{"question": "Value?", "image": {"bytes": None, "path": "img/a.png"}, "answer": "12",
              "type": "human_test"}]  # fmt: skip
    vista = [{"pid": "1", "question": "Count?", "decoded_image": None, "choices": None, "answer": "3",
              "question_type": "free_form", "answer_type": "integer", "precision": None}]  # fmt: skip
    datasets.Dataset.from_list(chart).to_parquet(str(bench / "chartqa.parquet"))
    datasets.Dataset.from_list(vista).to_parquet(str(bench / "mathvista.parquet"))
    overrides = f"chartqa={bench / 'chartqa.parquet'},mathvista={bench / 'mathvista.parquet'}"
    out = run_script(["eval.py", "--model", str(toy_dir / "model"), "--benchmarks", "chartqa,mathvista",
                      "--bench-data", overrides, "--engine", "hf", "--max-new-tokens", "4",
                      "--min-pixels", "3136", "--max-pixels", "50176", "--output-dir", str(tmp_path / "eval")])  # fmt: skip
    assert "mathvista: no usable rows (1 skipped); not scored" in out.stdout
    (results,) = json.loads((tmp_path / "eval" / "results.json").read_text())["results"].values()
    assert results["mathvista"] == {"accuracy": None, "n": 0, "breakdown": {}, "note": "no usable rows", "skipped": 1}
    assert results["chartqa"]["n"] == 1 and results["chartqa"]["skipped"] == 0  # the image was found
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| no usable rows | - |" in table  # and no average over a benchmark that was not scored


# ---------------------------------------------------------------------------------------------
# 6. SFT rows that --max-length would spoil
# ---------------------------------------------------------------------------------------------


def sft_rows(image_path: str) -> list[dict]:
    """A row that fits, one whose assistant turn starts after token 64, one cut inside its image tokens."""
    answer = {"role": "assistant", "content": "<think>two</think><answer>\\boxed{2}</answer>"}
    return [
        {"id": "fits", "messages": [{"role": "user", "content": "<image>How many?"}, answer], "images": [image_path]},
        {"id": "late", "messages": [{"role": "user", "content": "<image>" + "red blue " * 40}, answer],
         "images": [image_path]},
        {"id": "image", "messages": [{"role": "user", "content": "red blue " * 16 + "<image>How many?"}, answer],
         "images": [image_path]},
    ]  # fmt: skip


def test_sft_rows_spoiled_by_max_length_are_named_or_skipped(toy_dir, tmp_path):
    """The door (prepare.py) applies the --max-length cut rule to every row before step 1: a row the
    cut would spoil is an error naming it, or with --skip-bad-rows removed; the rest train."""
    from data import toy
    from mmr1 import batches, dist, prepare

    image = tmp_path / "img.png"
    toy.draw_grid(["red", "blue", "green", "yellow"]).save(image)
    processor = modeling.load_processor(str(toy_dir / "model"), 3136, 50176)
    rows = sft_rows(str(image))
    uncut = [batches.sft_batch(processor, [r], 3136, 50176, 0) for r in rows]
    problems = [sft_cut_problem(u, 64, processor.image_token_id) for u in uncut]
    assert problems[0] is None
    assert problems[1].startswith("--max-length 64 cuts away its whole assistant turn (it starts at token ")
    assert problems[2].startswith("--max-length 64 cuts inside its image tokens (last at position ")
    door, one = prepare.Door("sft", 3136, 50176, 64), dist.Dist(0, 1, 0, torch.device("cpu"))
    with pytest.raises(config.BadRowError, match=r"^data.jsonl row 1 \(id=late\): --max-length 64 cuts away"):
        prepare.prepare_rows(rows, door, processor, one, skip_bad_rows=False, spec="data.jsonl")
    kept = prepare.prepare_rows(rows, door, processor, one, skip_bad_rows=True, spec="data.jsonl")
    assert [r["id"] for r in kept] == ["fits"]
    (micro,) = batches.sft_micro_batches(processor, kept, 3136, 50176, 64, 0, 3)
    assert int((micro["labels"] != batches.IGNORE_INDEX).sum()) == int(
        (uncut[0]["labels"] != batches.IGNORE_INDEX).sum()
    )
    model = modeling.load_model(str(toy_dir / "model"), torch.device("cpu"))
    from mmr1 import logprobs

    logp, _ = logprobs.batch_logprobs(model, micro, torch.device("cpu"), 1024)  # the processor accepts the batch
    assert torch.isfinite(logp).all()


def test_sft_max_length_cutting_every_assistant_turn_is_one_line(toy_dir, tmp_path):
    from data import toy

    toy.draw_grid(["red", "blue", "green", "yellow"]).save(tmp_path / "img.png")
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sft_rows("img.png")[1:2] * 4))
    args = ["sft.py", "--model", str(toy_dir / "model"), "--data", str(path), "--val-data", "", "--acc-limit", "-1",
            "--output-dir", str(tmp_path / "run"), "--max-length", "64", "--batch-size", "2", "--max-steps", "1",
            "--micro-batch-size", "2"]  # fmt: skip
    line = last_line(run_failing(args))
    assert line.startswith(f"error: {path} line 1 (id=late): --max-length 64 cuts away its whole assistant")
    line = last_line(run_failing(args + ["--skip-bad-rows", "--output-dir", str(tmp_path / "skip")]))
    assert line.startswith(f"error: {path}: no usable rows (4 left out; first: {path} line 1 (id=late)")


def test_sft_validation_rows_spoiled_by_max_length_are_named_or_left_out(toy_dir, tmp_path):
    """The validation loss follows the training rule: a val row --max-length would spoil is an error
    naming it, or with --skip-bad-rows it is left out of the mean (the loss is that of the rows that fit)."""
    from data import toy

    toy.draw_grid(["red", "blue", "green", "yellow"]).save(tmp_path / "img.png")
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in sft_rows("img.png")[:1] * 2))
    val.write_text("".join(json.dumps(r) + "\n" for r in sft_rows("img.png")[:2]))  # fits, late
    args = ["sft.py", "--model", str(toy_dir / "model"), "--data", str(train), "--val-data", str(val),
            "--acc-limit", "-1", "--output-dir", str(tmp_path / "run"), "--max-length", "64", "--batch-size", "2",
            "--max-steps", "1", "--micro-batch-size", "2"]  # fmt: skip
    line = last_line(run_failing(args))
    assert line == f"error: {val} line 2 (id=late): " + line.split("(id=late): ", 1)[1]
    assert "--max-length 64 cuts away its whole assistant turn" in line
    run_script(args + ["--skip-bad-rows", "--output-dir", str(tmp_path / "skip")])
    (step,) = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(step["val/loss"]) and step["val/loss"] > 0


# ---------------------------------------------------------------------------------------------
# 7. --max-prompt-length on every engine
# ---------------------------------------------------------------------------------------------


def test_prompt_lengths_match_the_processor(toy_dir, tmp_path):
    from PIL import Image

    from mmr1 import batches

    processor = modeling.load_processor(str(toy_dir / "model"), 3136, 50176)
    Image.new("RGB", (300, 90), "red").save(tmp_path / "wide.png")
    rows = [
        {"problem": "<image>How many?", "answer": "1", "images": [str(tmp_path / "wide.png")]},
        {"problem": "Compare <image> and <image>.", "answer": "1",
         "images": [str(tmp_path / "wide.png"), Image.new("RGB", (40, 700), "blue")]},
        {"problem": "No image " * 30, "answer": "1", "images": []},
    ]  # fmt: skip
    fmt = batches.PromptFormat()
    expected = [len(p.ids) for p in batches.build_prompts(processor, rows, fmt, 3136, 50176)]  # decoded
    assert [len(p.ids) for p in batches.build_prompts(processor, rows, fmt, 3136, 50176, decode=False)] == expected
    assert expected[1] > expected[0] > 16


def test_grpo_prompt_above_max_prompt_length_is_a_bad_row(toy_dir, tmp_path):
    """--max-prompt-length is checked once at the door, for the training rows (which --vas scores
    before step 1) and the validation rows alike: a prompt above it is an error naming its row, or with
    --skip-bad-rows the row is removed there (never scored, trained or validated on)."""
    import numpy as np

    from data import toy

    toy.draw_grid(["red", "blue", "green", "yellow"]).save(tmp_path / "img.png")
    short = {"id": "short", "problem": "<image>How many red squares?", "answer": "1", "images": ["img.png"]}
    long = {"id": "long", "problem": "<image>" + "How many red squares? " * 40, "answer": "1", "images": ["img.png"]}
    train, val, clean = tmp_path / "rl.jsonl", tmp_path / "val.jsonl", tmp_path / "clean.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in [short, long]))
    val.write_text("".join(json.dumps(r) + "\n" for r in [short, long]))
    clean.write_text("".join(json.dumps(r) + "\n" for r in [short, short]))
    args = ["grpo.py", "--model", str(toy_dir / "model"), "--max-prompt-length", "96", "--vas", "--vas-rollouts",
            "2", "--rollout-batch-size", "2", "--group-size", "2", "--max-steps", "1", "--val-every", "1",
            "--reward-workers", "0", "--max-response-length", "4", "--updates-per-batch", "1"]  # fmt: skip
    line = last_line(
        run_failing(args + ["--data", str(train), "--val-data", str(clean), "--output-dir", str(tmp_path / "a")])
    )
    assert line.startswith(f"error: {train} line 2 (id=long): the prompt is ")
    assert line.endswith("tokens, above --max-prompt-length 96")
    line = last_line(
        run_failing(args + ["--data", str(clean), "--val-data", str(val), "--output-dir", str(tmp_path / "b")])
    )
    assert line.startswith(f"error: {val} line 2 (id=long): the prompt is ")

    skip = tmp_path / "skip"
    proc = run_script(
        args + ["--data", str(train), "--val-data", str(val), "--skip-bad-rows", "--output-dir", str(skip)]
    )
    assert f"[data] {train}: 2 rows, 1 left out (1 prompt too long); first: {train} line 2 (id=long)" in proc.stdout
    assert f"[data] {val}: 2 rows, 1 left out (1 prompt too long)" in proc.stdout
    refresh = np.load(skip / "vas" / "refresh-0.npz")
    assert len(refresh["tokens"]) == 1 and (refresh["tokens"] > 0).all()  # the kept prompt, scored
    steps = [json.loads(x) for x in (skip / "metrics.jsonl").read_text().splitlines()]
    # VAS scores the kept prompt (x 2), then it fills the step's batch of 2 prompts (x 2 responses)
    assert [r["rollout/generated_responses"] for r in steps if "train/loss" in r] == [1 * 2 + 2 * 2]
    assert [r["val/accuracy"] in (0.0, 1.0) for r in steps if "val/accuracy" in r] == [True, True]  # one val row
