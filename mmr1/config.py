"""The command line and the run's records: a config dataclass becomes the CLI (bounds, finite floats
and the shared flags' rules checked before any work; the flags sft.py and grpo.py share are one dataclass,
TrainingFlags), metrics go to metrics.jsonl and sampled rollouts
to rollouts.jsonl, files meant for later reading are written whole (atomic_file) and read back with
one line naming file and line (read_jsonl, loads_json), and bad input ends a stage in one
`error: ...` line instead of a traceback."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import operator
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, NoReturn


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
    """Builds an argparse CLI from a config dataclass and returns a filled, checked instance. Every field
    becomes `--field-name` (a positional argument with metadata positional=True), its `help` metadata the
    --help text. `--preset NAME` sets the fields the preset names but those typed: every default is a sentinel,
    so what was typed (`--no-gradient-checkpointing` included) is read from the parsed arguments. A value out of
    its field's bounds (check_bounds) stops the script with `error: --flag must be ..., got x`."""
    parser = Parser(prog=prog, description=cls.__doc__)
    for f in flag_order(cls):
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


# Fields the stages share, checked by name wherever a config has them (the same rule in every stage).
SEED_RANGE = (0, 2**32 - 1)  # what numpy's np.random.seed accepts (dist.setup_distributed seeds it)
LOG_SINKS = ("wandb", "tensorboard")  # what --report-to may name (MetricLogger mirrors to these)
BOUNDS = (("at_least", ">=", operator.lt), ("above", ">", operator.le), ("at_most", "<=", operator.gt))  # field()'s


def check_bounds(config: Any) -> list[str]:
    """One line per field whose value is outside the bounds its metadata gives (`at_least`,
    `above`, `at_most`), naming the flag: `--max-response-length must be >= 1, got 0`. Every float
    field must be finite (NaN passes every comparison; no setting means anything at infinity), and
    the shared fields obey one rule in every stage: `seed` within SEED_RANGE, `report_to` naming
    only LOG_SINKS, `output_dir` not empty."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = bound_problem(value, f.metadata) or shared_field_problem(f.name, value)
        if problem:
            problems.append(f"--{f.name.replace('_', '-')} {problem}")
    return problems


def bound_problem(value: Any, meta: Any) -> str | None:
    """`must be >= 1, got 0` for a number outside the bounds in its field's metadata, or not finite; else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    for kind, sign, broken in BOUNDS:
        if kind in meta and broken(value, meta[kind]):
            return f"must be {sign} {meta[kind]}, got {value}"
    return None


def shared_field_problem(name: str, value: Any) -> str | None:
    """What is wrong with the value of a field every stage shares (seed, report_to, output_dir), or None."""
    if name == "seed" and isinstance(value, int) and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        return f"must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (numpy's seed range), got {value}"
    if name == "report_to" and isinstance(value, str):
        unknown = [t for t in value.split(",") if t and t not in LOG_SINKS]
        if unknown:
            return f"names unknown metric sink(s) {unknown}; choose from {','.join(LOG_SINKS)} (or leave it empty)"
    if name == "output_dir" and isinstance(value, str) and not value.strip():
        return "is empty; give the folder the run writes into"
    return None


def field(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field whose help text becomes the --help line of its flag; `at_least=`, `above=`
    and `at_most=` bound its value (checked by parse_config before any work)."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass
class TrainingFlags:
    """The flags sft.py and grpo.py share, defined once; each stage's config adds its own after these."""

    min_pixels: int = field(3136, "images are resized to at least this many pixels", at_least=1)
    max_pixels: int = field(50176, "images are resized to at most this many pixels", at_least=1)
    max_tokens_per_micro_batch: int = field(
        4096, "tokens per forward/backward on one rank (0 = fixed --micro-batch-size sequences)", at_least=0
    )
    pack: bool = field(True, "padding-free forward: a micro-batch's sequences packed into one row (--no-pack: padded)")
    logprob_chunk: int = field(1024, "positions per lm_head chunk in the log-prob pass (memory vs speed)", at_least=1)
    gradient_checkpointing: bool = field(False, "recompute activations in backward to save memory")
    max_grad_norm: float = field(1.0, "gradient clipping norm", above=0.0)
    skip_bad_rows: bool = field(False, "skip and count malformed rows instead of stopping")
    skip_nonfinite: int = field(
        0, "skip (and count) up to N steps with a non-finite loss or grad norm; 0 = stop at the first", at_least=0
    )
    resume: bool = field(
        False, "continue from the latest <output-dir>/step-N (bit for bit on CPU; on GPU approximately: FA2, vLLM)"
    )
    stop_after: int = field(0, "exit after N steps without the final save, as a preemption would (testing)", at_least=0)
    save_total_limit: int = field(0, "keep the newest N step-* checkpoints (final/ always kept; 0 = all)", at_least=0)
    report_to: str = field("", "extra metric sinks, comma-separated: wandb,tensorboard")

    def range_problems(self) -> list[str]:
        """What is wrong between these flags (each one's own bounds are parse_config's): one message per
        problem, [] when none; a pixel range whose minimum is above its maximum."""
        if self.min_pixels > self.max_pixels:
            return [f"--min-pixels {self.min_pixels} is above --max-pixels {self.max_pixels}"]
        return []


def toy_fills_in(cfg: Any) -> bool:
    """Whether the toy (--toy) is to supply what --model / --data leave out: not when both are given. Only one
    of the two without --toy NAME stops: half a real run on the toy is more likely a typo than a plan."""
    if cfg.model and cfg.data:
        return False
    if (cfg.model or cfg.data) and cfg.toy == "default":
        fail(
            "give both --model and --data (or neither, for the toy task; or --toy NAME to take the other from that toy)"
        )
    return True


def flag_order(cls: type) -> list[dataclasses.Field]:
    """The fields of a config in --help order: the stage's own first, then those it shares (TrainingFlags)."""
    shared = {f.name for f in dataclasses.fields(TrainingFlags)} if issubclass(cls, TrainingFlags) else set()
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name not in shared] + [f for f in fields if f.name in shared]


# The TrainingFlags and common settings a --resume may change without breaking the exact continuation
# (recorded in config_changes.jsonl); each stage adds its own, and any other change is refused.
RESUME_MAY_CHANGE = {
    "resume", "stop_after", "report_to", "save_total_limit", "gradient_checkpointing", "logprob_chunk",
    "skip_bad_rows", "skip_nonfinite", "max_steps", "output_dir", "preset", "save_every", "val_data", "val_limit",
}  # fmt: skip


def flag_table(cls: type) -> str:
    """The markdown table (flag, default, meaning) of a config dataclass: what docs/ shows of its
    --help. scripts/flag_tables.py writes it into the docs; a test keeps the two the same."""
    out = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for f in flag_order(cls):
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
    """Bad input the user must fix (data, checkpoint, settings); its message names what and where. Stage
    scripts print it as one line and exit 1 (exit_on_input_error), never as a traceback."""


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


# --- Files written for later reading: whole or not at all; read back with one line naming file and line ---


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A temporary file beside `path`, open for writing in `mode`; when the block ends without an error
    it is fsynced and renamed over `path`, so a reader (or a kill, or a full disk) sees the old file
    or the whole new one, never a part. On an error the temporary file goes and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def loads_json(text: str) -> Any:
    """json.loads, where JSON nested deeper than Python's recursion allows (a line of 100,000 `[`) is a
    json.JSONDecodeError like any other malformed JSON, never a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None


def decode_json(decoder: json.JSONDecoder, text: str, start: int) -> tuple[Any, int]:
    """decoder.raw_decode(text, start) -> (value, end), with loads_json's rule for deep nesting."""
    try:
        return decoder.raw_decode(text, start)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, start) from None


def read_jsonl(path: str | Path) -> list[dict]:
    """The objects of a JSON-lines file the project wrote (metrics.jsonl, rollouts.jsonl), one per non-blank
    line, in order. BadRowError naming the file and the line (from 1) for a missing file or a line that is
    not UTF-8, not JSON or not an object; a run still writing has no torn line (each is one write)."""
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{path} not found")
    records = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            record = loads_json(raw.decode("utf-8")) if raw.strip() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            why = f"not JSON ({e.msg})" if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise BadRowError(f"{path} line {number}: {why}") from e
        if record is not None and not isinstance(record, dict):
            raise BadRowError(f"{path} line {number}: a JSON {type(record).__name__}, not an object")
        if record is not None:
            records.append(record)
    return records


class MetricLogger:
    """Rank 0's records: one JSON line per step in <out>/metrics.jsonl, one per logged rollout in
    <out>/rollouts.jsonl (made by the first log_rollouts call); wandb / tensorboard mirrors when asked.
    A fresh run starts both files anew; a run resumed from step N keeps the lines up to N (trim_jsonl), so
    every step appears once. Each record is one write of whole lines; a failed write (a full disk) is kept in
    `failed`, not raised, so the run can save the step it has just trained before it stops (run.Run.end_step)."""

    def __init__(self, out_dir: str | Path, config: Any, report_to: str = "", project: str = "mmr1",
                 resume_from: int | None = None):  # fmt: skip
        self.path = Path(out_dir) / "metrics.jsonl"
        self.rollouts_path = Path(out_dir) / "rollouts.jsonl"
        self.failed: str | None = None  # the first write that failed: "could not write <file> (<error>)"
        self.wandb = self.tb = None
        try:  # before step 1: nothing to save yet, so a failure here stops the run at once
            self.path.parent.mkdir(parents=True, exist_ok=True)
            for path in (self.path, self.rollouts_path):
                trim_jsonl(path, resume_from)
            self.path.touch()  # metrics.jsonl always exists; rollouts.jsonl once log_rollouts writes
        except OSError as e:
            raise InputError(f"could not write the run's records in {self.path.parent} ({first_line(e)})") from e
        targets = {t for t in report_to.split(",") if t}  # LOG_SINKS only (check_bounds)
        if "wandb" in targets:
            self.wandb = _optional_import("wandb", "pip install wandb")
            self.wandb.init(project=project, config=dataclasses.asdict(config), dir=str(out_dir))
        if "tensorboard" in targets:
            tb = _optional_import("torch.utils.tensorboard", "pip install tensorboard")
            self.tb = tb.SummaryWriter(str(Path(out_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Appends {"step", "time", **metrics} (floats) to metrics.jsonl and mirrors it."""
        record = {"step": step, "time": time.time(), **{k: float(v) for k, v in metrics.items()}}
        self._append(self.path, [record])
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        """Appends {"step": step, **record} per record to rollouts.jsonl; with wandb, also a Table
        "rollouts" at that step whose columns are the records' keys. A record is any JSON-serialisable
        dict; grpo.py's hold prompt_id (int), response (str), the reward fields and advantage (floats)."""
        if not records:
            return
        self._append(self.rollouts_path, [{"step": step, **record} for record in records])
        if self.wandb:
            columns = list(dict.fromkeys(k for record in records for k in record))  # first-seen order
            rows = [[record.get(k) for k in columns] for record in records]
            self.wandb.log({"rollouts": self.wandb.Table(columns=columns, data=rows)}, step=step)

    def _append(self, path: Path, records: list[dict[str, Any]]) -> None:
        """Appends the records as JSON lines in one write; an OSError is kept in `failed` (the first one)."""
        try:
            with path.open("a") as f:
                f.write("".join(json.dumps(record) + "\n" for record in records))
        except OSError as e:
            self.failed = self.failed or f"could not write {path} ({first_line(e)})"

    def close(self) -> None:
        """Flushes and closes the tensorboard / wandb mirrors."""
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class NullLogger:
    """The logger of every rank but 0: the same calls as MetricLogger, nothing written."""

    failed: str | None = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Nothing: rank 0 logs the run's metrics."""

    def log_rollouts(self, step: int, records: list[dict[str, Any]]) -> None:
        """Nothing: rank 0 logs the rollouts (gathered from every rank)."""

    def close(self) -> None:
        """Nothing to close."""


def metric_logger(out_dir: str | Path, config: Any, master: bool, report_to: str = "", project: str = "mmr1",
                  resume_from: int | None = None) -> MetricLogger | NullLogger:  # fmt: skip
    """Rank 0's MetricLogger (master), a NullLogger on the other ranks."""
    return MetricLogger(out_dir, config, report_to, project, resume_from) if master else NullLogger()


def trim_jsonl(path: Path, last_step: int | None) -> None:
    """Keeps the lines of a JSON-lines file whose "step" is <= last_step (a resumed run keeps its records
    up to its checkpoint) and drops the rest, and a line that is not JSON (a write torn by a kill); the
    file is replaced atomically. last_step None (a fresh run) removes the file. A missing file stays missing."""
    if not path.exists():
        return
    if last_step is None:
        path.unlink()
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if loads_json(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError, IndexError):
            continue
    with atomic_file(path) as f:
        f.write("".join(x + "\n" for x in kept))


def _optional_import(module: str, how: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        fail(f"{module} is not installed; {how}")
