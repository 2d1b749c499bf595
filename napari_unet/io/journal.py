"""A crash journal of the user's labels: what was painted survives a crash or a power cut.

One journal per labels layer, in a folder of the user's cache
(``platformdirs.user_cache_dir("napari-unet")/journal``, or ``$NAPARI_UNET_CACHE_DIR/journal``),
keyed by the image's path, a content hash of the image and the layer's name.

A journal is a ``manifest.json`` and one compressed file per non-empty chunk of the labels.
A write adds *new* chunk files (their names carry the write's generation), syncs them and the
folder to disk, then swaps the manifest atomically (temporary file, fsync, rename, fsync of the
folder), and only then deletes the files the old manifest named. Whatever moment the process
dies at, the manifest on disk names complete files: the journal is the old state or the new
one, never half of each. Files no manifest names (a write cut short) are removed on the next
open.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

ENV_VAR = "NAPARI_UNET_CACHE_DIR"
FORMAT = "napari-unet-labels-journal"
MANIFEST = "manifest.json"
#: settings keys (``settings.json``) and their defaults: journals older than this many days,
#: and the oldest beyond this many MB in all, are deleted
MAX_AGE_KEY, MAX_AGE_DAYS = "journal_max_age_days", 30.0
MAX_SIZE_KEY, MAX_SIZE_MB = "journal_max_mb", 2048.0
#: voxels per chunk file, about (a stroke rewrites the few chunks it touches)
CHUNK_VOXELS = 1 << 18
#: zlib level: labels compress ~50-500x already at level 1, and it is the fastest
LEVEL = 1
#: voxels read to fingerprint an image (a strided sample)
SAMPLE_VOXELS = 1 << 16

log = logging.getLogger("napari_unet")


# ----------------------------------------------------------------------------------------------
# where, and which image
# ----------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """napari-unet's cache folder (not created here)."""
    folder = os.environ.get(ENV_VAR)
    if folder:
        return Path(folder).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-unet", appauthor=False))


def journal_root() -> Path:
    return cache_dir() / "journal"


def content_hash(data: Any) -> str:
    """A cheap fingerprint of an image: shape, dtype and a strided sample of its voxels.

    ``data`` is a numpy or dask array (only the sample is read).
    """
    shape = tuple(int(s) for s in data.shape)
    digest = hashlib.sha256(f"{shape}|{np.dtype(data.dtype).str}".encode())
    if shape and all(shape):
        per_axis = max(1, round(SAMPLE_VOXELS ** (1 / len(shape))))
        key = tuple(slice(None, None, max(1, s // per_axis)) for s in shape)
        sample = np.ascontiguousarray(np.asarray(data[key]))
        digest.update(sample.tobytes())
    return digest.hexdigest()[:32]


def _key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:24]


def chunk_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Chunks of about CHUNK_VOXELS: 4 slices deep in 3D (a stroke lies in one slice)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) >= 3:
        lead = tuple(1 for _ in shape[:-3]) + (min(shape[-3], 4),)
        side = max(1, int((CHUNK_VOXELS / lead[-1]) ** 0.5))
        return lead + (min(shape[-2], side), min(shape[-1], side))
    side = max(1, int(CHUNK_VOXELS ** (1 / max(1, len(shape)))))
    return tuple(min(s, side) for s in shape)


# ----------------------------------------------------------------------------------------------
# which chunks a change touches
# ----------------------------------------------------------------------------------------------

ChunkId = tuple[int, ...]


def chunks_of_region(shape: Sequence[int], chunks: Sequence[int],
                     region: Sequence[slice] | None = None) -> set[ChunkId]:
    """The chunks that overlap ``region`` (a tuple of slices; None: the whole array)."""
    ranges = []
    for axis, (size, step) in enumerate(zip(shape, chunks)):
        part = region[axis] if region is not None and axis < len(region) else slice(None)
        start, stop, _ = part.indices(size) if isinstance(part, slice) else (int(part), int(part) + 1, 1)
        if stop <= start:
            return set()
        ranges.append(range(start // step, (stop - 1) // step + 1))
    ids: set[ChunkId] = {()}
    for r in ranges:
        ids = {i + (j,) for i in ids for j in r}
    return ids


def chunks_of_indices(chunks: Sequence[int], indices: Sequence[Any]) -> set[ChunkId]:
    """The chunks that hold the voxels ``indices`` (napari's paint atoms: arrays or slices)."""
    if any(isinstance(ix, slice) for ix in indices):
        raise ValueError("slices: use chunks_of_region")
    arrays = [np.atleast_1d(np.asarray(ix)) // step for ix, step in zip(indices, chunks)]
    if not arrays or arrays[0].size == 0:
        return set()
    stacked = np.unique(np.stack(np.broadcast_arrays(*arrays), axis=1), axis=0)
    return {tuple(int(v) for v in row) for row in stacked}


def _chunk_slices(cid: ChunkId, chunks: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(cid, chunks, shape))


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # (Windows: folders cannot be opened)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def _replace_synced(path: Path, payload: bytes) -> None:
    """Atomically replace ``path`` by ``payload``: temporary file, fsync, rename, fsync folder."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _write_synced(Path(name), payload)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def json_safe(value: Any) -> Any:
    """Tuples, numpy ints and floats as JSON lists and numbers (corrected-slice lists)."""
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [json_safe(v) for v in items]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    return value if value is None or isinstance(value, str) else str(value)


def planes(marks: Iterable[Any]) -> list[list[int]]:
    """Corrected-slice marks as ``[axis, index]`` pairs (an int means ``[0, int]``: a z slice)."""
    out = []
    for mark in marks or []:
        if isinstance(mark, (list, tuple)) and len(mark) == 2:
            out.append([int(mark[0]), int(mark[1])])
        else:
            out.append([0, int(mark)])
    return out


def marks_from_planes(pairs: Iterable[Sequence[int]]) -> list[Any]:
    """The docks' form of ``[axis, index]`` pairs: ints for z slices, tuples otherwise."""
    return [int(i) if int(a) == 0 else (int(a), int(i)) for a, i in pairs]


# ----------------------------------------------------------------------------------------------
# the journal
# ----------------------------------------------------------------------------------------------

@dataclass
class WriteResult:
    chunks: int = 0
    nbytes: int = 0
    committed: bool = False


class LabelsJournal:
    """The journal of one labels layer (see the module's notes for the on-disk rules).

    Not thread-safe: one writer at a time (the docks' journal thread).
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = Path(folder)
        self.manifest = manifest

    # opening ----------------------------------------------------------------------------------
    @classmethod
    def for_layer(cls, image_path: str, image_hash: str, layer_name: str,
                  root: Path | None = None) -> "LabelsJournal":
        """The journal of ``layer_name`` over this image: the one on disk, or a new, empty one
        (nothing is written before the first :meth:`write`)."""
        root = journal_root() if root is None else Path(root)
        folder = root / "labels" / _key(str(image_path), image_hash, layer_name)
        found = cls.load(folder)
        if found is not None:
            found.remove_leftovers()
            return found
        now = time.time()
        return cls(folder, {"format": FORMAT, "version": 1, "image_path": str(image_path),
                            "image_hash": image_hash, "layer": layer_name, "shape": None,
                            "dtype": None, "chunks": None, "files": {}, "corrected": [],
                            "clean": True, "created": now, "updated": now, "generation": 0})

    @classmethod
    def load(cls, folder: Path) -> "LabelsJournal | None":
        """The journal in ``folder`` (None when there is none, or it is not valid)."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return None
        return cls(folder, manifest)

    def remove_leftovers(self) -> None:
        """Delete the files the manifest does not name (a write cut short). Only the journal's
        writer may: another process's write in progress looks the same."""
        named = {entry[0] for entry in self.manifest["files"].values()} | {MANIFEST}
        try:
            for path in self.folder.iterdir():
                if path.name not in named and path.is_file():
                    path.unlink(missing_ok=True)
        except OSError:
            pass

    # state ------------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.folder / MANIFEST).is_file()

    @property
    def clean(self) -> bool:
        return bool(self.manifest.get("clean"))

    @property
    def layer_name(self) -> str:
        return str(self.manifest["layer"])

    @property
    def updated(self) -> float:
        return float(self.manifest.get("updated", 0.0))

    @property
    def shape(self) -> tuple[int, ...] | None:
        shape = self.manifest.get("shape")
        return None if shape is None else tuple(int(s) for s in shape)

    @property
    def corrected(self) -> list[Any]:
        """The corrected-slice marks, in the docks' form (see :func:`marks_from_planes`)."""
        return marks_from_planes(self.manifest.get("corrected", []))

    # writing ----------------------------------------------------------------------------------
    def write(self, data: np.ndarray, changed: Iterable[ChunkId] | None = None, *,
              corrected: Iterable[Any] | None = None, clean: bool = False,
              extra: dict[str, Any] | None = None) -> WriteResult:
        """Journal ``data`` where it changed, and the corrected-slice marks, in one commit.

        Parameters
        ----------
        data : array
            The layer's labels now (read chunk by chunk; a chunk is copied before it is
            compressed).
        changed : iterable of chunk ids, optional
            The chunks that may have changed (None: all). A chunk equal to what is journaled
            (same CRC) is not rewritten.
        corrected : iterable, optional
            The corrected-slice marks (None: unchanged).
        clean : bool
            Whether the labels are saved elsewhere now (Export, Save): a clean journal is not
            offered for restoring.
        """
        result = WriteResult()
        manifest = dict(self.manifest)
        files = dict(manifest["files"])
        shape = tuple(int(s) for s in data.shape)
        dtype = np.dtype(data.dtype).str
        if manifest["shape"] is None or tuple(manifest["shape"]) != shape or manifest["dtype"] != dtype:
            files, changed = {}, None  # a new array: everything is written again
            manifest.update(shape=list(shape), dtype=dtype, chunks=list(chunk_shape(shape)))
        chunks = tuple(manifest["chunks"])
        ids = chunks_of_region(shape, chunks) if changed is None else set(changed)
        generation = int(manifest["generation"]) + 1
        self.folder.mkdir(parents=True, exist_ok=True)
        written = []
        try:
            for cid in sorted(ids):
                if len(cid) != len(shape) or any(c < 0 or c * s >= n for c, s, n in zip(cid, chunks, shape)):
                    continue
                block = np.ascontiguousarray(data[_chunk_slices(cid, chunks, shape)])
                raw = block.tobytes()
                crc = zlib.crc32(raw)
                name = ".".join(str(c) for c in cid)
                if not block.any():
                    files.pop(name, None)
                    continue
                if name in files and files[name][1] == crc:
                    continue
                payload = zlib.compress(raw, LEVEL)
                file_name = f"c{name}-{generation}.z"
                _write_synced(self.folder / file_name, payload)
                written.append(file_name)
                files[name] = [file_name, crc]
                result.chunks += 1
                result.nbytes += len(payload)
            if corrected is not None:
                manifest["corrected"] = planes(corrected)
            if extra:
                manifest.update(json_safe(extra))
            manifest.update(files=files, clean=bool(clean))
            if manifest == self.manifest:
                return result
            manifest.update(generation=generation, updated=time.time())
            _fsync_dir(self.folder)
            payload = json.dumps(manifest).encode()
            _replace_synced(self.folder / MANIFEST, payload)
        except BaseException:
            for file_name in written:  # never named by a manifest: safe to remove
                (self.folder / file_name).unlink(missing_ok=True)
            raise
        old = {entry[0] for entry in self.manifest["files"].values()}
        self.manifest = manifest
        result.committed = True
        result.nbytes += len(payload)
        for file_name in old - {entry[0] for entry in files.values()}:
            (self.folder / file_name).unlink(missing_ok=True)
        return result

    def mark_clean(self, clean: bool = True) -> None:
        """Mark the journal saved (Export, Save) or not, keeping its contents."""
        if not self.exists or self.clean == clean:
            return
        manifest = {**self.manifest, "clean": bool(clean), "updated": time.time()}
        _replace_synced(self.folder / MANIFEST, json.dumps(manifest).encode())
        self.manifest = manifest

    def discard(self) -> None:
        """Delete the journal from disk (the object can be written again)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.manifest = {**self.manifest, "files": {}, "shape": None, "dtype": None,
                         "chunks": None, "corrected": [], "clean": True}

    # reading ----------------------------------------------------------------------------------
    def read_labels(self) -> np.ndarray:
        """The journaled labels (raises ValueError when a file is damaged or missing)."""
        shape = self.shape
        if shape is None:
            raise ValueError(f"the journal in {self.folder} holds no labels")
        dtype = np.dtype(self.manifest["dtype"])
        chunks = tuple(self.manifest["chunks"])
        out = np.zeros(shape, dtype=dtype)
        for name, (file_name, crc) in self.manifest["files"].items():
            cid = tuple(int(c) for c in name.split("."))
            where = _chunk_slices(cid, chunks, shape)
            try:
                raw = zlib.decompress((self.folder / file_name).read_bytes())
            except (OSError, zlib.error) as err:
                raise ValueError(f"the journal in {self.folder} is damaged: {err}") from None
            if zlib.crc32(raw) != crc:
                raise ValueError(f"the journal in {self.folder} is damaged: {file_name}")
            out[where] = np.frombuffer(raw, dtype=dtype).reshape(out[where].shape)
        return out
