"""The command line and the run's records: a config dataclass becomes the CLI, metrics go to
metrics.jsonl and sampled rollouts to rollouts.jsonl, and bad input ends a stage in one `error: ...`
line instead of a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse with the project's two rules: a flag must be spelt out (no abbreviations: `--max-len`
    is refused, never read as `--max-length`), and a refusal is one `error: ...` line (exit status 2)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """argparse's hook for a bad command line: one line on stderr, exit status 2."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def fail(*problems: str) -> NoReturn:
    """Stops the script with one `error: ...` line per problem and exit status 1: the one form of
    every refusal in the project (settings, data, checkpoints, the environment)."""
    raise SystemExit("\n".join(f"error: {p}" for p in problems))


def parse_config(
    cls: type, presets: dict[str, dict[str, Any]] | None = None, argv: list[str] | None = None, prog: str | None = None
):
    """Builds an argparse CLI from a config dataclass and returns a filled, checked instance.

    Every field becomes `--field-name` (or a positional argument when its metadata says
    positional=True); its `help` metadata is the --help text. `--preset NAME` (when presets are
    given) sets the fields the preset names, except those given on the command line: every default
    is a sentinel, so what was typed (`--no-gradient-checkpointing` included) is read from the
    parsed arguments themselves. Then each value is checked against its field's bounds
    (`check_bounds`); a value out of bounds stops the script with `error: --flag must be ..., got x`.
    """
    parser = Parser(prog=prog, description=cls.__doc__)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = field_default(f)
        shown = str(default).replace("%", "%%")  # argparse %-formats help texts
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if f.metadata.get("positional"):
            parser.add_argument(f.name, help=help_text)
            continue
        help_text += f" (default: {shown})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).replace(" | None", ""), str)
        choices = f.metadata.get("choices")
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=choices, help=help_text)
    given = vars(parser.parse_args(argv))  # only the flags on the command line (every default is SUPPRESS)
    values = {f.name: field_default(f) for f in dataclasses.fields(cls)}
    preset = given.get("preset", values.get("preset"))
    if presets and preset:
        if preset not in presets:
            parser.error(f"unknown --preset {preset!r}; choose from {sorted(presets)}")
        unknown = set(presets[preset]) - set(values)
        if unknown:
            raise ValueError(f"preset {preset!r} sets unknown fields {sorted(unknown)}")
        values.update(presets[preset])
    config = cls(**(values | given))
    problems = check_bounds(config)
    if problems:
        fail(*problems)
    return config


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (its default, or what its default_factory makes)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def check_bounds(config: Any) -> list[str]:
    """One line per field whose value is outside the bounds its metadata gives (`at_least`,
    `above`, `at_most`), naming the flag: `--max-response-length must be >= 1, got 0`. A float
    field with bounds must also be finite (NaN passes every comparison)."""
    problems = []
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        bounds = [(k, meta[k]) for k in ("at_least", "above", "at_most") if k in meta]
        if not bounds or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag = "--" + f.name.replace("_", "-")
        if not math.isfinite(value):
            problems.append(f"{flag} must be a finite number, got {value}")
            continue
        for kind, bound in bounds:
            broken = {"at_least": value < bound, "above": value <= bound, "at_most": value > bound}[kind]
            if broken:
                sign = {"at_least": ">=", "above": ">", "at_most": "<="}[kind]
                problems.append(f"{flag} must be {sign} {bound}, got {value}")
                break
    return problems


def field(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field whose help text becomes the --help line of its flag; `at_least=`, `above=`
    and `at_most=` bound its value (checked by parse_config before any work)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def flag_table(cls: type) -> str:
    """The markdown table (flag, default, meaning) of a config dataclass: what docs/ shows of its
    --help. scripts/flag_tables.py writes it into the docs; a test keeps the two the same."""
    out = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        default = field_default(f)
        name = f.name.replace("_", "-")
        if f.metadata.get("positional"):
            flag, shown = f"`{f.name}` (positional)", "-"
        elif f.type in ("bool", bool):
            flag, shown = f"`--{name}` / `--no-{name}`", "on" if default else "off"
        else:
            flag, shown = f"`--{name}`", "-" if default in ("", None) else str(default)
        meaning = f.metadata.get("help", "").replace("|", "\\|")  # a literal | inside a markdown cell
        out.append(f"| {flag} | {shown} | {meaning} |")
    return "\n".join(out)


class InputError(ValueError):
    """Bad input the user must fix (data, checkpoint, settings); its message names what and where.

    Stage scripts print it as one line and exit 1 (see exit_on_input_error), never as a traceback.
    """


class MissingDataError(InputError, FileNotFoundError):
    """A data file or split that is not there (also a FileNotFoundError)."""


class BadRowError(InputError):
    """A data row or data file that cannot be used; the message names the file, the row or line and the problem."""


class CheckpointError(InputError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


def exit_on_input_error(main) -> None:
    """Runs a stage script's main(), turning an InputError into a one-line message and exit status 1."""
    try:
        main()
    except InputError as e:
        fail(str(e))


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, short enough for a one-line error."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300]


class MetricLogger:
    """One JSON line per step in <out>/metrics.jsonl, one per logged rollout in <out>/rollouts.jsonl
    (made by the first log_rollouts call); wandb / tensorboard mirrors when asked.

    A fresh run starts both files anew; a run resumed from step N keeps the lines up to N and drops
    those a killed run wrote after its last checkpoint, so every step appears once (trim_jsonl).
    """

    def __init__(
        self,
        out_dir: str | Path,
        config: Any,
        enabled: bool,
        report_to: str = "",
        project: str = "mmr1",
        resume_from: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.rollouts_path = Path(out_dir) / "rollouts.jsonl"
        self.wandb = self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.path, self.rollouts_path):
            trim_jsonl(path, resume_from)
        self.path.touch()  # metrics.jsonl always exists; rollouts.jsonl once log_rollouts writes
        targets = {t for t in report_to.split(",") if t}
        if "wandb" in targets:
            self.wandb = _optional_import("wandb", "pip install wandb")
            self.wandb.init(project=project, config=dataclasses.asdict(config), dir=str(out_dir))
        if "tensorboard" in targets:
            tb = _optional_import("torch.utils.tensorboard", "pip install tensorboard")
            self.tb = tb.SummaryWriter(str(Path(out_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Appends {"step", "time", **metrics} (floats) to metrics.jsonl and mirrors it; rank 0 only."""
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        """Appends {"step": step, **record} per record to rollouts.jsonl, rank 0 only; with wandb, also a
        Table "rollouts" at that step whose columns are the records' keys. A record is any JSON-serialisable
        dict; grpo.py's hold prompt_id (int), response (str), the reward fields and advantage (floats)."""
        if not self.enabled or not records:
            return
        with self.rollouts_path.open("a") as f:
            for record in records:
                f.write(json.dumps({"step": step, **record}) + "\n")
        if self.wandb:
            columns = list(dict.fromkeys(k for record in records for k in record))  # first-seen order
            rows = [[record.get(k) for k in columns] for record in records]
            self.wandb.log({"rollouts": self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        """Flushes and closes the tensorboard / wandb mirrors."""
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def trim_jsonl(path: Path, last_step: int | None) -> None:
    """Keeps the lines of a JSON-lines file whose "step" is <= last_step (a resumed run keeps its records
    up to its checkpoint) and drops the rest, and a line that is not JSON (a write torn by a kill);
    last_step None (a fresh run) removes the file. A missing file stays missing."""
    if not path.exists():
        return
    if last_step is None:
        path.unlink()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(x + "\n" for x in kept))


def _optional_import(module: str, how: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        fail(f"{module} is not installed; {how}")
