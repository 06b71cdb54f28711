"""Loading rows: local parquet / jsonl / json files or folders and hub data sets.

Rows stay on disk: a stage gets a `Rows` sequence over memory-mapped Arrow (`datasets`' cache of a
parquet file or hub split; for JSON and jsonl, layouts.build_json_cache's cache of the raw rows),
and a row is read and its images decoded only when `rows[i]` is asked for. The field check
(fields, types, answers, `<image>` markers vs images) runs over every row when the data is opened,
without decoding an image; the rest of the door (text, image headers, token counts) is
mmr1/prepare.py. Decoding is the one check left at use (Rows.__getitem__), with the door's rule: a
bad row is named by file and row, or with `--skip-bad-rows` passed over and counted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import layouts
from .chat import prompt_messages, sft_messages
from .config import BadRowError, first_line
from .images import check_image_shape, load_image


def check_row(row: dict, kind: str, min_pixels: int = 3136, max_pixels: int = 1048576) -> dict:
    """Raises ValueError saying what is wrong with an 'rl' or 'sft' row; returns the row, normalised
    (check_fields) with its images decoded and checked (check_images)."""
    return check_images(check_fields(row, kind), min_pixels, max_pixels)


def check_fields(row: dict, kind: str) -> dict:
    """Raises ValueError saying what is wrong with the fields of an 'rl' or 'sft' row; returns the
    row normalised. Decodes no image: only the number of images is looked at.

    RL rows: `problem` a non-empty str, `answer` given (numbers and lists become text through
    reward.answer_text), `choices` absent or a list (its items through answer_text). SFT rows:
    `messages` (or ShareGPT `conversations`, layouts.as_messages) a list of {"role": str,
    "content": str} with an assistant turn. Both: `images` absent or a list, with as many `<image>`
    markers as images.
    """
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
        prompt_messages(row)
    else:
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


def check_images(row: dict, min_pixels: int, max_pixels: int) -> dict:
    """The row with its images decoded (PIL RGB); raises ValueError for an image that does not
    decode or that the processor would refuse after resizing into [min_pixels, max_pixels]."""
    decoded = []
    for j, image in enumerate(row.get("images") or []):
        try:
            loaded = load_image(image)
            loaded.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure means an unreadable image
            raise ValueError(f"image {j} is unreadable ({type(e).__name__}: {e})") from e
        try:
            check_image_shape(*loaded.size, min_pixels, max_pixels)
        except ValueError as e:
            raise ValueError(f"image {j} {e}") from e
        decoded.append(loaded)
    return {**row, "images": decoded} if "images" in row else row


# ---------------------------------------------------------------------------------------------
# Sources: one file or hub split, memory-mapped
# ---------------------------------------------------------------------------------------------


class _Source:
    """The rows of one data file (or hub split) in memory-mapped Arrow.

    `table` holds either the data set's own columns (parquet, hub) or, for JSON / jsonl, `n` /
    `json` / `problem` (layouts.build_json_cache). `raw(i)` is row i as a dict with image paths made
    absolute (images not decoded), or a string saying why it is no row; `where(i)` names it.
    """

    def __init__(self, name: str, table, json_rows: bool, folder: Path | None, unit: str, fingerprint: str = ""):
        self.name, self.table, self.json_rows, self.folder, self.unit = name, table, json_rows, folder, unit
        self.fingerprint = fingerprint  # names this content (cache keys of the door, prepare.py); "" = unknown

    def __len__(self) -> int:
        return self.table.num_rows

    def where(self, i: int) -> str:
        n = self.table.column("n")[i].as_py() if self.json_rows else i
        return f"{self.name} {self.unit} {n}"

    def raw(self, i: int) -> dict | str:
        import json

        if self.json_rows:
            text = self.table.column("json")[i].as_py()
            row = json.loads(text) if text is not None else self.table.column("problem")[i].as_py()
        else:
            row = self.table.slice(i, 1).to_pylist()[0]  # image bytes stay raw: nothing decodes here
        return _absolute_image_paths(row, self.folder) if isinstance(row, dict) and self.folder else row

    def problems(self, kind: str) -> list[str | None]:
        """Per row: None when its fields pass check_fields, else what is wrong (no image decoded)."""
        if self.json_rows:
            return self.table.column("problem").to_pylist()
        import pyarrow.compute as pc

        names = [c for c in self.table.column_names if c != "images"]
        out: list[str | None] = []
        for batch in self.table.to_batches(max_chunksize=10_000):
            rows = batch.select(names).to_pylist()
            if "images" in batch.schema.names:  # stand-ins of the right length: the check counts images only
                col = batch.column("images")
                if hasattr(col.type, "value_type"):  # a list column: its lengths, no image bytes copied
                    stand_ins = [None if c is None else [None] * c for c in pc.list_value_length(col).to_pylist()]
                else:  # not a list: the check names its type
                    stand_ins = col.to_pylist()
                for row, images in zip(rows, stand_ins):
                    row["images"] = images
            out += [_problem(row, kind) for row in rows]
        return out


def _problem(row: dict, kind: str) -> str | None:
    """What check_fields says is wrong with `row`, or None."""
    try:
        check_fields(row, kind)
    except (ValueError, TypeError, KeyError) as e:
        return str(e)
    return None


def _open_sources(spec: str, kind: str, split: str) -> list[_Source]:
    """The sources of `spec` (file, folder or hub id; `name@split` picks the split), their Arrow
    caches built once (on the first rank under torchrun; the other ranks wait, then map them)."""
    name, _, at_split = spec.partition("@")
    split = at_split or split
    path = Path(name)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = layouts.split_files(path, split, bool(at_split))
    else:
        return [_first_rank_first(lambda: _hub_source(name, split))]
    return [_first_rank_first(lambda f=f: _file_source(f, kind)) for f in files]


def _file_source(file: Path, kind: str) -> _Source:
    """One local file as a _Source (parquet through `datasets`' Arrow cache; JSON / jsonl through
    layouts.build_json_cache, whose `problem` column holds the structural check of every row)."""
    import datasets

    folder = file.resolve().parent
    if file.suffix != ".parquet":
        cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "mmr1_rows"
        cache = layouts.json_cache(
            file, kind, cache_dir, lambda row: _problem(_absolute_image_paths(row, folder), kind)
        )
        unit = "row" if layouts.is_json_array(file) else "line"
        return _Source(str(file), layouts.read_arrow(cache), True, folder, unit, cache.name)
    import pyarrow.parquet as pq

    try:
        count = pq.ParquetFile(file).metadata.num_rows
        ds = datasets.load_dataset("parquet", data_files=[str(file)], split="train") if count else None
    except Exception as e:  # noqa: BLE001 - whatever pyarrow or datasets says, the file is unreadable
        raise BadRowError(f"{file}: not a readable parquet file ({first_line(e)})") from e
    if ds is None:
        raise BadRowError(f"{file}: empty (no rows)")
    return _Source(str(file), ds.data.table, False, folder, "row", ds._fingerprint)


def _hub_source(name: str, split: str) -> _Source:
    """A hub data set's split as a _Source (its rows in `datasets`' memory-mapped Arrow cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - not on the hub, no such split, offline: name it in one line
        raise BadRowError(
            f"{name}@{split}: not a local file or folder, and not loadable from the hub ({first_line(e)})"
        ) from e
    return _Source(f"{name}@{split}", ds.data.table, False, None, "row", ds._fingerprint)


def _first_rank_first(build):
    """build() on rank 0 first, then on the other ranks (which then find its cache); one process: build()."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return build()
    if tdist.get_rank() != 0:
        tdist.barrier()
    result = build()
    if tdist.get_rank() == 0:
        tdist.barrier()
    return result


# ---------------------------------------------------------------------------------------------
# Rows: the lazy, checked sequence every stage indexes
# ---------------------------------------------------------------------------------------------


class Rows(Sequence):
    """The usable rows of a data set, read from disk when indexed: `rows[k]` is the k-th row kept by
    the field check (and by the door, prepare.py), normalised (check_fields), with its images
    decoded and checked (check_images). Resident memory is the index: 8 bytes a row.

    Decoding is the one check left at use, with the door's rule: a row whose images fail raises
    BadRowError naming its file and row, or with `skip_bad_rows` it is passed over as if the door
    had removed it: the next usable row takes its place (k+1, k+2, ... wrapping), the same on every
    rank, so batches keep their size. `skipped` counts the rows passed over so far on this rank;
    `left_out` holds the messages of the rows the field check left out.
    """

    def __init__(self, sources, keep: np.ndarray, kind: str, skip_bad_rows: bool, pixels: tuple[int, int], spec: str):
        self.sources, self.keep, self.kind, self.skip_bad_rows = sources, keep, kind, skip_bad_rows
        self.min_pixels, self.max_pixels, self.spec = *pixels, spec
        self.offsets = np.cumsum([0] + [len(s) for s in sources])
        self.left_out: list[str] = []
        self.image_skips: set[int] = set()  # positions k whose images failed to decode

    def __len__(self) -> int:
        return len(self.keep)

    @property
    def skipped(self) -> int:
        """Rows passed over at use so far on this rank (their images failed to decode)."""
        return len(self.image_skips)

    def subset(self, positions) -> Rows:
        """These rows at `positions` only (the door's removal), still lazy."""
        out = Rows(self.sources, self.keep[np.asarray(positions, dtype=np.int64)], self.kind, self.skip_bad_rows,
                   (self.min_pixels, self.max_pixels), self.spec)  # fmt: skip
        out.left_out = self.left_out
        return out

    def __getitem__(self, k: int | slice) -> Any:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        k = int(k) % len(self) if -len(self) <= int(k) < len(self) else _out_of_range(k, len(self))
        for step in range(len(self)):
            j = (k + step) % len(self)
            if j in self.image_skips:
                continue
            row, where = self.undecoded(j)
            try:
                return check_images(row, self.min_pixels, self.max_pixels)
            except ValueError as e:
                message = f"{where} (id={row.get('id')}): {e}"
                if not self.skip_bad_rows:
                    raise BadRowError(message) from e
                self.image_skips.add(j)
                print(f"[data] skipped {message}; row {j} of {self.spec} is passed over (the next row takes its place)")
        raise BadRowError(f"{self.spec}: no usable rows (every row's images failed)")

    def undecoded(self, k: int) -> tuple[dict, str]:
        """(row k normalised by check_fields with its images not decoded, where it is)."""
        g = int(self.keep[k])
        s = int(np.searchsorted(self.offsets, g, side="right")) - 1
        source, i = self.sources[s], g - int(self.offsets[s])
        return check_fields(source.raw(i), self.kind), source.where(i)


def _out_of_range(k: int, n: int) -> int:
    raise IndexError(f"row {k} of {n}")


def load_rows(
    spec: str,
    kind: str,
    split: str = "train",
    skip_bad_rows: bool = False,
    limit: int = 0,
    min_pixels: int = 3136,
    max_pixels: int = 1048576,
    report: bool = True,
) -> Rows:
    """The rows of a data set as a lazy `Rows` sequence; `kind` is 'rl' or 'sft'.

    `spec`: a local .parquet/.jsonl/.json file, a local folder (layouts.split_files picks the
    split's files), or a hub id; `name@split` picks the split. Relative image paths in a local file
    are relative to that file's folder. Every row's fields are checked now (check_fields, no image
    decoded); a bad row (or a jsonl line that is not a JSON object) raises BadRowError naming the
    file and the row (parquet / JSON array, 0-based) or line (jsonl, 1-based), or is skipped and
    counted when skip_bad_rows is set; an empty or unreadable file is an error. Images are checked
    when a row is first used (Rows). `limit`: the first `limit` usable rows (0 = all).
    `min_pixels` / `max_pixels`: the image range of the run, for the processor's shape rules.
    report=False: no line printed for skipped rows (the door, prepare.py, reports them with its own).
    """
    sources = _open_sources(spec, kind, split)
    keep, bad, seen, offset = [], [], 0, 0
    for source in sources:
        for i, problem in enumerate(source.problems(kind)):
            if limit and len(keep) >= limit:
                break
            seen += 1
            if problem is None:
                keep.append(offset + i)
                continue
            raw = source.raw(i)
            message = (
                f"{source.where(i)}" + (f" (id={raw.get('id')})" if isinstance(raw, dict) else "") + f": {problem}"
            )
            if not skip_bad_rows:
                raise BadRowError(message)
            bad.append(message)
        offset += len(source)
    if bad and report:
        print(f"[data] skipped {len(bad)} bad rows of {seen} in {spec}; first: {bad[0]}")
    if not keep:
        raise BadRowError(f"{spec}: no usable rows" + (f" ({len(bad)} left out; first: {bad[0]})" if bad else ""))
    rows = Rows(sources, np.asarray(keep, dtype=np.int64), kind, skip_bad_rows, (min_pixels, max_pixels), spec)
    rows.left_out = bad
    return rows


def _absolute_image_paths(row: dict, folder: Path) -> dict:
    """The row with relative image paths (str, or {"path"} without bytes) made relative to `folder`."""
    images = row.get("images")
    if not isinstance(images, (list, tuple)):
        return row
    out = []
    for image in images:
        if isinstance(image, str) and not os.path.isabs(image):
            image = str(folder / image)
        elif isinstance(image, dict) and not image.get("bytes") and isinstance(image.get("path"), str):
            image = {**image, "path": image["path"] if os.path.isabs(image["path"]) else str(folder / image["path"])}
        out.append(image)
    return {**row, "images": out}
