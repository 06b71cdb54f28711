"""Opening rows: local parquet / jsonl / json files or folders and hub data sets, memory-mapped
(`Source`), and the door's kept rows (`Rows`, mmr1/prepare.py), whose images are decoded at use: the
one check left inside the loop (docs/data.md). Nothing here checks a row's fields."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import layouts
from .config import BadRowError, first_line
from .images import check_image_shape, load_image

# --- Sources: one file or hub split, memory-mapped ---


class Source:
    """The rows of one data file (or hub split) in memory-mapped Arrow: `table` holds the data set's own
    columns (parquet, hub) or, for JSON / jsonl, `n` / `json` / `problem` (layouts.build_json_cache:
    `problem` says why a line is no JSON object). `raw(i)` is row i as a dict with image paths made
    absolute (images not decoded), or that string; `where(i)` names it."""

    def __init__(self, name: str, table, json_rows: bool, folder: Path | None, unit: str, fingerprint: str = ""):
        self.name, self.table, self.json_rows, self.folder, self.unit = name, table, json_rows, folder, unit
        self.fingerprint = fingerprint  # names this content (the door's cache key, prepare.py); "" = unknown

    def __len__(self) -> int:
        return self.table.num_rows

    def where(self, i: int) -> str:
        n = self.table.column("n")[i].as_py() if self.json_rows else i
        return f"{self.name} {self.unit} {n}"

    def raw(self, i: int) -> dict | str:
        if self.json_rows:
            text = self.table.column("json")[i].as_py()
            row = json.loads(text) if text is not None else self.table.column("problem")[i].as_py()
        else:
            row = self.table.slice(i, 1).to_pylist()[0]  # image bytes stay raw: nothing decodes here
        return resolve_image_paths(row, self.folder) if isinstance(row, dict) and self.folder else row


def open_sources(spec: str, kind: str, split: str) -> list[Source]:
    """The sources of `spec` (file, folder or hub id; `name@split` picks the split), their Arrow
    caches built once (on the first rank under torchrun; the other ranks wait, then map them)."""
    name, _, at_split = spec.partition("@")
    split = at_split or split
    path = Path(name)
    if path.is_file():
        files = [path]
    elif path.exists() and not path.is_dir():  # a FIFO would block the reader forever, a device never ends
        raise BadRowError(f"{path}: not a regular file or folder (a FIFO, device or socket is never read)")
    elif path.is_dir():
        files = layouts.split_files(path, split, bool(at_split))
    else:
        return [_first_rank_first(lambda: _hub_source(name, split))]
    return [_first_rank_first(lambda f=f: _file_source(f, kind)) for f in files]


def _file_source(file: Path, kind: str) -> Source:
    """One local file as a Source (parquet through `datasets`' Arrow cache; JSON / jsonl through
    layouts.build_json_cache: one raw JSON text a row)."""
    import datasets

    folder = file.resolve().parent
    if file.suffix != ".parquet":
        cache_dir = Path(datasets.config.HF_DATASETS_CACHE) / "mmr1_rows"
        cache = layouts.json_cache(file, kind, cache_dir)
        unit = "row" if layouts.is_json_array(file) else "line"
        return Source(str(file), layouts.read_arrow(cache), True, folder, unit, cache.name)
    import pyarrow.parquet as pq

    try:
        count = pq.ParquetFile(file).metadata.num_rows
        ds = datasets.load_dataset("parquet", data_files=[str(file)], split="train") if count else None
    except Exception as e:  # noqa: BLE001 - whatever pyarrow or datasets says, the file is unreadable
        raise BadRowError(f"{file}: not a readable parquet file ({first_line(e)})") from e
    if ds is None:
        raise BadRowError(f"{file}: empty (no rows)")
    return Source(str(file), ds.data.table, False, folder, "row", ds._fingerprint)


def _hub_source(name: str, split: str) -> Source:
    """A hub data set's split as a Source (its rows in `datasets`' memory-mapped Arrow cache)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - not on the hub, no such split, offline: name it in one line
        raise BadRowError(
            f"{name}@{split}: not a local file or folder, and not loadable from the hub ({first_line(e)})"
        ) from e
    return Source(f"{name}@{split}", ds.data.table, False, None, "row", ds._fingerprint)


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


# --- Rows: the door's kept rows, indexed lazily; images decoded at use ---


def decode_images(row: dict, min_pixels: int, max_pixels: int, factor: int = 28) -> dict:
    """The row with its images decoded (PIL RGB); ValueError for an image that does not decode or that
    the processor would refuse after resizing into [min_pixels, max_pixels] pixels (to multiples of
    `factor` px, the processor's patch x merge)."""
    decoded = []
    for j, image in enumerate(row.get("images") or []):
        try:
            loaded = load_image(image)
            loaded.load()
        except Exception as e:  # noqa: BLE001 - any decoder failure means an unreadable image
            raise ValueError(f"image {j} is unreadable ({type(e).__name__}: {e})") from e
        try:
            check_image_shape(*loaded.size, min_pixels, max_pixels, factor)
        except ValueError as e:
            raise ValueError(f"image {j} {e}") from e
        decoded.append(loaded)
    return {**row, "images": decoded} if "images" in row else row


class Rows(Sequence):
    """The rows the door kept (prepare.prepare_split), read from disk when indexed. `table` is the door's
    memory-mapped Arrow table, one record per kept row: `source` / `index` (where the row lives), `row`
    (the normalised row as JSON; an image held as bytes in its source is null and read from there) and
    `tokens` (the prompt's token count). `rows[k]` is row k with its images decoded. A row whose images
    fail raises BadRowError naming its file and row, or with `skip_bad_rows` the next row takes its
    place (k+1, k+2, ... wrapping, the same on every rank)."""

    def __init__(self, table, sources: list, spec: str, skip_bad_rows: bool, pixels: tuple[int, int], factor: int):
        self.table, self.sources, self.spec, self.skip_bad_rows = table, sources, spec, skip_bad_rows
        self.min_pixels, self.max_pixels, self.factor = *pixels, factor
        self.image_skips: set[int] = set()  # positions k whose images failed to decode

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def skipped(self) -> int:
        """Rows passed over at use so far on this rank (their images failed to decode)."""
        return len(self.image_skips)

    @property
    def prompt_tokens(self):
        """(len(self),) int32 numpy array: each row's prompt tokens as the door counted them."""
        return self.table.column("tokens").to_numpy()

    def __getitem__(self, k: int | slice) -> Any:
        if isinstance(k, slice):
            return [self[j] for j in range(*k.indices(len(self)))]
        if not -len(self) <= int(k) < len(self):
            raise IndexError(f"row {k} of {len(self)}")
        k = int(k) % len(self)
        for step in range(len(self)):
            j = (k + step) % len(self)
            if j in self.image_skips:
                continue
            row = self.undecoded(j)
            try:
                return decode_images(row, self.min_pixels, self.max_pixels, self.factor)
            except ValueError as e:
                message = f"{self.where(j)} (id={row.get('id')}): {e}"
                if not self.skip_bad_rows:
                    raise BadRowError(message) from e
                self.image_skips.add(j)
                print(f"[data] skipped {message}; row {j} of {self.spec} is passed over (the next row takes its place)")
        raise BadRowError(f"{self.spec}: no usable rows (every row's images failed)")

    def undecoded(self, k: int) -> dict:
        """Row k as the door normalised it, images not decoded (paths, or bytes from the source)."""
        row = json.loads(self.table.column("row")[k].as_py())
        images = row.get("images")
        if images and any(image is None for image in images):  # held as bytes in the source
            source, i = self._located(k)
            stored = source.raw(i)["images"]
            row["images"] = [stored[j] if image is None else image for j, image in enumerate(images)]
        return row

    def where(self, k: int) -> str:
        """How an error names row k: its file (or hub split) and row or line."""
        source, i = self._located(k)
        return source.where(i)

    def _located(self, k: int):
        return self.sources[self.table.column("source")[k].as_py()], self.table.column("index")[k].as_py()


def resolve_image_paths(row: dict, folder: Path) -> dict:
    """A copy of the row with relative image paths (a non-empty str, or a {"path"} dict without bytes, in `image`,
    `decoded_image` or `images`) made relative to `folder`, the data file's folder."""

    def resolve(image):
        if isinstance(image, str) and image and not os.path.isabs(image):
            return str(folder / image)
        if isinstance(image, dict) and not image.get("bytes") and isinstance(image.get("path"), str):
            return image if os.path.isabs(image["path"]) else {**image, "path": str(folder / image["path"])}
        return image

    out = dict(row)
    for key in ("image", "decoded_image"):
        if key in out:
            out[key] = resolve(out[key])
    if isinstance(out.get("images"), (list, tuple)):
        out["images"] = [resolve(image) for image in out["images"]]
    return out
