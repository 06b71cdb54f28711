"""Checkpoints: atomic HF-format model folders with the trainer state beside them, finding the
checkpoint to resume from, and refusing a resume that could not continue the run exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .config import CheckpointError, first_line
from .dist import Dist, all_gather_list
from .modeling import full_state_dict


def save_checkpoint(model, processor, out_dir: str | Path, d: Dist, trainer_state: dict | None = None) -> None:
    """Writes out_dir as an HF model folder (+ processor, + trainer_state.pt) atomically.

    Every rank must call it (the full state dict is gathered collectively); rank 0 writes into
    a temporary folder and renames it over out_dir, so a kill mid-save leaves the old one intact.
    """
    state = full_state_dict(model, d)
    if d.master:
        out_dir = Path(out_dir)
        tmp, old = out_dir.with_name(out_dir.name + ".tmp"), out_dir.with_name(out_dir.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            unwrapped = getattr(model, "module", model)
            unwrapped.save_pretrained(tmp, state_dict=state)
            processor.save_pretrained(tmp)
            if trainer_state is not None:
                torch.save(trainer_state, tmp / "trainer_state.pt")
        except OSError as e:  # disk full, quota, permissions: the previous checkpoint stays as it was
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(
                f"could not write checkpoint {out_dir} ({first_line(e)}); its temp folder {tmp} was removed "
                "and the previous checkpoints are intact"
            ) from e
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    if d.enabled:
        dist.barrier()


def save_training_checkpoint(
    model, processor, optimizer, folder: str | Path, d: Dist, step: int, config: Any, **extra: Any
) -> None:
    """save_checkpoint with a trainer_state.pt holding the step, the full optimizer state, every
    rank's RNG states, the config and any script-specific `extra` (scheduler, sampler, VPS)."""
    state = {
        "step": step,
        "optimizer": optimizer_state(model, optimizer, d),
        "rng": all_gather_list([rng_state()], d),
        "config": dataclasses.asdict(config),
        "world_size": d.world_size,  # a resume must use the same (check_resume)
        **extra,
    }
    save_checkpoint(model, processor, folder, d, state)


def load_training_checkpoint(folder: str | Path, model, optimizer, d: Dist) -> dict:
    """Restores the optimizer and this rank's RNG states from folder/trainer_state.pt; returns the
    whole trainer state (its "step" and the script-specific entries)."""
    state = load_trainer_state(folder)
    load_optimizer_state(model, optimizer, state["optimizer"], d)
    set_rng_state(state["rng"][min(d.rank, len(state["rng"]) - 1)])
    return state


TRAINER_STATE_KEYS = ("step", "optimizer", "rng", "config")


def load_trainer_state(folder: str | Path, mmap: bool = False) -> dict:
    """folder/trainer_state.pt, unpickling plain types and tensors only (weights_only=True).

    CheckpointError naming the file when it is missing, damaged or lacks an entry; mmap=True maps
    the tensors instead of reading them (a cheap completeness check).
    """
    path = Path(folder) / "trainer_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = torch.load(path, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - empty, truncated, or holding objects weights_only refuses
        raise CheckpointError(f"{path} is unreadable ({first_line(e)})") from e
    missing = [k for k in TRAINER_STATE_KEYS if k not in state] if isinstance(state, dict) else TRAINER_STATE_KEYS
    if missing:
        raise CheckpointError(f"{path} lacks {list(missing)}")
    return state


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be resumed from (the damaged or missing file, named), or None if it is complete.

    Checks config.json, every safetensors weight file (header and size: a truncated file fails) and
    trainer_state.pt (loads with weights_only=True, memory-mapped, and holds every entry).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return f"{folder / 'config.json'} is missing"
    index = folder / "model.safetensors.index.json"
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else None
    except (ValueError, KeyError, AttributeError) as e:
        return f"{index} is unreadable ({first_line(e)})"
    from safetensors import safe_open

    for name in names or ["model.safetensors"]:
        try:
            with safe_open(str(folder / name), "pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - missing, truncated or corrupt header
            return f"{folder / name} is unreadable ({first_line(e)})"
    try:
        load_trainer_state(folder, mmap=True)
    except CheckpointError as e:
        return str(e)
    return None


def latest_checkpoint(out_dir: str | Path, master: bool = True) -> Path | None:
    """The checkpoint to resume from: `final` if the run finished, else the `step-N` with the
    highest N; None if there is none.

    A damaged candidate (checkpoint_problem) is passed over for the previous complete one, and
    the master says so; CheckpointError names the damage when no candidate is complete.
    """
    out_dir = Path(out_dir)
    steps = [p for p in out_dir.glob("step-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    steps.sort(key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)
    candidates = ([out_dir / "final"] if (out_dir / "final").is_dir() else []) + steps
    damaged = []
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None:
            if damaged and master:
                print(f"[ckpt] passing over damaged checkpoint(s): {'; '.join(damaged)}; resuming from {folder}")
            return folder
        damaged.append(problem)
    if damaged:
        raise CheckpointError(f"no complete checkpoint in {out_dir} to resume from: {'; '.join(damaged)}")
    return None


def resume_point(
    cfg: Any, may_change: set[str], out_dir: Path, n_rows: int, total_steps: int, master: bool, stage: str
) -> Path | None:
    """With cfg.resume: the latest complete checkpoint in out_dir (damaged ones passed over), its
    settings checked against this run's (check_resume: an exact continuation or an error); None
    for a fresh start (and without --resume)."""
    ckpt = latest_checkpoint(out_dir, master) if cfg.resume else None
    if cfg.resume and ckpt is None and master:
        print(f"[{stage}] --resume: no checkpoint in {out_dir}, starting from {cfg.model}")
    if ckpt is not None:
        check_resume(ckpt, cfg, may_change, n_rows, total_steps, out_dir, master)
    return ckpt


def check_resume(
    folder: Path, cfg: Any, may_change: set[str], n_rows: int, total_steps: int, out_dir: Path, master: bool
) -> None:
    """Refuses a resume that could not continue the checkpoint's run exactly; records harmless changes.

    Compares the checkpoint's config with this run's: a change to a field outside `may_change`
    (data, batch shape, seeds, optimisation: what the trajectory depends on) is a CheckpointError
    listing every difference; changes inside `may_change` (run length, logging, validation, memory
    knobs) are printed by the master and appended to out_dir/config_changes.jsonl. Also refuses
    data that now gives another number of rows, another number of processes (WORLD_SIZE) than the
    checkpoint's, and a run that would end before the checkpoint's step.
    """
    state = load_trainer_state(folder, mmap=True)
    saved, new = state["config"], dataclasses.asdict(cfg)
    changed = {k: (saved[k], v) for k, v in new.items() if k in saved and saved[k] != v}  # new fields: unchanged
    refused = [f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in changed.items() if k not in may_change]
    if state.get("rows") is not None and state["rows"] != n_rows:
        refused.append(f"the data now gives {n_rows} rows, the checkpoint was trained on {state['rows']}")
    saved_world = state.get("world_size") or len(state["rng"])  # older checkpoints: one RNG state per rank
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


def optimizer_state(model, optimizer, d: Dist) -> dict:
    """Full optimizer state dict (gathered from all ranks under FSDP2; a collective there)."""
    if not d.enabled:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model.reshard()

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict, d: Dist) -> None:
    """Loads what optimizer_state() returned (re-sharded under FSDP2)."""
    if not d.enabled:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
