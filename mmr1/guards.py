"""Guards that stop a run before it writes something wrong: a diverged (non-finite) step, a second
run into the same --output-dir, an output folder that cannot be written, a --model folder that
holds no model. Each ends in one `error: ...` line (an InputError) or a counted skip."""

from __future__ import annotations

import fcntl
import math
import os
import socket
import time
from pathlib import Path

from .config import InputError, first_line


class DivergedError(InputError):
    """A step with a non-finite loss or gradient norm (the run diverged; lower --lr)."""


class NonFiniteGuard:
    """Stops the run at the first step whose loss or gradient norm is not finite, before anything
    is saved, naming the step and the last good checkpoint; with `allowed` > 0 (--skip-nonfinite)
    up to that many such steps are skipped (no optimizer step: clip_and_step only steps on a finite
    norm) and counted. Every rank sees the same all-reduced loss and global norm, so all agree."""

    def __init__(self, allowed: int, last_good: Path | None = None):
        self.allowed = allowed
        self.skipped = 0
        self.last_good = last_good  # the newest checkpoint known to hold finite weights (Run.save sets it)

    def check(self, step: int, loss: float, grad_norm: float) -> bool:
        """True for a finite step; False for a skipped one; DivergedError past the allowance."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return True
        self.skipped += 1
        if self.skipped > self.allowed:
            allowance = f" (after skipping {self.allowed})" if self.allowed else ""
            raise DivergedError(
                f"step {step}: loss {loss}, grad norm {grad_norm}: the run diverged{allowance}; nothing of "
                f"this step was saved; last good checkpoint: {self.last_good or 'none'} (lower --lr, or "
                "--skip-nonfinite N to skip up to N such steps)"
            )
        return False


def check_output_dir(out_dir: str | Path, flag: str = "--output-dir") -> Path:
    """Creates out_dir if needed and proves it writable (a probe file); InputError naming it
    otherwise (an existing file, a read-only or forbidden place)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{flag} {out_dir}: is an existing file, not a folder")
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"{flag} {out_dir}: cannot write there ({first_line(e)})") from e
    return out_dir


_HELD_LOCKS: list = []  # open lock files: the flock lasts while the file stays open (this process's life)


def lock_output_dir(out_dir: str | Path, master: bool = True) -> None:
    """Rank 0 holds an exclusive flock on <out_dir>/.lock (holding its pid, host and start time)
    for the rest of the process, so a second run into the same folder stops with one line naming
    the holder. The kernel drops a flock when its process dies, so a killed run never blocks the next."""
    if not master:
        return
    out_dir = check_output_dir(out_dir)
    handle = open(out_dir / ".lock", "a+")  # noqa: SIM115 - stays open for the life of the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise InputError(
            f"--output-dir {out_dir} is in use by another run ({holder}); wait for it or use another --output-dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _HELD_LOCKS.append(handle)


def check_model_dir(path: str, flag: str = "--model") -> None:
    """InputError for a --model that names a local folder without a loadable model: missing,
    empty, no config.json, no weight files, or no tokenizer. A hub id (not on disk) is left to the loader."""
    folder = Path(path).expanduser()
    looks_local = path.startswith(("/", "./", "../", "~")) or folder.exists()
    if not looks_local:
        return
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: {'is a file, not a model folder' if folder.exists() else 'no such folder'}")
    names = {p.name for p in folder.iterdir()}
    if not names:
        raise InputError(f"{flag} {path}: an empty folder, not a model (config.json, weights, tokenizer)")
    found = {
        "config.json": "config.json" in names,
        "weights (*.safetensors)": any(any(folder.glob(p)) for p in ("*.safetensors", "pytorch_model*.bin")),
        "a tokenizer (tokenizer.json)": bool(names & {"tokenizer.json", "tokenizer_config.json", "vocab.json"}),
    }
    missing = [what for what, present in found.items() if not present]
    if missing:
        raise InputError(f"{flag} {path}: not a model folder, it has no {', '.join(missing)}")
