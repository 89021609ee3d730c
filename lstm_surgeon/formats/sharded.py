"""Hugging Face sharded folders: `model.safetensors.index.json` (or `pytorch_model.bin.index.json`)
beside the shard files it names, read as one checkpoint.

The index is `{"metadata": {...}, "weight_map": {tensor name: shard file name}}`. Each shard is a
complete file of its own format (safetensors, or a torch.save state dict), so the folder is the
shards joined (`formats.join_checkpoints`), each tensor's bytes in its own shard: a layer whose
biases sit in another shard than its weights is found all the same, and an in-place edit patches
only the shards that hold its targets (all or nothing, `writing.patch_files`). The index must agree
with the shards exactly: a tensor listed but missing, a tensor not listed, one tensor in two shards
and a missing or truncated shard all happen in real releases; `check` names each one and every
other command refuses the folder, naming the first.

A folder without an index but with a single weights file is that file.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from lstm_surgeon.checkpoint import Checkpoint, Contents, OutputTensor, StorageRef
from lstm_surgeon.errors import CheckpointError, EditError

if TYPE_CHECKING:
    from lstm_surgeon.formats import CheckpointFormat
    from lstm_surgeon.writing import BytePatch, Progress

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
INDEX_SUFFIX = ".index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MAX_INDEX_BYTES = 100_000_000
CHECK_HINT = "run `lstm-surgeon check {path}` to list every problem"


@dataclass(frozen=True)
class JoinedFormat:
    """The format of a checkpoint joined from single-file parts of one format: each verb is the
    part format's, applied to the part that holds the bytes (the parts are the checkpoint's
    `format_state`, each with its storages in its own file 0)."""

    part_format: CheckpointFormat

    @property
    def name(self) -> str:
        return self.part_format.name

    @property
    def suffixes(self) -> tuple[str, ...]:
        return self.part_format.suffixes

    def sniff(self, head: bytes) -> bool:
        return False  # never claims a file: joined checkpoints are made, not found

    def read(self, path: Path, buffer: mmap.mmap | bytes) -> Checkpoint:
        raise CheckpointError(f"{path}: a joined checkpoint is opened from its parts")

    def checksum_patches(
        self, checkpoint: Checkpoint, storages: dict[StorageRef, bytes]
    ) -> list[BytePatch]:
        patches = []
        for index, part in enumerate(_parts(checkpoint)):
            own = {
                replace(storage, file=0): data
                for storage, data in storages.items()
                if storage.file == index
            }
            if own:
                patches += [
                    replace(patch, file=index) for patch in part.format.checksum_patches(part, own)
                ]
        return patches

    def checksum_problems(
        self, checkpoint: Checkpoint, progress: Progress | None
    ) -> tuple[int, list[str]]:
        records, problems = 0, []
        for part in _parts(checkpoint):
            count, found = part.format.checksum_problems(part, progress)
            records += count
            problems += [f"{part.path.name}: {problem}" for problem in found]
        return records, problems

    def write(
        self,
        out: BinaryIO,
        tensors: list[OutputTensor],
        source: Checkpoint,
        drop_keys: frozenset[str] = frozenset(),
    ) -> None:
        raise EditError(f"{source.path}: a checkpoint of several files is not written as one file")


def _parts(checkpoint: Checkpoint) -> Sequence[Checkpoint]:
    parts = checkpoint.format_state
    assert isinstance(parts, tuple), "not a joined checkpoint"
    return parts


# --- The index ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardIndex:
    """A parsed index file: which shard holds each tensor."""

    path: Path
    weight_map: dict[str, str]  # tensor name -> shard file name, in the index's order
    metadata: dict[str, str] | None
    repeated: tuple[str, ...] = ()  # tensor names the index lists more than once

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def shard_names(self) -> list[str]:
        """Each shard once, in the order the index first names it."""
        return list(dict.fromkeys(self.weight_map.values()))

    def shard_paths(self) -> list[Path]:
        return [self.folder / name for name in self.shard_names]


def find_index(path: Path) -> Path | None:
    """The index file `path` names: itself, or the one in the folder (None: the folder has none)."""
    if not path.is_dir():
        return path
    found = [path / name for name in INDEX_NAMES if (path / name).is_file()]
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: holds both {found[0].name} and {found[1].name}; give the index to read"
        )
    return found[0] if found else None


def read_index(path: Path) -> ShardIndex:
    """Parse and validate an index: a JSON object with a `weight_map` of names to shard files,
    each a plain file name in the index's folder (never a path outside it)."""
    try:
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise CheckpointError(f"{path}: an index of more than 100 MB is not a shard index")
        repeated: list[str] = []
        document = json.loads(path.read_bytes(), object_pairs_hook=_noting_repeats(repeated))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a valid JSON shard index") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(shard, str) for name, shard in weight_map.items()
    ):
        raise CheckpointError(f"{path}: a shard index needs a weight_map of names to file names")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(
                f"{path}: shard {shard!r} is not a file name in the index's folder"
            )
    return ShardIndex(path, weight_map, _metadata(document.get("metadata")), tuple(repeated))


def _noting_repeats(repeated: list[str]) -> Any:
    """A JSON object hook that keeps the last of repeated keys, as JSON readers do, and notes
    them: a weight_map that lists a tensor twice is one of the mismatches `check` reports."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result and isinstance(value, str):
                repeated.append(key)
            result[key] = value
        return result

    return hook


def _metadata(metadata: Any) -> dict[str, str] | None:
    """The index's metadata as strings (`total_size` is a number there)."""
    if not isinstance(metadata, dict):
        return None
    return {
        str(key): value if isinstance(value, str) else json.dumps(value)
        for key, value in metadata.items()
    }


# --- The folder ----------------------------------------------------------------------------------


class ShardedFolder:
    name = "sharded"

    def claims(self, path: Path) -> bool:
        return path.is_dir() or path.name.endswith(INDEX_SUFFIX)

    def data_files(self, path: Path) -> list[Path]:
        index = find_index(path)
        if index is None:
            return [single_weights_file(path)]
        return read_index(index).shard_paths()

    def open(self, path: Path, *, ignore_journal: bool = False) -> Checkpoint:
        from lstm_surgeon.formats import open_checkpoint_files

        index_path = find_index(path)
        if index_path is None:
            return open_checkpoint_files([single_weights_file(path)], ignore_journal=ignore_journal)
        index = read_index(index_path)
        _require_shards_present(index)
        checkpoint = open_checkpoint_files(index.shard_paths(), ignore_journal=ignore_journal)
        try:
            return _as_indexed(checkpoint, index)
        except BaseException:
            checkpoint.close()
            raise

    def structure_problems(self, path: Path) -> list[str]:
        index_path = find_index(path)
        if index_path is None:
            single_weights_file(path)  # a folder that is no checkpoint stays an error
            return []
        index = read_index(index_path)
        problems = [f"{index.path.name}: repeats the key {name!r}" for name in index.repeated]
        held: dict[str, list[str]] = {}  # tensor -> shards holding it
        readable = set()
        for name in index.shard_names:
            tensors = _shard_tensors(index.folder / name, problems)
            if tensors is not None:
                readable.add(name)
            for tensor in tensors or ():
                held.setdefault(tensor, []).append(name)
        for tensor, shards in held.items():
            problems += _tensor_problems(index, tensor, shards)
        problems += [
            _missing(index, tensor)
            for tensor, shard in index.weight_map.items()
            if shard in readable and tensor not in held
        ]
        return problems


def single_weights_file(folder: Path) -> Path:
    """The one weights file of a folder without an index."""
    candidates = sorted(
        path
        for path in folder.iterdir()
        if path.suffix in WEIGHT_SUFFIXES and path.is_file() and not path.name.startswith(".")
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CheckpointError(
            f"{folder}: a directory with no checkpoint lstm-surgeon reads (no {INDEX_NAMES[0]}, "
            "no weights file, no DCP .metadata)"
        )
    raise CheckpointError(
        f"{folder}: holds {len(candidates)} weights files and no index; give one of them "
        f"({', '.join(path.name for path in candidates[:3])}...)"
    )


def _require_shards_present(index: ShardIndex) -> None:
    for shard in index.shard_paths():
        if not shard.exists():
            raise CheckpointError(
                f"{shard}: missing (the shard index {index.path.name} lists it); "
                + CHECK_HINT.format(path=index.folder)
            )


def _as_indexed(checkpoint: Checkpoint, index: ShardIndex) -> Checkpoint:
    """The joined shards as the folder's checkpoint, once they agree with the index."""
    names = [file.path.name for file in checkpoint.files]
    for tensor, ref in checkpoint.tensors.items():
        problems = _tensor_problems(index, tensor, [names[ref.storage.file]])
        if problems:
            raise CheckpointError(
                f"{index.folder}: {problems[0]}; {CHECK_HINT.format(path=index.folder)}"
            )
    missing = [name for name in index.weight_map if name not in checkpoint.tensors]
    if missing:
        raise CheckpointError(
            f"{index.folder}: {_missing(index, missing[0])}; {CHECK_HINT.format(path=index.folder)}"
        )
    if index.repeated:
        raise CheckpointError(
            f"{index.folder}: {index.path.name} repeats the key {index.repeated[0]!r}; "
            + CHECK_HINT.format(path=index.folder)
        )
    checkpoint.path = index.folder
    checkpoint.contents = Contents(checkpoint.contents.entries, index.metadata)
    return checkpoint


def _shard_tensors(shard: Path, problems: list[str]) -> list[str] | None:
    """The names a shard holds, or None with the reason noted when it cannot be read."""
    from lstm_surgeon.formats import open_checkpoint_files

    if not shard.exists():
        problems.append(f"{shard.name}: missing (the index lists it)")
        return None
    try:
        with open_checkpoint_files([shard]) as checkpoint:
            return list(checkpoint.tensors)
    except CheckpointError as error:
        problems.append(f"{shard.name}: cannot be read ({error})")
        return None


def _tensor_problems(index: ShardIndex, tensor: str, shards: list[str]) -> list[str]:
    """What is wrong with one tensor found in `shards` (its disagreement with the index)."""
    if len(shards) > 1:
        return [f"tensor {tensor!r} is in {len(shards)} shards ({', '.join(shards)})"]
    listed = index.weight_map.get(tensor)
    if listed is None:
        return [f"tensor {tensor!r} is in {shards[0]} but not in the index"]
    if listed != shards[0]:
        return [f"tensor {tensor!r} is in {shards[0]} but the index lists it in {listed}"]
    return []


def _missing(index: ShardIndex, tensor: str) -> str:
    return f"tensor {tensor!r} is listed in the index but missing from {index.weight_map[tensor]}"


FOLDER = ShardedFolder()
