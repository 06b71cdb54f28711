"""The door: every check of a split's rows, once, before step 1; its product is the loop's input.

    rows = prepare.prepare_split(spec, door, processor, d, split="train", skip_bad_rows=..., limit=...)

A row is kept when its fields are right (normalise), its text is valid, its images' headers give a
shape the processor takes, and its tokens fit. The kept rows, normalised, are written once per data
content and settings as a memory-mapped Arrow table under HF_DATASETS_CACHE/mmr1_door/<key>/ (data.Rows
reads it); one report, then a one-line error naming the first bad row, or with --skip-bad-rows the rows
left out. Cache key, reuse and sharding: docs/data.md, "Checked at the door, trusted inside".
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import stat
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import batches, data, dist, families, layouts
from .chat import PromptFormat, prompt_messages, sft_messages
from .config import BadRowError, InputError
from .images import check_image_shape, image_size

DOOR_VERSION = 2  # bump when a check or the table changes: tables of the old door are then not used


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


# --- The checks of one row ---


def normalise(row: dict, kind: str) -> dict:
    """The fields of an 'rl' or 'sft' row, normalised (answers and choices as text, reward.answer_text;
    ShareGPT turns as `messages`, layouts.as_messages); ValueError saying what is wrong. Decodes no
    image: only the number of `<image>` markers is compared with it. The layouts: docs/data.md."""
    from reward import answer_text  # the gold-answer rule lives beside the equivalence rules

    images = row.get("images")
    if images is not None and not isinstance(images, (list, tuple)):
        raise ValueError(f"'images' is a {type(images).__name__}; give a list of images")
    row = dict(row)
    if kind == "rl":
        for key in ("problem", "answer"):
            if row.get(key) is None or (isinstance(row[key], str) and not row[key].strip()):
                raise ValueError(f"missing {key!r}")
        if not isinstance(row["problem"], str):
            raise ValueError(f"'problem' is a {type(row['problem']).__name__}, not a string")
        row["answer"] = answer_text(row["answer"])
        choices = row.get("choices")
        if choices is not None and not isinstance(choices, (list, tuple)):
            raise ValueError(f"'choices' is a {type(choices).__name__}; give a list of option texts")
        if choices:
            row["choices"] = [answer_text(c) for c in choices]
        prompt_messages(row)  # the <image> markers against the images
        return row
    row = layouts.as_messages(row)
    messages = row.get("messages")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("'messages' (or 'conversations') is missing or not a list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"message {j} is not a {{'role', 'content'}} object")
        if not isinstance(m.get("content"), str):
            content = "null" if m.get("content") is None else f"a {type(m['content']).__name__}"
            raise ValueError(f"message {j} ({m['role']}) has content {content}, not a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("'messages' has no assistant turn")
    sft_messages(row)
    return row


def reserved_tokens(tokenizer) -> list[str]:
    """The model's own chat and vision tokens (`<|im_start|>`, `<|image_pad|>`, ...): text that
    holds one would break the chat structure or the image-token count (Qwen's processor raises
    StopIteration on a typed `<|image_pad|>`). Images are written as `<image>` markers instead."""
    return sorted(t for t in tokenizer.all_special_tokens if t.startswith("<|") and t.endswith("|>"))


def text_problem(row: dict, kind: str, reserved: list[str]) -> tuple[str, str] | None:
    """(reason, message) for a text the tokenizer reads that is no valid Unicode (a lone surrogate such
    as "\\ud83d", which JSON's escapes can make and no tokenizer takes) or that holds a reserved token; else None."""
    if kind == "rl":
        texts = [("'problem'", row["problem"])]
    else:
        texts = [(f"message {j} ({m['role']})", m["content"]) for j, m in enumerate(row["messages"])]
    for name, text in texts:
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


def image_path(image) -> str | None:
    """The file an image is read from (a path, or a {"path"} without bytes), or None (bytes, PIL)."""
    path = image.get("path") if isinstance(image, dict) and not image.get("bytes") else image
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) else None


def image_problem(row: dict, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[str, str] | None:
    """(reason, message) for an image that is missing, a folder or other non-regular file (a FIFO
    would block forever), unreadable from its header, or of a shape the processor refuses after
    resizing to multiples of `factor` (images.check_image_shape); else None. No image is decoded."""
    for j, image in enumerate(row.get("images") or []):
        path = image_path(image)
        if path is not None:
            if not os.path.exists(path):
                return "missing image", f"image {j}: no such file {path}"
            if os.path.isdir(path):
                return "missing image", f"image {j}: {path} is a folder, not an image file"
            if not stat.S_ISREG(os.stat(path).st_mode):
                return "missing image", f"image {j}: {path} is not a regular file (a FIFO, device or socket)"
        try:
            w, h = image_size(image)
        except Exception as e:  # noqa: BLE001 - whatever the header reader says, the image is unreadable
            return "unreadable image", f"image {j} is unreadable ({type(e).__name__}: {str(e)[:200]})"
        try:
            check_image_shape(w, h, min_pixels, max_pixels, factor)
        except ValueError as e:
            return "image shape", f"image {j} {e}"
    return None


def prompt_tokens(processor, row: dict, door: Door) -> tuple[int, tuple[str, str] | None]:
    """(tokens of the row's prompt, problem or None): an RL prompt above --max-prompt-length, or an
    SFT row the --max-length cut would spoil (batches.cut_problem); counted from the chat text and
    image headers, as the prompt builder counts them. Without a processor: (0, None)."""
    if processor is None:
        return 0, None
    if door.kind == "rl":
        n = len(batches.build_prompt(processor, row, door.fmt, door.min_pixels, door.max_pixels, decode=False).ids)
        if door.max_tokens and n > door.max_tokens:
            return n, ("prompt too long", f"the prompt is {n} tokens, above --max-prompt-length {door.max_tokens}")
        return n, None
    n, last_image, first_label = batches.sft_layout(processor, row, door.min_pixels, door.max_pixels)
    problem = batches.cut_problem(n, last_image, first_label, door.max_tokens) if door.max_tokens else None
    return n, ("spoiled by --max-length", problem) if problem else None


def judge(processor, raw: dict | str, door: Door, reserved: list[str]):
    """(normalised row, prompt tokens, None) for a row that passes every check of the door, else
    (None, 0, (reason, message)). `raw` is a row as its source holds it, or a string saying why a
    line is no row."""
    if isinstance(raw, str):
        return None, 0, ("bad fields", raw)
    try:
        row = normalise(raw, door.kind)
    except (ValueError, TypeError, KeyError) as e:
        return None, 0, ("bad fields", str(e))
    try:
        pixels = (door.min_pixels, door.max_pixels)
        problem = text_problem(row, door.kind, reserved) or image_problem(row, *pixels, _image_factor(processor))
        tokens, problem = (0, problem) if problem else prompt_tokens(processor, row, door)
    except ValueError as e:  # the chat template or the image-pad count refused the row
        return None, 0, ("unbuildable prompt", str(e))
    return (None, 0, problem) if problem else (row, tokens, None)


def _image_factor(processor) -> int:
    """Pixels per merged image token of the processor's resize (families.image_factor); 28 without one."""
    return families.image_factor(processor) if processor is not None else 28


# --- The door over a split: sharded, agreed once, written as the loop's table, reported ---


def file_stats(row) -> list:
    """[path, size, mtime_ns] of each image file of a row: what the door's verdict on it depends on."""
    out = []
    for image in (row.get("images") or []) if isinstance(row, dict) else []:
        path = image_path(image)
        if path is not None:
            try:
                st = os.stat(path)
                out.append([path, st.st_size, st.st_mtime_ns])
            except OSError:
                out.append([path, -1, -1])
    return out


def _stored(row: dict) -> str:
    """A kept row as the table holds it: JSON, each image as its path (null: bytes, read from the source)."""
    images = [image_path(image) for image in row.get("images") or []]
    return json.dumps({**row, "images": images} if "images" in row else row, default=lambda _: None)


def _table_dir(sources, door: Door, processor, limit: int, d: dist.Dist) -> Path:
    """Where the door's table for these sources and settings lives (HF_DATASETS_CACHE/mmr1_door/<key>)."""
    import datasets

    tokenizer = getattr(processor, "tokenizer", None)
    fingerprints = [s.fingerprint for s in sources]
    unknown = dist.all_gather_list([os.getpid()], d)[0] if not all(fingerprints) else 0  # never reused
    template = hashlib.sha256(str(getattr(processor, "chat_template", None)).encode()).hexdigest()
    model = [getattr(tokenizer, "name_or_path", None), len(tokenizer) if tokenizer is not None else 0, template]
    # the image factor: image token counts depend on it
    settings = [DOOR_VERSION, fingerprints, unknown, limit, asdict(door), _image_factor(processor)]
    key = hashlib.sha256(json.dumps(settings + model, default=str).encode()).hexdigest()[:32]
    return Path(datasets.config.HF_DATASETS_CACHE) / "mmr1_door" / key


def _unchanged(folder: Path, d: dist.Dist) -> bool:
    """Whether a finished table exists on every rank and every image file the door read is as it
    was (size and mtime), each rank stat-ing its share of the table's rows."""
    report = folder / "report.json"
    if not all(dist.all_gather_list([report.exists()], d)):
        return False
    try:
        table = _read_table(folder)
        lo, hi = _bounds(table.num_rows, d)
        stats = [s for text in table.column("files").slice(lo, hi - lo).to_pylist() for s in json.loads(text)]
        if d.master:
            stats += json.loads(report.read_text())["files"]
        same = all(file_stats({"images": [p]}) == [[p, size, mtime]] for p, size, mtime in stats)
    except (OSError, ValueError, KeyError):
        same = False
    return all(dist.all_gather_list([same], d))


def _bounds(n: int, d: dist.Dist) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of n items."""
    share = -(-n // d.world_size)
    return min(n, d.rank * share), min(n, (d.rank + 1) * share)


def _read_table(folder: Path):
    import pyarrow as pa

    return pa.concat_tables([layouts.read_arrow(p) for p in sorted(folder.glob("part-*.arrow"))])


def _check_sources(sources, door: Door, processor, d: dist.Dist, folder: Path, n: int) -> list[tuple[int, str, str]]:
    """The door over the first n rows of `sources`, this rank its contiguous share: its kept rows
    written as one part of the table in `folder` (records: source, index, row JSON, prompt tokens,
    image files JSON); returns every rank's left-out rows (position, reason, message), agreed by one
    all-gather."""
    import pyarrow as pa
    from tqdm.auto import tqdm

    schema = pa.schema(
        [("source", pa.int32()), ("index", pa.int64()), ("row", pa.large_string()), ("tokens", pa.int32()),
         ("files", pa.large_string())]
    )  # fmt: skip
    part = pa.ipc.new_file(pa.OSFile(str(folder / f"part-{d.rank:05d}.arrow"), "wb"), schema)
    reserved = reserved_tokens(processor.tokenizer) if processor is not None else []
    offsets = [0, *itertools.accumulate(len(s) for s in sources)]
    lo, hi = _bounds(n, d)
    records, found, files, s = [], [], [], 0
    for k in tqdm(range(lo, hi), desc="[data] checking rows", disable=not d.master or hi - lo < 10_000):
        while k >= offsets[s + 1]:
            s += 1
        source, i = sources[s], k - offsets[s]
        raw = source.raw(i)
        row, tokens, problem = judge(processor, raw, door, reserved)
        if problem is None:
            records.append((s, i, _stored(row), tokens, json.dumps(file_stats(row))))
        else:
            named = f" (id={raw.get('id')})" if isinstance(raw, dict) and raw.get("id") is not None else ""
            found.append((k, problem[0], f"{source.where(i)}{named}: {problem[1]}"))
            files += file_stats(raw)
        if records and (len(records) == 10_000 or k == hi - 1):  # memory: one batch, not the rank's share
            part.write_batch(pa.record_batch([list(c) for c in zip(*records)], schema=schema))
            records = []
    part.close()
    gathered = dist.all_gather_list([(found, files)], d)  # also the barrier: every part is written
    bad = sorted(x for rank_found, _ in gathered for x in rank_found)
    if d.master:
        report = {"rows": n, "bad": bad, "files": [f for _, rank_files in gathered for f in rank_files]}
        (folder / "report.json").write_text(json.dumps(report))
    return bad


def prepare_split(
    spec: str, door: Door, processor, d: dist.Dist, *, split: str = "train", skip_bad_rows: bool = False, limit: int = 0
) -> data.Rows:
    """The door for a data set (a file, folder or hub id; `name@split` picks the split): the kept rows
    of its first `limit` rows (0 = all) as data.Rows over the door's table, built now or found from
    an earlier run with the same data, settings and image files; one report; BadRowError naming the
    first bad row unless skip_bad_rows. processor=None: no token counts and no reserved-token check
    (load_rows)."""
    sources = data.open_sources(spec, door.kind, split)
    total = sum(len(s) for s in sources)
    n = min(limit, total) if limit else total
    folder = _table_dir(sources, door, processor, limit, d)
    if _unchanged(folder, d):
        bad = [tuple(x) for x in json.loads((folder / "report.json").read_text())["bad"]]
    else:
        pid = dist.all_gather_list([os.getpid()], d)[0]
        building = folder.with_name(f"{folder.name}.building-{pid}")
        try:
            if d.master:
                shutil.rmtree(building, ignore_errors=True)
                building.mkdir(parents=True)
            dist.all_gather_list([0], d)  # the folder exists before any rank writes to it
            bad = _check_sources(sources, door, processor, d, building, n)
            if d.master:
                shutil.rmtree(folder, ignore_errors=True)
                building.replace(folder)
        except OSError as e:
            raise InputError(
                f"cannot write the door's table in {folder.parent} ({e.strerror}): "
                "set HF_DATASETS_CACHE to a writable folder"
            ) from e
        finally:
            if d.master:
                shutil.rmtree(building, ignore_errors=True)
        dist.all_gather_list([0], d)  # the table is in place before any rank reads it
    _apply_rule(spec, n, bad, skip_bad_rows, d)
    pixels = (door.min_pixels, door.max_pixels)
    return data.Rows(_read_table(folder), sources, spec, skip_bad_rows, pixels, _image_factor(processor))


def prepare_rows(rows: list[dict], door: Door, processor, d: dist.Dist, *, skip_bad_rows: bool, spec: str):
    """The door over rows already in memory (a benchmark's prompts): every check of judge, each
    rank its share, one all-gather, one report; the kept rows, normalised, in order."""
    reserved = reserved_tokens(processor.tokenizer) if processor is not None else []
    lo, hi = _bounds(len(rows), d)
    found = []
    for k in range(lo, hi):
        _, _, problem = judge(processor, rows[k], door, reserved)
        if problem is not None:
            named = f" (id={rows[k].get('id')})" if rows[k].get("id") is not None else ""
            found.append((k, problem[0], f"{spec} row {k}{named}: {problem[1]}"))
    bad = sorted(x for part in dist.all_gather_list([found], d) for x in part)
    _apply_rule(spec, len(rows), bad, skip_bad_rows, d)
    left_out = {k for k, _, _ in bad}
    return [normalise(r, door.kind) for k, r in enumerate(rows) if k not in left_out]


def _apply_rule(spec: str, rows: int, bad: list[tuple[int, str, str]], skip_bad_rows: bool, d: dist.Dist) -> None:
    """The door's one report and the one skip rule. Rank 0 prints `[data] SPEC: N rows, K left out (count
    reason, ...); first: MESSAGE; ...` (or all usable); then BadRowError naming the first bad row (`bad`:
    position, reason, message) unless skip_bad_rows (then they are simply not in the product), or none is left."""
    if d.master and not bad:
        print(f"[data] {spec}: {rows} rows, all usable", flush=True)
    elif d.master:
        reasons = ", ".join(f"{n} {reason}" for reason, n in Counter(reason for _, reason, _ in bad).most_common())
        first = "; ".join(message for _, _, message in bad[:3])
        what = "removed: --skip-bad-rows" if skip_bad_rows else "--skip-bad-rows leaves them out"
        print(f"[data] {spec}: {rows} rows, {len(bad)} left out ({reasons}); first: {first} ({what})", flush=True)
    if bad and not skip_bad_rows:
        raise BadRowError(bad[0][2])
    if len(bad) == rows:
        first = f"; first: {bad[0][2]}" if bad else ""
        raise BadRowError(f"{spec}: no usable rows ({len(bad)} left out{first})")


def load_rows(spec: str, kind: str, split: str = "train", skip_bad_rows: bool = False, limit: int = 0,
              min_pixels: int = 3136, max_pixels: int = 1048576) -> data.Rows:  # fmt: skip
    """A data set's rows through the door without a model (fields, text, image headers; no token
    counts), in one process: for tools, benchmarks and tests that read data as the stages do."""
    one = dist.Dist(0, 1, 0, torch.device("cpu"))
    door = Door(kind, min_pixels, max_pixels)
    return prepare_split(spec, door, None, one, split=split, skip_bad_rows=skip_bad_rows, limit=limit)
