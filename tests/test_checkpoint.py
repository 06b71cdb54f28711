"""mmr1.checkpoint: bf16 HF weights + the sharded fp32 trainer state, damage detection, pruning,
and preemption (SIGTERM / SIGUSR1 -> save step-N, exit 0, then --resume = the uninterrupted run)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import grpo
from conftest import ROOT, TORCHRUN_VARIABLES, launch, metric_records, run_script
from mmr1 import checkpoint, checkpoint_checks, config, dist, modeling

ONE = dist.Dist(0, 1, 0, torch.device("cpu"))


def trained_toy(toy_dir):
    """The toy model (fp32) after one AdamW step on a text-only input: the vision tower has no
    gradient, so it has no optimizer state (as after text-only batches)."""
    model = modeling.load_model(str(toy_dir / "model"), ONE.device, trainable=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.arange(1, 9)[None]).logits.float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, modeling.load_processor(str(toy_dir / "model")), optimizer


def test_atomic_checkpoint_round_trip(tmp_path, toy_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = modeling.load_model(str(toy_dir / "model"), ONE.device)
    processor = modeling.load_processor(str(toy_dir / "model"))
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    out = tmp_path / "ckpt"
    checkpoint.save_checkpoint(model, processor, out, ONE, {"step": 7})
    checkpoint.save_checkpoint(model, processor, out, ONE, {"step": 8})  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert torch.load(out / "trainer_state.pt")["step"] == 8
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_training_checkpoint_restores_fp32_weights_and_optimizer_exactly(tmp_path, toy_dir):
    """The HF folder is bf16; load_training_checkpoint puts back the fp32 parameters and the AdamW
    state bit for bit, and no state for the parameters that had none (the vision tower here)."""
    model, processor, optimizer = trained_toy(toy_dir)
    folder = tmp_path / "step-1"
    checkpoint.save_training_checkpoint(model, processor, optimizer, folder, ONE, 1, grpo.GRPOConfig(), rows=16)
    assert sorted(p.name for p in (folder / "trainer").iterdir()) == [".metadata", "__0_0.distcp"]
    state = torch.load(folder / "trainer_state.pt", weights_only=True)
    assert set(state) == {"step", "rng", "config", "rows", "world_size"} and state["step"] == 1  # no optimizer in it
    hf = load_file(str(folder / "model.safetensors"))
    assert {v.dtype for v in hf.values()} == {torch.bfloat16}
    master = checkpoint.master_weights(folder)
    assert master.keys() == model.state_dict().keys()
    assert all(torch.equal(master[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())

    resumed = modeling.load_model(str(folder), ONE.device, trainable=True)  # from the bf16 weights: not exact
    assert not torch.equal(resumed.lm_head.weight, model.lm_head.weight)
    fresh = torch.optim.AdamW(resumed.parameters(), lr=1e-3)
    assert checkpoint.load_training_checkpoint(folder, resumed, fresh, ONE)["rows"] == 16
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
        assert (p in optimizer.state) == (q in fresh.state), name
        for key, value in optimizer.state.get(p, {}).items():
            assert torch.equal(value, fresh.state[q][key]), (name, key)
    with_state = sum(p in optimizer.state for p in model.parameters())
    assert 0 < with_state < len(list(model.parameters()))  # the vision tower had no gradient
    assert fresh.param_groups[0]["lr"] == 1e-3


def test_save_total_limit_keeps_the_newest_steps_and_final(tmp_path, toy_dir):
    model, processor, optimizer = trained_toy(toy_dir)
    cfg = grpo.GRPOConfig(save_total_limit=2)
    out = tmp_path / "out"
    for name in ("step-1", "step-2", "final", "step-10", "step-3"):
        checkpoint.save_training_checkpoint(model, processor, optimizer, out / name, ONE, 1, cfg)
    assert sorted(p.name for p in out.iterdir()) == ["final", "step-10", "step-3"]
    (out / "step-7.tmp").mkdir()  # a save killed half-way is no step folder
    assert checkpoint.prune_checkpoints(out, 1) == [out / "step-3"]
    assert sorted(p.name for p in out.iterdir()) == ["final", "step-10", "step-7.tmp"]
    unlimited = grpo.GRPOConfig(save_total_limit=0)
    for name in ("step-11", "step-12"):
        checkpoint.save_training_checkpoint(model, processor, optimizer, out / name, ONE, 1, unlimited)
    assert sorted(p.name for p in out.iterdir()) == ["final", "step-10", "step-11", "step-12", "step-7.tmp"]


def test_damaged_sharded_state_is_passed_over(tmp_path, toy_dir, capsys):
    model, processor, optimizer = trained_toy(toy_dir)
    out = tmp_path / "out"
    for step in (2, 4, 6):
        checkpoint.save_training_checkpoint(
            model, processor, optimizer, out / f"step-{step}", ONE, step, grpo.GRPOConfig()
        )
    assert checkpoint.latest_checkpoint(out) == out / "step-6"
    shard = out / "step-6" / "trainer" / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    assert checkpoint_checks.checkpoint_problem(out / "step-6") == f"{shard} is truncated ({size // 2} of {size} bytes)"
    (out / "step-4" / "trainer" / ".metadata").write_bytes(b"\x80")
    assert checkpoint_checks.checkpoint_problem(out / "step-4").startswith(
        f"{out / 'step-4' / 'trainer' / '.metadata'} is unreadable ("
    )
    assert checkpoint.latest_checkpoint(out) == out / "step-2"
    assert "passing over damaged checkpoint(s)" in capsys.readouterr().out
    (out / "step-2" / "trainer" / ".metadata").unlink()
    with pytest.raises(config.CheckpointError, match=r"step-2/trainer/\.metadata is missing"):
        checkpoint.latest_checkpoint(out)


def test_preemption_records_the_signal_and_one_process_agrees():
    previous = {sig: signal.getsignal(sig) for sig in checkpoint.Preemption.SIGNALS}
    try:
        preemption = checkpoint.Preemption()
        assert preemption.received is None and not preemption.agreed(ONE)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.received == "SIGUSR1" and preemption.agreed(ONE)  # the first signal is named
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# The stage scripts: preempted by a signal, resumed; two ranks' sharded checkpoint
# ---------------------------------------------------------------------------------------------


def run_until_signalled(args: list[str], out, sig: int, timeout: int = 300) -> tuple[int, str]:
    """Starts a stage script, sends it `sig` once a training step is in metrics.jsonl, waits for it;
    returns (exit status, its output)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env |= {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log = out.parent / f"{out.name}.log"
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        metrics, deadline = out / "metrics.jsonl", time.time() + timeout
        while not (metrics.exists() and "train/loss" in metrics.read_text()):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout)
    return proc.returncode, log.read_text()


def step_metrics(out, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


def sft_args(toy_dir, out, steps, *extra):
    data_dir = toy_dir / "data"
    return ["sft.py", "--model", str(toy_dir / "model"), "--data", f"{data_dir / 'sft'}@train", "--val-data", "",
            "--acc-limit", "-1", "--output-dir", str(out), "--max-steps", str(steps), "--batch-size", "4",
            "--micro-batch-size", "4", "--save-every", "100", *extra]  # fmt: skip


def assert_same_final(a, b):
    """Bit-equal fp32 master weights and bf16 HF weights of two runs' final/."""
    master_a, master_b = checkpoint.master_weights(a / "final"), checkpoint.master_weights(b / "final")
    assert master_a.keys() == master_b.keys()
    for name in master_a:
        assert torch.equal(master_a[name], master_b[name]), name
    hf_a, hf_b = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert all(torch.equal(hf_a[k], hf_b[k]) for k in hf_a)


def test_sft_stopped_or_signalled_then_resumed_equals_uninterrupted(toy_dir, tmp_path):
    """Two ways a run ends early, each resumed to the end of one uninterrupted 6-step run, which it
    then equals bit for bit (weights and every logged number): killed after step 3, one step past its
    last checkpoint (step 2; step 3 is dropped, then redone once), and SIGTERM (a checkpoint at the
    signal, the only one with --save-every 100). With validation every 2 steps and two micro-batches a
    step, so the validation records and the accumulation carry over too."""
    steps = 6
    val = ["--val-data", f"{toy_dir / 'data' / 'sft'}@val", "--val-limit", "8", "--eval-every", "2",
           "--micro-batch-size", "2"]  # fmt: skip
    run_script(sft_args(toy_dir, tmp_path / "full", steps, *val))
    stopped = sft_args(toy_dir, tmp_path / "killed", steps, *val, "--save-every", "2", "--stop-after", "3")
    run_script(stopped)
    assert (tmp_path / "killed" / "step-2" / "trainer_state.pt").exists() and not (
        tmp_path / "killed" / "final"
    ).exists()
    out = run_script(stopped[:-2] + ["--resume"])
    assert f"resumed from {tmp_path / 'killed' / 'step-2'} at step 2" in out.stdout

    code, output = run_until_signalled(
        sft_args(toy_dir, tmp_path / "cut", steps, *val), tmp_path / "cut", signal.SIGTERM
    )
    assert code == 0, output[-4000:]
    (saved,) = checkpoint.step_folders(tmp_path / "cut")  # --save-every 100: only the preemption's
    assert not (tmp_path / "cut" / "final").exists()
    at = checkpoint.step_number(saved)
    assert 1 <= at < steps and f"[sft] SIGTERM: saved {saved}, exiting" in output
    assert checkpoint_checks.checkpoint_problem(saved) is None
    assert [s for s, _ in step_metrics(tmp_path / "cut", "train/loss")] == list(range(1, at + 1))
    out = run_script(sft_args(toy_dir, tmp_path / "cut", steps, *val, "--resume"))
    assert f"resumed from {saved} at step {at}" in out.stdout

    for run in ("killed", "cut"):
        assert_same_final(tmp_path / "full", tmp_path / run)
        assert metric_records(tmp_path / run) == metric_records(tmp_path / "full"), run
    assert [r["step"] for r in metric_records(tmp_path / "full") if "train/loss" in r] == list(range(1, steps + 1))
    assert [r["step"] for r in metric_records(tmp_path / "full") if "val/loss" in r] == [2, 4, 6]


def grpo_args(toy_sft, toy_dir, out, *extra):
    """4 steps from the toy SFT model (groups with signal) with VAS (re-scored after step 2) and
    dynamic sampling (up to 3 rounds), validation every 2 steps, a reward worker, a checkpoint every 2 steps."""
    data = toy_dir / "data" / "rl"
    return ["grpo.py", "--model", str(toy_sft), "--data", f"{data}@train", "--val-data", f"{data}@val",
            "--output-dir", str(out), "--max-steps", "4", "--train-limit", "16", "--rollout-batch-size", "4",
            "--group-size", "4", "--max-response-length", "48", "--val-limit", "4", "--val-every", "2",
            "--reward-workers", "1", "--engine", "hf", "--lr", "1e-3", "--vas", "--vas-rollouts", "2",
            "--vas-update-every", "2", "--dynamic-sampling", "--max-sampling-rounds", "3", "--save-every", "2",
            *extra]  # fmt: skip


def test_grpo_stopped_or_signalled_then_resumed_equals_uninterrupted(toy_dir, toy_sft, tmp_path):
    """The same two early ends for GRPO with VAS and dynamic sampling on, resumed to the end of one
    uninterrupted run and then equal to it bit for bit: weights, every logged number (rewards, the
    refill rounds, VAS's scores, the generation counters) and the sampler's state. A resume that
    would not continue the run (another --train-limit) is refused in one line before any model loads."""
    run_script(grpo_args(toy_sft, toy_dir, tmp_path / "full"))
    run_script(grpo_args(toy_sft, toy_dir, tmp_path / "killed", "--stop-after", "3"))
    assert (tmp_path / "killed" / "step-2").is_dir() and not (tmp_path / "killed" / "final").exists()
    refused = launch(grpo_args(toy_sft, toy_dir, tmp_path / "killed", "--resume", "--train-limit", "12"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--train-limit 16 -> 12" in refused.stderr.strip().splitlines()[-1]
    run_script(grpo_args(toy_sft, toy_dir, tmp_path / "killed", "--resume"))

    cut = grpo_args(toy_sft, toy_dir, tmp_path / "cut", "--save-every", "100", "--save-total-limit", "1")
    code, output = run_until_signalled(cut, tmp_path / "cut", signal.SIGUSR1)
    assert code == 0, output[-4000:]
    (saved,) = checkpoint.step_folders(tmp_path / "cut")
    assert 1 <= checkpoint.step_number(saved) < 4 and f"[grpo] SIGUSR1: saved {saved}, exiting" in output
    run_script([*cut, "--resume"])

    full = torch.load(tmp_path / "full" / "final" / "trainer_state.pt", weights_only=True)
    for run in ("killed", "cut"):
        assert_same_final(tmp_path / "full", tmp_path / run)
        assert metric_records(tmp_path / run) == metric_records(tmp_path / "full"), run
        state = torch.load(tmp_path / run / "final" / "trainer_state.pt", weights_only=True)
        assert state["sampler"] == full["sampler"] and state["vps"] == full["vps"], run
    lines = [r for r in metric_records(tmp_path / "full") if "train/loss" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and max(r["rollout/sampling_rounds"] for r in lines) > 1
    assert [r["step"] for r in metric_records(tmp_path / "full") if "val/accuracy" in r] == [0, 2, 4]


def test_torchrun_two_ranks_resume_from_sharded_checkpoint(toy_dir, tmp_path):
    """Two ranks (gloo, FSDP2): each writes its own shard of trainer/ (one file per rank); a run
    resumed from step-2 of another ends with the weights of the uninterrupted one, bit for bit."""
    run_script(sft_args(toy_dir, tmp_path / "full", 3, "--save-every", "2"), torchrun=2)
    shards = sorted(p.name for p in (tmp_path / "full" / "step-2" / "trainer").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    (tmp_path / "cut").mkdir()
    shutil.copytree(tmp_path / "full" / "step-2", tmp_path / "cut" / "step-2")
    out = run_script(sft_args(toy_dir, tmp_path / "cut", 3, "--save-every", "2", "--resume"), torchrun=2)
    assert "resumed from" in out.stdout and "at step 2" in out.stdout
    assert_same_final(tmp_path / "full", tmp_path / "cut")
    (full_loss,), (cut_loss,) = (
        [v for s, v in step_metrics(tmp_path / run, "train/loss") if s == 3] for run in ("full", "cut")
    )
    assert full_loss == cut_loss


# ---------------------------------------------------------------------------------------------
# Metadata never unpickled freely, pruning and resume keep the newest complete checkpoint,
# every write error in one line with the temp folder removed, fsync before the rename
# ---------------------------------------------------------------------------------------------


class Payload:
    """A pickle that, if unpickled freely, creates the file `marker` (as os.system would run a command)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_trainer_metadata_runs_nothing_and_is_damage(tmp_path, toy_dir, capsys):
    model, processor, optimizer = trained_toy(toy_dir)
    out, marker = tmp_path / "out", tmp_path / "ran"
    for step in (2, 4):
        checkpoint.save_training_checkpoint(
            model, processor, optimizer, out / f"step-{step}", ONE, step, grpo.GRPOConfig()
        )
    import pickle

    (out / "step-4" / "trainer" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    problem = checkpoint_checks.checkpoint_problem(out / "step-4")
    assert problem.startswith(f"{out / 'step-4' / 'trainer' / '.metadata'} is unreadable (") and "refused" in problem
    assert checkpoint.latest_checkpoint(out) == out / "step-2"  # the scan passes over it
    assert "passing over damaged" in capsys.readouterr().out
    with pytest.raises(config.CheckpointError, match=r"\.metadata is unreadable"):
        checkpoint.load_training_checkpoint(out / "step-4", model, optimizer, ONE)
    with pytest.raises(Exception, match="refused"):
        checkpoint.master_weights(out / "step-4")
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(Payload(marker))) == 0 and marker.exists()  # the payload does run when unpickled
    marker.unlink()
    # a real .metadata holds only the allowed types
    assert checkpoint_checks.read_metadata(out / "step-2" / "trainer").state_dict_metadata


@pytest.mark.parametrize("where", ["parent", "absolute", "link"])
def test_metadata_naming_shards_outside_the_checkpoint_is_damage(tmp_path, toy_dir, capsys, where):
    """A .metadata of allowed types only, whose shard paths lead out of trainer/ (`../../../elsewhere/...`,
    an absolute path, a shard that is a link to another run's file) to a real shard of the right size:
    the scan names it as damage, --resume passes over it, and no reader opens the file outside."""
    import dataclasses
    import pickle

    model, processor, optimizer = trained_toy(toy_dir)
    out = tmp_path / "out"
    for step in (2, 4):
        checkpoint.save_training_checkpoint(
            model, processor, optimizer, out / f"step-{step}", ONE, step, grpo.GRPOConfig()
        )
    trainer = out / "step-4" / "trainer"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(trainer / "__0_0.distcp", elsewhere / "__0_0.distcp")  # the right bytes: only the path is wrong
    metadata = checkpoint_checks.read_metadata(trainer)
    name = {"parent": "../../../elsewhere/__0_0.distcp", "absolute": str(elsewhere / "__0_0.distcp")}.get(where)
    if name is None:  # a link inside the folder that resolves outside it
        (trainer / "__0_0.distcp").unlink()
        (trainer / "__0_0.distcp").symlink_to(elsewhere / "__0_0.distcp")
        name = "__0_0.distcp"
    else:
        (trainer / "__0_0.distcp").unlink()
        metadata.storage_data = {
            k: dataclasses.replace(v, relative_path=name) for k, v in metadata.storage_data.items()
        }
        (trainer / ".metadata").write_bytes(pickle.dumps(metadata))
    how = "links out of" if where == "link" else "leaves"
    problem = checkpoint_checks.checkpoint_problem(out / "step-4")
    assert problem == f"{trainer / '.metadata'} is unreadable (ValueError: a shard path {name!r} that {how} {trainer})"
    assert checkpoint.latest_checkpoint(out) == out / "step-2"
    assert "passing over damaged" in capsys.readouterr().out
    with pytest.raises(config.CheckpointError, match=r"\.metadata is unreadable .*a shard path"):
        checkpoint.load_training_checkpoint(out / "step-4", model, optimizer, ONE)
    with pytest.raises(ValueError, match="a shard path"):
        checkpoint.master_weights(out / "step-4")
    assert checkpoint_checks.checkpoint_problem(out / "step-2") is None  # a real checkpoint stays complete


def test_non_tensor_entries_of_the_shards_load_weights_only(tmp_path):
    """The shard files' non-tensor entries (param_groups) go through torch.load: with weights_only=True
    a pickled payload is refused instead of run (torch's DefaultLoadPlanner loads them freely)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    marker, path = tmp_path / "ran", tmp_path / "trainer"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"a": torch.arange(3.0), "b": Payload(marker)}, checkpoint_id=path, no_dist=True)
        target = {"a": torch.zeros(3), "b": None}
        with pytest.raises(CheckpointException) as refused:
            dcp.load(
                target,
                storage_reader=checkpoint_checks.safe_reader(path),
                planner=checkpoint_checks.safe_planner(),
                no_dist=True,
            )
        assert "posix.system" in str(next(iter(refused.value.failures.values()))[0])
        assert not marker.exists()
        ok, path = {"a": torch.zeros(3), "b": {"lr": None, "betas": None}}, tmp_path / "plain"
        dcp.save({"a": torch.arange(3.0), "b": {"lr": 1e-3, "betas": (0.9, 0.99)}}, checkpoint_id=path, no_dist=True)
        dcp.load(
            ok,
            storage_reader=checkpoint_checks.safe_reader(path),
            planner=checkpoint_checks.safe_planner(),
            no_dist=True,
        )
    assert torch.equal(ok["a"], torch.arange(3.0)) and ok["b"] == {"lr": 1e-3, "betas": (0.9, 0.99)}


def damage(folder):
    """Truncates the first shard of folder/trainer to half its size."""
    shard = folder / "trainer" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def test_pruning_never_keeps_a_damaged_checkpoint_over_a_complete_one(tmp_path, toy_dir):
    model, processor, optimizer = trained_toy(toy_dir)
    out = tmp_path / "out"
    for step in (2, 3, 4):
        checkpoint.save_training_checkpoint(
            model, processor, optimizer, out / f"step-{step}", ONE, step, grpo.GRPOConfig()
        )
    shutil.copytree(out / "step-4", out / "step-6")  # a newer step-6 damaged (a save cut by a full disk)
    damage(out / "step-6")
    damage(out / "step-3")  # and an older damaged one
    (out / "step-7.tmp").mkdir()
    cfg = grpo.GRPOConfig(save_total_limit=1)
    checkpoint.save_training_checkpoint(model, processor, optimizer, out / "step-5", ONE, 5, cfg)
    # step-5 (just written, complete) survives; step-6 (damaged, newer) is left for the save at step 6 to replace;
    # the older complete and damaged ones go; the temp folder is untouched
    assert sorted(p.name for p in out.iterdir()) == ["step-5", "step-6", "step-7.tmp"]
    assert checkpoint.latest_checkpoint(out) == out / "step-5"
    assert checkpoint.prune_checkpoints(out, 1) == []  # nothing more to delete
    damage(out / "step-5")
    assert checkpoint.prune_checkpoints(out, 1) == []  # no complete checkpoint: nothing is deleted


def test_resume_picks_the_newest_complete_checkpoint_by_step_final_included(tmp_path, toy_dir):
    """A finished run (final/ at step 2) extended with --max-steps 4 and interrupted after step 3."""
    model, processor, optimizer = trained_toy(toy_dir)
    out, cfg = tmp_path / "out", grpo.GRPOConfig()
    checkpoint.save_training_checkpoint(model, processor, optimizer, out / "step-1", ONE, 1, cfg)
    checkpoint.save_training_checkpoint(model, processor, optimizer, out / "final", ONE, 2, cfg)
    assert checkpoint.latest_checkpoint(out) == out / "final"
    checkpoint.save_training_checkpoint(model, processor, optimizer, out / "step-3", ONE, 3, cfg)
    assert checkpoint.latest_checkpoint(out) == out / "step-3"
    checkpoint.save_training_checkpoint(model, processor, optimizer, out / "final", ONE, 3, cfg)
    assert checkpoint.latest_checkpoint(out) == out / "final"  # a tie: final/
    damage(out / "final")
    assert checkpoint.latest_checkpoint(out) == out / "step-3"


@pytest.mark.parametrize("where", ["weights", "trainer_state", "config"])
def test_a_failing_writer_is_one_error_and_the_temp_folder_goes(tmp_path, toy_dir, monkeypatch, where):
    from safetensors import SafetensorError

    model, processor, optimizer = trained_toy(toy_dir)
    full = "No space left on device (os error 28)"

    def fail(*args, **kwargs):
        if where == "weights":
            raise SafetensorError(f"Error while serializing: I/O error: {full}")
        if where == "trainer_state":
            raise RuntimeError(
                f"[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file: {full}"
            )
        raise OSError(28, "No space left on device")

    import transformers.modeling_utils

    target = {"weights": (transformers.modeling_utils, "safe_save_file"), "trainer_state": (torch, "save")}
    monkeypatch.setattr(*target.get(where, (json, "dumps")), fail)
    folder = tmp_path / "out" / "step-1"
    with pytest.raises(config.CheckpointError) as raised:
        checkpoint.save_training_checkpoint(model, processor, optimizer, folder, ONE, 1, grpo.GRPOConfig())
    message = str(raised.value)
    assert message.startswith(f"could not write checkpoint {folder} (") and "\n" not in message
    assert "No space left on device" in message and f"{folder}.tmp was removed" in message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_a_full_tmpfs_is_one_error_and_the_temp_folder_goes(tmp_path, toy_dir):
    """A 1 MiB tmpfs (the toy's bf16 weights are ~2 MB): the real ENOSPC of the safetensors writer."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    try:
        model = modeling.load_model(str(toy_dir / "model"), ONE.device)
        processor = modeling.load_processor(str(toy_dir / "model"))
        with pytest.raises(config.CheckpointError, match=r"could not write checkpoint .*was removed"):
            checkpoint.save_checkpoint(model, processor, mount / "ckpt", ONE, {"step": 1})
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_save_fsyncs_every_file_and_folder_before_the_rename(tmp_path, toy_dir, monkeypatch):
    model = modeling.load_model(str(toy_dir / "model"), ONE.device)
    processor = modeling.load_processor(str(toy_dir / "model"))
    opened, synced = {}, []
    real_open, real_fsync = os.open, os.fsync

    def recording_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        opened[fd] = os.fspath(path)
        return fd

    def recording_fsync(fd):
        synced.append(opened.get(fd))
        return real_fsync(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "ckpt"
    checkpoint.save_checkpoint(model, processor, out, ONE, {"step": 1})
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    tmp = f"{out}.tmp"
    assert files <= {os.path.relpath(p, tmp) for p in synced if p and p.startswith(tmp + os.sep)}
    assert tmp in synced and synced[-1] == str(tmp_path)  # the folder before the rename, its parent after
