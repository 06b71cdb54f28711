"""Where rows come from and how they are laid out: which files of a folder hold a split, the
ShareGPT / LLaMA-Factory layout of MMR1-SFT (`conversations` of `from` / `value`) read as the
project's `messages`, and a JSON array or jsonl file streamed once into a memory-mapped Arrow
cache (one raw JSON text per row) so that no stage keeps a data set's rows in memory."""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from .config import BadRowError, InputError, MissingDataError, decode_json

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
SPLIT_ALIASES = {"val": ("val", "validation"), "validation": ("validation", "val"), "dev": ("dev", "validation")}
KNOWN_SPLITS = {"train", "val", "validation", "test", "dev", "testmini", "eval"}
SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}$")  # hub shard names: train-00000-of-00004.parquet


def file_split(path: Path) -> tuple[str, bool]:
    """(split the file is named for, whether it is a hub shard): `train.parquet` -> ("train", False),
    `validation-00000-of-00001.parquet` -> ("validation", True), `rows.jsonl` -> ("rows", False)."""
    m = SHARD.match(path.stem)
    return (m["split"], True) if m else (path.stem, False)


def split_files(folder: Path, split: str, asked: bool) -> list[Path]:
    """The data files of `folder` that hold `split` (`asked`: named with name@split): those named for it
    (`train.parquet`, or its hub shards; `val` also finds `validation`), never those named for another
    known split; with none, all unnamed data files, unless the split was asked for by name. Two forms for
    one split (train.parquet + train.jsonl, or + train-00000-of-00001.parquet) are refused."""
    candidates = sorted(p for p in folder.iterdir() if p.suffix in DATA_SUFFIXES and p.is_file())
    names = SPLIT_ALIASES.get(split, (split,))
    for name in names:
        files = [p for p in candidates if file_split(p)[0] == name]
        if files:
            forms = {(p.suffix, file_split(p)[1]) for p in files}
            if len(forms) > 1 or (len(files) > 1 and not file_split(files[0])[1]):
                raise MissingDataError(
                    f"{folder} has {len(files)} files for split {split!r} ({', '.join(p.name for p in files)}); "
                    "keep one (or one set of shards) and move the others away"
                )
            return files
    unnamed = [p for p in candidates if file_split(p)[0] not in KNOWN_SPLITS]
    if asked or not unnamed:
        raise MissingDataError(f"{folder} has no {split}.parquet/.jsonl (found {[p.name for p in candidates]})")
    return unnamed


# --- ShareGPT (MMR1-SFT as published) -> messages ---

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def as_messages(row: dict) -> dict:
    """An SFT row in the project's layout: a ShareGPT row (`conversations` of {"from", "value"},
    roles human/user, gpt/assistant, system; an optional top-level `system` text) becomes `messages`
    of {"role", "content"}; a row that already has `messages` (or neither) is returned as it is.
    Raises ValueError for a turn that is not an object or has an unknown `from`."""
    turns = row.get("conversations")
    if "messages" in row or not isinstance(turns, (list, tuple)):
        return row
    messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"conversation turn {j} is not a {{'from', 'value'}} object")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"conversation turn {j} is from {turn.get('from')!r}; expected human, gpt or system")
        messages.append({"role": role, "content": turn.get("value")})
    return {k: v for k, v in row.items() if k not in ("conversations", "system")} | {"messages": messages}


# --- JSON array / jsonl -> memory-mapped Arrow, once ---

CACHE_VERSION = 3  # bump when what the cache holds, or how it is keyed, changes
FINGERPRINT_BYTES = 1 << 20  # the head and the tail of the file that are hashed into its cache key


def file_fingerprint(file: Path) -> str:
    """A key that changes when the file does, without reading all of it: size, mtime, inode and
    ctime (a `cp -p` / `rsync -a` / `tar -x` copy keeps the mtime, never the inode and ctime) and the
    sha256 of its first and last FINGERPRINT_BYTES (an in-place rewrite of the same size and mtime)."""
    st = file.stat()
    digest = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}".encode())
    with open(file, "rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if st.st_size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, st.st_size - FINGERPRINT_BYTES))
            digest.update(f.read())
    return digest.hexdigest()


def json_cache(file: Path, kind: str, cache_dir: Path) -> Path:
    """The Arrow cache of `file`'s rows of `kind` in `cache_dir` (built by build_json_cache when missing),
    named by the file's absolute path and fingerprint, so an edited or replaced file gets a new cache. An
    unwritable cache folder is one InputError naming it and the variable that moves it."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        key = f"{CACHE_VERSION}|{file.resolve()}|{file_fingerprint(file)}|{kind}"
        cache = cache_dir / f"{file.stem}-{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.arrow"
        if not cache.exists():
            build_json_cache(file, cache)
    except OSError as e:
        if Path(e.filename or "").resolve() == file.resolve():
            raise MissingDataError(f"{file}: cannot be read ({e.strerror})") from e
        raise InputError(
            f"cannot write the row cache in {cache_dir} ({e.strerror}): set HF_DATASETS_CACHE to a writable folder"
        ) from e
    return cache


def build_json_cache(file: Path, out: Path, batch_rows: int = 50_000) -> None:
    """Streams `file` (a JSON array, or jsonl) into an Arrow file at `out`, one batch of rows in memory: per
    row or non-blank line `n` (row from 0 / line from 1), `json` (its raw text; null if no object) and
    `problem` (why it is no object, else null; fields are the door's to check, mmr1/prepare.py). BadRowError
    for a JSON array that does not parse and for a file without rows; written atomically."""
    import pyarrow as pa

    schema = pa.schema([("n", pa.int64()), ("json", pa.large_string()), ("problem", pa.string())])
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    count, records = 0, _json_records(file)
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            while batch := list(itertools.islice(records, batch_rows)):
                problems = [row if isinstance(row, str) else None for _, _, row in batch]
                texts = [text if problem is None else None for (_, text, _), problem in zip(batch, problems)]
                writer.write_batch(pa.record_batch([[n for n, _, _ in batch], texts, problems], schema=schema))
                count += len(batch)
        if not count:
            raise BadRowError(f"{file}: empty (no rows)")
        tmp.replace(out)  # atomic: a reader sees the whole cache or none
    finally:
        tmp.unlink(missing_ok=True)


def read_arrow(path: Path):
    """The pyarrow Table of an Arrow file, memory-mapped (pages are read when a row is)."""
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def is_json_array(file: Path) -> bool:
    """Whether a .json file holds one JSON array (else it is read as jsonl, one object a line)."""
    with open(file, "rb") as f:
        return file.suffix == ".json" and f.read(4096).lstrip().startswith(b"[")


def _json_records(file: Path) -> Iterator[tuple[int, str, dict | str]]:
    """(row from 0 or line from 1, raw JSON text, the object or why it is no row) per row of a JSON
    array file, or per non-blank line of a jsonl file (reward.jsonl_objects, the one jsonl reader)."""
    if is_json_array(file):
        for i, (text, item) in enumerate(_json_array(file)):
            yield i, text, item if isinstance(item, dict) else f"a JSON {type(item).__name__}, not an object"
        return
    import reward

    for n, _, row in reward.jsonl_objects(file):
        yield n, json.dumps(row) if isinstance(row, dict) else "", row


def _json_array(file: Path, chunk: int = 1 << 24) -> Iterator[tuple[str, object]]:
    """(raw text, parsed value) of each element of a JSON array file, read `chunk` bytes at a time
    (a 1.6M-row sft.json never sits in memory whole). Raises BadRowError where it does not parse."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, pos, eof, count = "", 0, False, 0
    with open(file, "rb") as f:

        def more() -> None:
            nonlocal buf, pos, eof
            data = f.read(chunk)
            eof = not data
            buf, pos = buf[pos:] + utf8.decode(data, final=eof), 0

        def next_char() -> str:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof:
                    return buf[pos] if pos < len(buf) else ""
                more()

        try:
            if next_char() != "[":
                raise ValueError("expected '[' at the start")
            pos += 1
            if next_char() == "]":
                return
            while True:
                next_char()
                try:
                    value, end = decode_json(decoder, buf, pos)
                    while end >= len(buf) and not eof:  # the value may go on in the next chunk
                        more()
                        value, end = decode_json(decoder, buf, 0)
                except json.JSONDecodeError:
                    if eof:
                        raise
                    more()
                    continue
                yield buf[pos:end], value
                pos, count = end, count + 1
                sep = next_char()
                pos += 1
                if sep == "]":
                    return
                if sep != ",":
                    raise ValueError(f"expected ',' or ']' after element, found {sep!r}")
        except (ValueError, UnicodeDecodeError) as e:  # a position in the buffer means nothing: name the element
            what = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise BadRowError(f"{file}: not valid JSON at element {count} ({what.splitlines()[0]})") from e
