"""Checkpoints: atomic folders of bf16 HF weights with the sharded fp32 trainer state beside them, pruning,
preemption, the checkpoint to resume from and the refusal of an inexact resume (docs/checkpoints.md).
Reading a checkpoint's files safely and the damage scan live in checkpoint_checks."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint_checks import (
    TRAINER_DIR,
    checkpoint_problem,
    load_trainer_state,
    read_metadata,
    safe_planner,
    safe_reader,
)
from .config import CheckpointError, field_default, first_line
from .dist import Dist, all_gather_list, all_reduce_max, cleanup_distributed
from .modeling import full_state_dict

HF_DTYPE = torch.bfloat16  # dtype of the weights users load (the fp32 master weights are in TRAINER_DIR)


def save_checkpoint(
    model, processor, out_dir: str | Path, d: Dist, trainer_state: dict | None = None, sharded: dict | None = None
) -> None:
    """Writes out_dir atomically: an HF model folder of bf16 weights (+ processor), trainer_state.pt and,
    with `sharded`, the sharded trainer state in out_dir/trainer/. Every rank calls it (a collective) and
    writes its shard; all goes into out_dir.tmp, renamed over out_dir once complete (docs/checkpoints.md)."""
    full = full_state_dict(model, d)  # rank 0: every tensor, fp32, on the CPU (33 GB at 7B); other ranks: {}
    weights = {}  # the bf16 copies; each fp32 tensor is dropped once cast, so rank 0 never holds both in full
    for name in list(full):
        tensor = full.pop(name)
        weights[name] = tensor.to(HF_DTYPE) if tensor.is_floating_point() else tensor
    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
    if d.master:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed half-way
    if d.enabled:
        dist.barrier()  # under the long save timeout of dist.TIMEOUT
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException

    failed: BaseException | None = None
    try:
        if sharded is not None:
            import torch.distributed.checkpoint as dcp

            with warnings.catch_warnings():  # one process: "assuming the intent is to save in a single process"
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(sharded, checkpoint_id=tmp / TRAINER_DIR)  # each rank its shard; rank 0 the metadata
        if d.master:
            getattr(model, "module", model).save_pretrained(tmp, state_dict=weights)
            config_json = json.loads((tmp / "config.json").read_text())
            config_json["dtype"] = str(HF_DTYPE).removeprefix("torch.")  # the model's is the fp32 of its master weights
            (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
            processor.save_pretrained(tmp)
            if trainer_state is not None:
                torch.save(trainer_state, tmp / "trainer_state.pt")
            fsync_tree(tmp)  # on disk before the rename: a power loss cannot leave a renamed, empty folder
    except CheckpointException as e:  # torch.distributed.checkpoint wraps each rank's error: name the first
        failed = next(iter(e.failures.values()))[0] if e.failures else e
    except (OSError, SafetensorError, RuntimeError, ValueError, pickle.PicklingError) as e:
        failed = e  # a full disk, a quota: SafetensorError (weights), RuntimeError (torch.save), OSError (the rest)
    if all_reduce_max(int(failed is not None), d.device):  # every rank learns of a failed write
        if d.master:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = first_line(failed) if failed is not None else "another rank could not write its shard"
        raise CheckpointError(
            f"could not write checkpoint {out_dir} ({reason}); its temp folder {tmp} was removed "
            "and the previous checkpoints are intact"
        ) from failed
    if d.master:
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        fsync(out_dir.parent)  # the rename itself
        shutil.rmtree(old, ignore_errors=True)
    if d.enabled:
        dist.barrier()


def fsync_tree(folder: Path) -> None:
    """fsync of every file under `folder`, then of every folder in it (their entries), deepest first.
    Other ranks' shard files are fsynced by their writers too (torch.distributed.checkpoint's sync_files)."""
    paths = [folder, *sorted(folder.rglob("*"))]
    for path in [p for p in paths if p.is_file()] + [p for p in reversed(paths) if p.is_dir()]:
        fsync(path)


def fsync(path: Path) -> None:
    """fsync of a file, or of a folder's entries (a file created or renamed in it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_training_checkpoint(
    model, processor, optimizer, folder: str | Path, d: Dist, step: int, config: Any, **extra: Any
) -> None:
    """save_checkpoint of a training run, then (rank 0) pruning to config.save_total_limit step-* folders.
    trainer_state.pt holds the step, every rank's RNG states, the config and the script's `extra`
    (scheduler, sampler, VPS); trainer/ the fp32 parameters and AdamW state, each rank its FSDP2 shard."""
    state = {
        "step": step,
        "rng": all_gather_list([rng_state()], d),
        "config": dataclasses.asdict(config),
        "world_size": d.world_size,  # a resume must use the same (check_resume)
        **extra,
    }
    save_checkpoint(model, processor, folder, d, state, sharded_state(model, optimizer, d))
    if d.master and getattr(config, "save_total_limit", 0) > 0:
        prune_checkpoints(Path(folder).parent, config.save_total_limit)


def prune_checkpoints(out_dir: str | Path, keep: int) -> list[Path]:
    """Deletes all but the `keep` newest COMPLETE out_dir/step-N folders, and the damaged ones older than
    the newest complete one; returns the deleted ones. final/ and step-N.tmp are never touched (rank 0,
    after a complete save; the rule: docs/checkpoints.md)."""
    out_dir = Path(out_dir)
    steps = sorted(step_folders(out_dir), key=step_number, reverse=True)
    problems = {folder: checkpoint_problem(folder) for folder in steps}
    complete = [folder for folder in steps if problems[folder] is None]
    if not complete:
        return []
    newest_kept = step_number(complete[0])
    doomed = complete[keep:] + [f for f in steps if problems[f] is not None and step_number(f) < newest_kept]
    doomed = sorted(doomed, key=step_number, reverse=True)
    for folder in doomed:
        if problems[folder] is not None:
            print(f"[ckpt] deleting damaged {folder} ({problems[folder]}): {complete[0]} is newer and complete")
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def step_folders(out_dir: Path) -> list[Path]:
    """out_dir/step-N folders (not step-N.tmp / step-N.old)."""
    return [p for p in out_dir.glob("step-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]


def step_number(folder: Path) -> int:
    """N of a step-N folder."""
    return int(folder.name.split("-", 1)[1])


def sharded_state(model, optimizer, d: Dist) -> dict:
    """{"model": fp32 parameters, "optimizer": AdamW state} as torch.distributed.checkpoint state dicts:
    this rank's FSDP2 shards (DTensors) under torchrun, the whole tensors on one process; nothing is
    gathered. A fresh optimizer gets its (zero) state first, so the dict is also the target of a load."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if d.enabled:
        model.reshard()  # the root keeps gathered tensors after a forward; state dicts want the shards
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def load_training_checkpoint(folder: str | Path, model, optimizer, d: Dist) -> dict:
    """Restores the fp32 parameters (over the bf16 HF weights the model may have been loaded from) and the
    optimizer, each rank reading its shard of folder/trainer/, and this rank's RNG states; returns
    trainer_state.pt. A parameter without AdamW state when saved gets none now either."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = load_trainer_state(folder)
    path = Path(folder) / TRAINER_DIR
    try:
        saved = set(read_metadata(path).state_dict_metadata)  # flattened keys
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path / '.metadata'} is unreadable ({first_line(e)})") from e
    target = sharded_state(model, optimizer, d)  # a fresh optimizer gets a (zero) state for every parameter
    missing = [f"model.{k}" for k in target["model"] if f"model.{k}" not in saved]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} model tensor(s), e.g. {missing[0]}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=safe_reader(path), planner=safe_planner(allow_partial_load=True))
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])
    for name, param in model.named_parameters():
        if f"optimizer.state.{name}.step" not in saved:
            optimizer.state.pop(param, None)  # not stepped before the save: stays without state
    set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)])
    return state


def master_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The fp32 model parameters of folder/trainer/, unsharded, by module name (one process;
    e.g. to compare runs or to continue training elsewhere from full precision)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(folder) / TRAINER_DIR
    metadata = read_metadata(path)
    target = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, storage_reader=safe_reader(path), planner=safe_planner(), no_dist=True)
    return {key.removeprefix("model."): value for key, value in target.items()}


def latest_checkpoint(out_dir: str | Path, master: bool = True) -> Path | None:
    """The checkpoint to resume from: the complete one with the highest step, `final/` counted at the step its
    trainer_state.pt records, final/ on a tie; None if there is none. A damaged one is passed over (the
    master says so); CheckpointError names the damage when no candidate is complete."""
    out_dir = Path(out_dir)
    candidates = [(step_number(f), 0, f) for f in step_folders(out_dir)]
    if (out_dir / "final").is_dir():
        final = out_dir / "final"
        try:
            candidates.append((int(load_trainer_state(final, mmap=True)["step"]), 1, final))
        except (CheckpointError, TypeError, ValueError):
            candidates.append((math.inf, 1, final))  # unreadable: checked first, reported as damaged
    damaged = []
    for _, _, folder in sorted(candidates, key=lambda c: c[:2], reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            if damaged and master:
                print(f"[ckpt] passing over damaged checkpoint(s): {'; '.join(damaged)}; resuming from {folder}")
            return folder
        damaged.append(problem)
    if damaged:
        raise CheckpointError(f"no complete checkpoint in {out_dir} to resume from: {'; '.join(damaged)}")
    return None


def check_resume(
    folder: Path, cfg: Any, may_change: set[str], n_rows: int, total_steps: int, out_dir: Path, master: bool
) -> None:
    """Refuses a resume that could not continue the checkpoint's run exactly: a changed setting outside
    `may_change` (a setting the checkpoint lacks counts as its default), another row count or WORLD_SIZE,
    or an end before the checkpoint's step (one CheckpointError listing all). Changes inside `may_change`
    are printed by the master and appended to out_dir/config_changes.jsonl."""
    state = load_trainer_state(folder, mmap=True)
    saved = {f.name: field_default(f) for f in dataclasses.fields(cfg)} | state["config"]
    changed = {k: (saved[k], v) for k, v in dataclasses.asdict(cfg).items() if saved[k] != v}
    refused = [f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k not in may_change]
    if state.get("rows") is not None and state["rows"] != n_rows:
        refused.append(f"the data now gives {n_rows} rows, the checkpoint was trained on {state['rows']}")
    saved_world = state.get("world_size") or len(state["rng"])  # without world_size: one RNG state per rank
    world = int(os.environ.get("WORLD_SIZE", "1"))  # as dist.setup_distributed detects it
    if saved_world and saved_world != world:
        refused.append(
            f"it was trained on {saved_world} process(es) and this run has {world} (the batch sharding, RNG "
            "streams and sharded optimizer state depend on it)"
        )
    if total_steps < state["step"]:
        refused.append(f"this run would end at step {total_steps}, before the checkpoint's step {state['step']}")
    if refused:
        raise CheckpointError(
            f"--resume from {folder} would not continue that run exactly: {'; '.join(refused)}. Use the "
            f"checkpoint's settings ({out_dir / 'config.json'}) or a new --output-dir"
        )
    recorded = {k: list(ab) for k, ab in changed.items() if k not in ("resume", "stop_after")}  # launch-only flags
    if recorded and master:
        print(f"[ckpt] resuming {folder} at step {state['step']} with changed settings: {recorded}")
        out_dir.mkdir(parents=True, exist_ok=True)
        with (out_dir / "config_changes.jsonl").open("a") as f:
            f.write(json.dumps({"step": state["step"], "time": time.time(), "changes": recorded}) + "\n")


def rng_state() -> dict:
    """Python, numpy and torch RNG states as tuples, dicts, lists, numbers and a tensor, so that
    trainer_state.pt loads with torch.load(weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)  # {"bit_generator", "state": {"key": (624,) uint32, "pos"}, ...}
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restores what rng_state() captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Preemption:
    """SIGTERM and SIGUSR1 (a cluster's notice of preemption or of the time limit) become a request to
    finish the current step, save step-N and exit 0. The handler only records the signal; `agreed`, a
    collective once per step, makes all ranks stop after the same step; `stop_before_training` ends the
    run with exit 0 between the long phases before step 1 (docs/checkpoints.md)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: str | None = None  # name of the first signal, e.g. "SIGTERM"
        self.pid = os.getpid()
        for sig in self.SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a forked child inherited the handler: die as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, d: Dist) -> bool:
        """True on every rank if any rank has received a signal (a max all-reduce; every rank calls it)."""
        return all_reduce_max(int(self.received is not None), d.device) > 0

    def stop_before_training(self, d: Dist, stage: str, phase: str, teardown: Callable[[], None] | None = None) -> None:
        """Between the long phases before the first step (a collective): if any rank was signalled, says so
        and exits 0 with nothing to save, after `teardown` (default: the process group's; run.Run.close)."""
        if not self.agreed(d):
            return
        if d.master:
            print(
                f"[{stage}] {self.received or 'another rank signalled'} during {phase}: exiting before the "
                "first step with nothing saved (the same command continues from the latest checkpoint with --resume)",
                flush=True,
            )
        (teardown or cleanup_distributed)()
        raise SystemExit(0)
