"""Reading a checkpoint's files without running anything from them or reading outside the checkpoint,
and the damage scan that --resume and pruning use to pass over an incomplete folder (docs/checkpoints.md)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from .config import CheckpointError, first_line, loads_json

TRAINER_DIR = "trainer"  # the sharded trainer state inside a checkpoint folder (torch.distributed.checkpoint)

# --- reading trainer/ ---

# What a trainer/.metadata written by save_checkpoint holds (torch 2.x); nothing else may be named by its pickle.
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # a layout by its name
    "torch": {"Size"},  # and dtypes (torch.float32, ...), checked by type below
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},  # StorageMeta.checkpoint_id
    "collections": {"OrderedDict"},
}  # fmt: skip


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only METADATA_GLOBALS (and torch dtypes); any other global a pickle names
    (os.system, builtins.eval, a class with a side effect) is refused with pickle.UnpicklingError."""

    def find_class(self, module: str, name: str) -> Any:
        if name in METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused {module}.{name} (not a checkpoint metadata type)")


def read_metadata(path: str | Path):
    """torch.distributed.checkpoint Metadata of the folder `path` (its .metadata), read by MetadataUnpickler
    (torch's FileSystemReader would run any pickle); pickle.UnpicklingError for a foreign global,
    ValueError for a shard file named outside `path` (relative, no `..`, no link out)."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    path = Path(path)
    with open(path / ".metadata", "rb") as f:
        metadata = MetadataUnpickler(f).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not a checkpoint Metadata")
    root = path.resolve()  # the readers open path / relative_path: never another run's (or any other) file
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"a shard path {name!r} that leaves {path}")
        if not (root / name).resolve().is_relative_to(root):
            raise ValueError(f"a shard path {name!r} that links out of {path}")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def safe_reader(path: str | Path):
    """A FileSystemReader of `path` whose metadata comes from read_metadata (the shards' tensors are
    read by torch.load(weights_only=True), as torch does)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_metadata(self.path)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(str(path))


def safe_planner(**kwargs: Any):
    """A DefaultLoadPlanner whose non-tensor entries (the optimizer's param_groups: floats, tuples, bools)
    load with torch.load(weights_only=True); torch's default unpickles them freely."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:  # DefaultLoadPlanner's, weights_only=True
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return WeightsOnlyLoadPlanner(**kwargs)


# --- the trainer state and the damage scan ---


def load_trainer_state(folder: str | Path, mmap: bool = False) -> dict:
    """folder/trainer_state.pt, unpickling plain types and tensors only (weights_only=True); CheckpointError
    naming the file when it is missing, damaged or lacks an entry. mmap=True maps the tensors (a cheap check)."""
    path = Path(folder) / "trainer_state.pt"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        state = torch.load(path, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - empty, truncated, or holding objects weights_only refuses
        raise CheckpointError(f"{path} is unreadable ({first_line(e)})") from e
    keys = ("step", "rng", "config")
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else keys
    if missing:
        raise CheckpointError(f"{path} lacks {list(missing)}")
    return state


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why `folder` cannot be resumed from (the damaged or missing file, named), or None if it is complete:
    config.json, every safetensors file (header and size), trainer_state.pt and trainer/ (sharded_problem)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return f"{folder / 'config.json'} is missing"
    index = folder / "model.safetensors.index.json"
    try:
        names = sorted(set(loads_json(index.read_text())["weight_map"].values())) if index.exists() else None
    except (ValueError, KeyError, AttributeError, TypeError, OSError) as e:
        return f"{index} is unreadable ({first_line(e)})"
    from safetensors import safe_open

    for name in names or ["model.safetensors"]:
        try:
            with safe_open(str(folder / name), "pt") as f:
                f.keys()
        except Exception as e:  # noqa: BLE001 - missing, truncated or corrupt header
            return f"{folder / name} is unreadable ({first_line(e)})"
    try:
        load_trainer_state(folder, mmap=True)
    except CheckpointError as e:
        return str(e)
    return sharded_problem(folder / TRAINER_DIR)


def sharded_problem(path: Path) -> str | None:
    """Why the torch.distributed.checkpoint folder `path` is damaged, or None: its .metadata must load
    with read_metadata, and every shard file it lists must exist and reach the last byte recorded for it."""
    if not (path / ".metadata").is_file():
        return f"{path / '.metadata'} is missing"
    try:
        metadata = read_metadata(path)
        ends: dict[str, int] = {}  # shard file -> bytes it must hold
        for info in metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # noqa: BLE001 - empty, truncated or foreign metadata
        return f"{path / '.metadata'} is unreadable ({first_line(e)})"
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else -1
        if size < end:
            return f"{path / name} is {'missing' if size < 0 else f'truncated ({size} of {end} bytes)'}"
    return None
