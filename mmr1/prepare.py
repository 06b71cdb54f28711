"""The door: every check of a split's rows, once, before step 1, and one report.

    rows = prepare.prepare_split(spec, door, processor, d, skip_bad_rows=..., role="--data")

A row is trainable when its fields are right (data.check_fields, cached with the Arrow data), its
text is valid (no lone surrogate, none of the model's own special tokens typed in), every image
exists, is a file, has a header that decodes and a shape the processor takes after resizing
(images.check_image_shape), and its tokens fit: the prompt within --max-prompt-length (GRPO), or
a --max-length cut that keeps its image tokens and an assistant token (SFT). Images are read by
their headers only (a 1.6M-row SFT set cannot be decoded up front). The checks of a split run
once per data content and settings: sharded over ranks, agreed with one all-gather, and cached in
HF_DATASETS_CACHE/mmr1_door (keyed by the data's fingerprint and every setting they read).

The result is one report ("N rows, K left out: reasons with counts, first rows named"), then a
one-line error naming the first bad row, or with --skip-bad-rows the rows removed: the loop never
sees them. The one check left for the loop is decoding an image (data.Rows.__getitem__); a row
whose image fails there follows the same rule (an error, or with --skip-bad-rows it is passed over
and the next row takes its place, as if the door had removed it).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import batches, data, dist
from .chat import PromptFormat
from .config import BadRowError
from .images import check_image_shape, image_size

DOOR_VERSION = 1  # bump when a check changes: cached verdicts of the old checks are then not used


@dataclass(frozen=True)
class Door:
    """What makes a row trainable in this run: its kind ('rl' or 'sft'), the run's image pixel range,
    the token limit (rl: --max-prompt-length of the prompt; sft: the --max-length cut; 0 = none),
    and the prompt format (the instruction counts towards the prompt's tokens)."""

    kind: str
    min_pixels: int
    max_pixels: int
    max_tokens: int = 0
    fmt: PromptFormat = PromptFormat()

    @property
    def flag(self) -> str:
        """The flag the token limit comes from."""
        return "--max-prompt-length" if self.kind == "rl" else "--max-length"


@dataclass
class Report:
    """What the door found in one split: rows looked at, and (global position, reason, message)
    of each row left out, in position order."""

    spec: str
    rows: int
    bad: list[tuple[int, str, str]]

    def line(self, named: int = 3) -> str:
        """`[data] SPEC: N rows, K left out (count reason, ...); first: MESSAGE; ...` (or all usable)."""
        if not self.bad:
            return f"[data] {self.spec}: {self.rows} rows, all usable"
        counts = Counter(reason for _, reason, _ in self.bad)
        reasons = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
        first = "; ".join(message for _, _, message in self.bad[:named])
        return f"[data] {self.spec}: {self.rows} rows, {len(self.bad)} left out ({reasons}); first: {first}"


# ---------------------------------------------------------------------------------------------
# The checks of one row
# ---------------------------------------------------------------------------------------------


def reserved_tokens(tokenizer) -> list[str]:
    """The model's own chat and vision tokens (`<|im_start|>`, `<|image_pad|>`, ...): text that
    holds one would break the chat structure or the image-token count (Qwen's processor raises
    StopIteration on a typed `<|image_pad|>`). Images are written as `<image>` markers instead."""
    return sorted(t for t in tokenizer.all_special_tokens if t.startswith("<|") and t.endswith("|>"))


def row_texts(row: dict, kind: str) -> list[tuple[str, str]]:
    """(name, text) of each text of a checked row that the tokenizer reads."""
    if kind == "rl":
        return [("'problem'", row["problem"])]
    return [(f"message {j} ({m['role']})", m["content"]) for j, m in enumerate(row["messages"])]


def text_problem(row: dict, kind: str, reserved: list[str]) -> tuple[str, str] | None:
    """(reason, message) for a text that is no valid Unicode (a lone surrogate such as "\\ud83d",
    which JSON's escapes can make and no tokenizer takes) or that holds a reserved token; else None."""
    for name, text in row_texts(row, kind):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                return "invalid text", (
                    f"{name} holds a lone surrogate {text[e.start]!r} at character {e.start}: not valid Unicode "
                    "(a broken \\ud83d-style escape; fix or drop the character)"
                )
        if "<|" in text:
            for token in reserved:
                if token in text:
                    return "special token in text", (
                        f"{name} contains the model's own token {token}; write an image as an <image> marker"
                    )
    return None


def image_problem(row: dict, min_pixels: int, max_pixels: int) -> tuple[str, str] | None:
    """(reason, message) for an image that is missing, a folder, unreadable from its header, or of
    a shape the processor refuses after resizing (images.check_image_shape); else None. No image
    is decoded."""
    for j, image in enumerate(row.get("images") or []):
        path = image.get("path") if isinstance(image, dict) and not image.get("bytes") else image
        if isinstance(path, (str, os.PathLike)):
            if not os.path.exists(path):
                return "missing image", f"image {j}: no such file {path}"
            if os.path.isdir(path):
                return "missing image", f"image {j}: {path} is a folder, not an image file"
        try:
            w, h = image_size(image)
        except Exception as e:  # noqa: BLE001 - whatever the header reader says, the image is unreadable
            return "unreadable image", f"image {j} is unreadable ({type(e).__name__}: {str(e)[:200]})"
        try:
            check_image_shape(w, h, min_pixels, max_pixels)
        except ValueError as e:
            return "image shape", f"image {j} {e}"
    return None


def token_problem(processor, row: dict, door: Door) -> tuple[str, str] | None:
    """(reason, message) for a row whose tokens do not fit the run: an RL prompt above
    --max-prompt-length, or an SFT row the --max-length cut would spoil (batches.cut_problem);
    counted from the chat text and image headers, as the prompt builder counts them."""
    if door.kind == "rl":
        (prompt,) = batches.build_prompts(processor, [row], door.fmt, door.min_pixels, door.max_pixels, decode=False)
        if door.max_tokens and len(prompt.ids) > door.max_tokens:
            return "prompt too long", (
                f"the prompt is {len(prompt.ids)} tokens, above --max-prompt-length {door.max_tokens}"
            )
        return None
    if not door.max_tokens:
        return None
    n, last_image, first_label = batches.sft_layout(processor, row, door.min_pixels, door.max_pixels)
    problem = batches.cut_problem(n, last_image, first_label, door.max_tokens)
    return ("spoiled by --max-length", problem) if problem else None


def row_problem(processor, row: dict, door: Door, reserved: list[str]) -> tuple[str, str] | None:
    """The first (reason, message) of the door's checks that `row` (fields already checked) fails, or None."""
    try:
        return (
            text_problem(row, door.kind, reserved)
            or image_problem(row, door.min_pixels, door.max_pixels)
            or token_problem(processor, row, door)
        )
    except ValueError as e:  # the chat template or the image-pad count refused the row
        return "unbuildable prompt", str(e)


# ---------------------------------------------------------------------------------------------
# The door over a split: sharded, agreed once, cached, reported
# ---------------------------------------------------------------------------------------------


def _where(rows, k: int, spec: str) -> tuple[dict, str]:
    """(row k, undecoded where that is possible, and how an error names it)."""
    if isinstance(rows, data.Rows):
        row, where = rows.undecoded(k)
    else:
        row, where = rows[k], f"{spec} row {k}"
    return row, where + (f" (id={row['id']})" if isinstance(row, dict) and row.get("id") is not None else "")


def _cache_file(rows, door: Door, processor) -> Path | None:
    """Where the verdicts of this split under these settings are kept, or None (rows not from data files)."""
    if not isinstance(rows, data.Rows) or not all(s.fingerprint for s in rows.sources):
        return None
    import datasets

    tokenizer = processor.tokenizer
    key = json.dumps(
        [
            DOOR_VERSION,
            [s.fingerprint for s in rows.sources],
            hashlib.sha256(rows.keep.tobytes()).hexdigest(),
            asdict(door),
            tokenizer.name_or_path,
            len(tokenizer),
            hashlib.sha256(str(processor.chat_template).encode()).hexdigest(),
        ],
        default=str,
    )
    return Path(datasets.config.HF_DATASETS_CACHE) / "mmr1_door" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def check_split(rows, door: Door, processor, d: dist.Dist, spec: str) -> list[tuple[int, str, str]]:
    """(position, reason, message) of every row of `rows` (a data.Rows or a list of checked rows)
    that fails the door, the same on every rank: each rank checks its contiguous share, one
    all-gather joins them. Read from the cache when every rank finds it there; rank 0 writes it."""
    cache = _cache_file(rows, door, processor)
    cached = cache is not None and cache.exists()
    if all(dist.all_gather_list([cached], d)):
        try:
            return [tuple(x) for x in json.loads(cache.read_text())]
        except (OSError, ValueError):
            pass  # unreadable cache: check again (every rank reads the same file, so all agree)
    reserved = reserved_tokens(processor.tokenizer)
    share = -(-len(rows) // d.world_size)  # contiguous shares, as dist.shard cuts them (no index list built)
    found = []
    for k in range(d.rank * share, min(len(rows), (d.rank + 1) * share)):
        row, where = _where(rows, k, spec)
        problem = row_problem(processor, row, door, reserved)
        if problem is not None:
            found.append((k, problem[0], f"{where}: {problem[1]}"))
    bad = sorted(dist.all_gather_list(found, d))
    if cache is not None and d.master:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(bad))
            tmp.replace(cache)
        except OSError:
            pass  # a cache that cannot be written only costs the check next time
    return bad


def prepare_rows(rows, door: Door, processor, d: dist.Dist, *, skip_bad_rows: bool, spec: str, field_bad=()):
    """The trainable rows of `rows` (a data.Rows, or a list of rows already field-checked): the door's
    checks over all of them (check_split), one report printed by rank 0 (field problems found at
    load, `field_bad`, included), then BadRowError naming the first bad row, or with skip_bad_rows
    the rows without the bad ones (a data.Rows stays a lazy data.Rows)."""
    bad = check_split(rows, door, processor, d, spec)
    report = Report(spec, len(rows) + len(field_bad), list(field_bad) + bad)
    what = " (removed: --skip-bad-rows)" if skip_bad_rows else " (--skip-bad-rows leaves them out)"
    if d.master:
        print(report.line() + (what if report.bad else ""), flush=True)
    if report.bad and not skip_bad_rows:
        raise BadRowError(report.bad[0][2])
    if not bad:
        return rows
    keep = np.ones(len(rows), dtype=bool)
    keep[[k for k, _, _ in bad]] = False
    kept = np.flatnonzero(keep)  # (kept rows,) int64 positions: 8 bytes a row
    if not len(kept):
        raise BadRowError(f"{spec}: no usable rows ({len(report.bad)} left out; first: {report.bad[0][2]})")
    return rows.subset(kept) if isinstance(rows, data.Rows) else [rows[int(k)] for k in kept]


def prepare_split(
    spec: str,
    door: Door,
    processor,
    d: dist.Dist,
    *,
    split: str = "train",
    skip_bad_rows: bool = False,
    limit: int = 0,
) -> data.Rows:
    """The door for a data set: data.load_rows (fields of every row, from the Arrow cache), then
    prepare_rows (text, image headers, tokens), one report for both. `limit`: the first `limit`
    rows with good fields (0 = all) are the ones the door looks at."""
    rows = data.load_rows(spec, door.kind, split, True, limit, door.min_pixels, door.max_pixels, report=False)
    rows.skip_bad_rows = skip_bad_rows  # the rule at use (decoding) is the run's, not the loader's
    field_bad = [(-1, "bad fields", message) for message in rows.left_out]
    return prepare_rows(rows, door, processor, d, skip_bad_rows=skip_bad_rows, spec=spec, field_bad=field_bad)
