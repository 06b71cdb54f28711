"""Loading and checking rows: local parquet / jsonl / json files or folders and hub data sets, each
row checked once (the bad-input rules live here), bad rows named by file and row or skipped and counted."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .chat import prompt_messages, sft_messages
from .config import BadRowError, MissingDataError, first_line
from .images import check_image_shape, load_image


def check_row(row: dict, kind: str, min_pixels: int = 3136, max_pixels: int = 1048576) -> dict:
    """Raises ValueError saying what is wrong with an 'rl' or 'sft' row; returns the row, normalised.

    RL rows: `problem` a non-empty str, `answer` given (numbers and lists become text through
    reward.answer_text), `choices` absent or a list (its items through answer_text). SFT rows:
    `messages` a list of {"role": str, "content": str} with an assistant turn. Both: `images` a
    list whose every image decodes and passes the processor's shape rules after resizing to
    [min_pixels, max_pixels] (check_image_shape), and as many `<image>` markers as images.
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
        messages = row.get("messages")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("'messages' is missing or not a list")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {j} is not a {{'role', 'content'}} object")
            if not isinstance(m.get("content"), str):
                content = "null" if m.get("content") is None else f"a {type(m['content']).__name__}"
                raise ValueError(f"message {j} ({m['role']}) has content {content}, not a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("'messages' has no assistant turn")
        sft_messages(row)
    for j, image in enumerate(images or []):
        try:
            loaded = load_image(image)
            loaded.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure means an unreadable image
            raise ValueError(f"image {j} is unreadable ({type(e).__name__}: {e})") from e
        try:
            check_image_shape(*loaded.size, min_pixels, max_pixels)
        except ValueError as e:
            raise ValueError(f"image {j} {e}") from e
    return row


def load_rows(
    spec: str,
    kind: str,
    split: str = "train",
    skip_bad_rows: bool = False,
    limit: int = 0,
    min_pixels: int = 3136,
    max_pixels: int = 1048576,
) -> list[dict]:
    """Rows of a data set, checked and normalised by check_row; `kind` is 'rl' or 'sft'.

    `spec`: a local .parquet/.jsonl/.json file, a local folder (its `<split>.*` file, or all data
    files in it), or a hub id; `name@split` picks the split. Relative image paths in a local file
    are relative to that file's folder. A bad row (or a jsonl line that is not a JSON object)
    raises BadRowError naming the file and the row (parquet, 0-based) or line (jsonl, 1-based), or
    is skipped and counted when skip_bad_rows is set; an empty or unreadable file is an error.
    `min_pixels` / `max_pixels`: the image range of the run, for the processor's shape rules.
    """
    name, _, at_split = spec.partition("@")
    split = at_split or split
    path = Path(name)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        candidates = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".jsonl", ".json"))
        files = [p for p in candidates if p.stem == split] or ([] if at_split else candidates)
        if not files:
            raise MissingDataError(f"{path} has no {split}.parquet/.jsonl (found {[p.name for p in candidates]})")
    else:
        files = []
    rows, bad, seen = [], [], 0
    for where, row in _raw_rows(files, name, split):
        if limit and len(rows) >= limit:
            break
        seen += 1
        try:
            if isinstance(row, str):  # a line that is not a row: its problem
                raise ValueError(row)
            rows.append(check_row(row, kind, min_pixels, max_pixels))
        except (ValueError, TypeError, KeyError) as e:
            message = f"{where}" + (f" (id={row.get('id')})" if isinstance(row, dict) else "") + f": {e}"
            if not skip_bad_rows:
                raise BadRowError(message) from e
            bad.append(message)
    if bad:
        print(f"[data] skipped {len(bad)} bad rows of {seen} in {spec}; first: {bad[0]}")
    if not rows:
        raise BadRowError(f"{spec}: no usable rows")
    return rows


def _raw_rows(files: list[Path], name: str, split: str):
    """(where, row) for every row of local files (or of a hub data set when `files` is empty).

    `where` names the file and the parquet row (0-based) or jsonl line (1-based); `row` is a dict,
    or a string saying why that line is no row. Relative image paths are made absolute against
    the file's folder. Raises BadRowError for an unreadable or empty file.
    """
    import datasets

    if not files:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # noqa: BLE001 - not on the hub, no such split, offline: name it in one line
            raise BadRowError(
                f"{name}@{split}: not a local file or folder, and not loadable from the hub ({first_line(e)})"
            ) from e
        for i, row in enumerate(ds):
            yield f"{name}@{split} row {i}", row
        return
    for file in files:
        count = 0
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                count = pq.ParquetFile(file).metadata.num_rows
                ds = datasets.load_dataset("parquet", data_files=[str(file)], split="train") if count else []
            except Exception as e:  # noqa: BLE001 - whatever pyarrow or datasets says, the file is unreadable
                raise BadRowError(f"{file}: not a readable parquet file ({first_line(e)})") from e
            for i, row in enumerate(ds):
                yield f"{file} row {i}", _absolute_image_paths(row, file.resolve().parent)
        else:
            for where, row in _json_rows(file):
                count += 1
                yield where, _absolute_image_paths(row, file.resolve().parent) if isinstance(row, dict) else row
        if not count:
            raise BadRowError(f"{file}: empty (no rows)")


def _json_rows(file: Path):
    """(where, row or problem) per row of a JSON array file, or per non-blank line of a jsonl file."""
    data = file.read_bytes()
    if file.suffix == ".json" and data.lstrip().startswith(b"["):
        try:
            items = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRowError(f"{file}: not valid JSON ({first_line(e)})") from e
        for i, item in enumerate(items):
            yield f"{file} row {i}", item if isinstance(item, dict) else f"a JSON {type(item).__name__}, not an object"
        return
    import reward  # the one jsonl reader (reward.py's CLI reads predictions with it too)

    for _, where, row in reward.jsonl_objects(file):
        yield where, row


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
