"""The run scaffolding sft.py and grpo.py share, in one place so the two cannot drift: setup (config,
toy defaults, model folder, process group, output-dir lock), the resume point, the metric logger,
the non-finite guard, the save of step-N / final, preemption, the loop tail and the teardown.

    cfg, d, out_dir = run.setup(Config, PRESETS, validate_config, use_toy_defaults, "grpo")
    r = run.Run(cfg, d, out_dir, "grpo", RESUME_MAY_CHANGE, n_rows, total_steps)  # finds the resume point
    state = r.start(model, optimizer, save)          # restores a checkpoint (or None), opens the logger
    r.close_on_exit(engine.close)                    # at every exit, before the process group goes
    for step in r.steps():
        ...                                          # the algorithm
        if r.end_step(step + 1, metrics):            # log, save every N, preemption, --stop-after
            break
    r.finish()                                       # final save, summary, closers, logger, process group

    run.main(main)                                   # the script's entry: an error still closes the run
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import checkpoint, config, dist, guards

PREEMPTION: checkpoint.Preemption | None = None  # installed by setup() before any long work; Run takes it


def setup(cls: type, presets: dict, validate: Callable, use_toy_defaults: Callable, stage: str):
    """Everything that can refuse the run before any data is read: the SIGTERM / SIGUSR1 handlers installed
    (PREEMPTION), the config parsed and checked (validate, then the toy defaults), the --model folder, the
    process group, --preset paper's CUDA check, rank 0 holding --output-dir's lock (proves it writable).
    Returns (cfg, dist.Dist, output folder)."""
    global PREEMPTION
    PREEMPTION = PREEMPTION or checkpoint.Preemption()  # first: a signal during loading is not lost
    cfg = config.parse_config(cls, presets)
    validate(cfg)
    use_toy_defaults(cfg)
    guards.check_model_dir(cfg.model)
    d = dist.setup_distributed(cfg.seed)
    if cfg.preset == "paper":
        dist.require_cuda(d, f"{stage}.py --preset paper")
    out_dir = Path(cfg.output_dir)
    guards.lock_output_dir(out_dir, d.master)  # one run per --output-dir
    return cfg, d, out_dir


class Run:
    """One training run's bookkeeping around the loop. Construction finds the resume point (its settings
    checked against these) and takes the preemption handlers; `start` restores the checkpoint and opens
    the metric logger; `end_step` is the loop's tail; `finish` the teardown."""

    def __init__(
        self, cfg: Any, d: dist.Dist, out_dir: Path, stage: str, may_change: set[str], n_rows: int, total_steps: int
    ):
        self.cfg, self.d, self.out_dir, self.stage, self.total_steps = cfg, d, out_dir, stage, total_steps
        self.ckpt = checkpoint.latest_checkpoint(out_dir, d.master) if cfg.resume else None  # damaged: passed over
        if cfg.resume and self.ckpt is None:
            self.print0(f"--resume: no checkpoint in {out_dir}, starting from {cfg.model}")
        if self.ckpt is not None:  # an exact continuation of its run, or a CheckpointError
            checkpoint.check_resume(self.ckpt, cfg, may_change, n_rows, total_steps, out_dir, d.master)
        self.policy_path = str(self.ckpt or cfg.model)  # where the trainable model is loaded from
        self.preemption = PREEMPTION or checkpoint.Preemption()  # installed by setup() in the stages
        self.nonfinite = guards.NonFiniteGuard(cfg.skip_nonfinite, self.ckpt)
        self.start_step = self.done = 0
        self.stopped = ""  # why the loop ended before total_steps
        self.logger: config.MetricLogger | config.NullLogger | None = None
        self._save: Callable[[Path, int], None] | None = None
        self.closers: list[Callable[[], None]] = []  # engines, pools: closed before the process group
        OPEN.append(self)

    def close_on_exit(self, closer: Callable[[], None]) -> None:
        """Registers `closer` (an engine's or a pool's close): the closers run in order before the metric
        logger and the process group go (vLLM's teardown uses the group), on every exit (finish,
        stop_before_training, an error in main)."""
        self.closers.append(closer)

    def close(self, barrier: bool = True) -> None:
        """The teardown's end, once: the closers in order (one that fails is named in one line), the metric
        logger, the process group (after a barrier; barrier=False on an error, whose peers may never reach one)."""
        if self in OPEN:
            OPEN.remove(self)
        closers, self.closers = self.closers, []
        for closer in closers:
            try:
                closer()
            except Exception as e:  # noqa: BLE001 - the teardown goes on; the line names what failed
                print(f"[{self.stage}] rank {self.d.rank}: closing {getattr(closer, '__qualname__', closer)} failed: "
                      f"{config.first_line(e)}", flush=True)  # fmt: skip
        if self.logger is not None:
            self.logger.close()
        if barrier:
            dist.cleanup_distributed()
        elif torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def stop_before_training(self, phase: str) -> None:
        """Between the long phases before step 1 (a collective): exits 0 with nothing saved if any rank was
        signalled during `phase`, after close()."""
        self.preemption.stop_before_training(self.d, self.stage, phase, teardown=self.close)

    def print0(self, message: str) -> None:
        """`[stage] message` on rank 0 (the one print helper of the stages)."""
        if self.d.master:
            print(f"[{self.stage}] {message}", flush=True)

    def start(self, model, optimizer, save: Callable[[Path, int], None]) -> dict | None:
        """Restores model and optimizer from the resume point (returns the trainer state, None on a fresh
        start), remembers `save(folder, step)`, the stage's writer, and opens the metric logger."""
        state = None
        if self.ckpt is not None:
            state = checkpoint.load_training_checkpoint(self.ckpt, model, optimizer, self.d)
            self.start_step = self.done = state["step"]
            self.print0(f"resumed from {self.ckpt} at step {self.start_step}")
        self.stop_before_training("loading")  # a signal so far: exit 0 before the logger writes anything
        self._save = save
        resume_from = self.start_step if self.ckpt is not None else None  # keeps metrics.jsonl up to its step
        self.logger = config.metric_logger(
            self.out_dir, self.cfg, self.d.master, self.cfg.report_to, resume_from=resume_from
        )
        return state

    def announce(self, summary: str) -> None:
        """Rank 0: writes <out>/config.json (the whole config) and prints what the run will do."""
        if self.d.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with config.atomic_file(self.out_dir / "config.json") as f:  # whole or the previous one
                f.write(json.dumps(dataclasses.asdict(self.cfg), indent=2))
        self.print0(summary)

    def steps(self):
        """The remaining step numbers with a progress bar on rank 0."""
        steps = range(self.start_step, self.total_steps)
        return tqdm(steps, desc=self.stage, initial=self.start_step, total=self.total_steps, disable=not self.d.master)

    def save(self, name: str, step: int) -> None:
        """<out>/<name> (step-N or final) through the stage's save; recorded as the last good checkpoint."""
        self._save(self.out_dir / name, step)
        self.nonfinite.last_good = self.out_dir / name  # written after a finite step

    def end_step(self, done: int, metrics: dict[str, float]) -> bool:
        """The loop's tail after step `done` (a collective): logs the metrics, saves step-N every --save-every;
        True when the loop must stop now (a preemption signal on any rank: step-N saved; or --stop-after)."""
        cfg, self.done = self.cfg, done
        if cfg.skip_nonfinite:
            metrics["train/skipped_nonfinite"] = self.nonfinite.skipped
        self.logger.log(done, metrics)
        saved = bool(cfg.save_every and done % cfg.save_every == 0 and done < self.total_steps)
        if saved:
            self.save(f"step-{done}", done)
        if dist.all_reduce_max(int(self.logger.failed is not None), self.d.device):  # rank 0 could not write
            self.stop_on_write_failure(done, saved)
        if done < self.total_steps and self.preemption.agreed(self.d):  # any rank signalled: all stop here
            if not saved:
                self.save(f"step-{done}", done)
            signal = self.preemption.received or "another rank signalled"
            self.stopped = f"{signal}: saved {self.out_dir / f'step-{done}'}, exiting"
            return True
        if cfg.stop_after and done >= cfg.stop_after and done < self.total_steps:
            self.stopped = f"--stop-after {cfg.stop_after}: stopped at step {done} without the final save"
            return True
        return False

    def stop_on_write_failure(self, done: int, saved: bool) -> None:
        """Rank 0 could not write its records (a full disk, a quota): saves step-N where it can, then stops
        with one line (an InputError) saying what failed and what was saved. Every rank calls it."""
        folder = self.out_dir / f"step-{done}"
        try:
            if not saved:
                self.save(folder.name, done)
            kept = f"step {done} is saved in {folder}; free space, then continue with --resume"
        except config.CheckpointError as e:
            kept = f"step {done} could not be saved either ({e})"
        raise config.InputError(f"{self.logger.failed or 'rank 0 could not write its records'}; {kept}")

    def finish(self, summary: str = "") -> None:
        """The teardown, whatever ended the loop: final/ saved when every step ran, one line saying how the
        run ended, then close()."""
        if self.done == self.total_steps and not self.stopped:
            self.save("final", self.total_steps)
            self.print0(f"done: {self.total_steps} steps, model in {self.out_dir / 'final'}{summary}")
        else:
            self.print0(self.stopped)
        self.close()


OPEN: list[Run] = []  # the runs of this process not closed yet (main closes them on an error)


def main(stage_main: Callable[[], None]) -> None:
    """Runs a stage script's main(): an InputError becomes one line and exit status 1
    (config.exit_on_input_error); whatever ends it, every Run still open is closed (engines first)."""
    try:
        config.exit_on_input_error(stage_main)
    finally:
        while OPEN:
            OPEN[-1].close(barrier=False)
