"""Finding the crash journals of an image, pruning old ones, and the fine-tune checkpoints kept
next to them (see :mod:`napari_unet.io.journal`)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from napari_unet.io.journal import (
    MAX_AGE_DAYS,
    MAX_SIZE_MB,
    LabelsJournal,
    _replace_synced,
    journal_root,
    json_safe,
)

def folder_size(folder: Path) -> int:
    total = 0
    try:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                total += path.stat().st_size
    except OSError:
        pass
    return total


def find_journals(image_path: str, image_hash: str, root: Path | None = None,
                  unsaved_only: bool = True) -> list[LabelsJournal]:
    """The journals of layers over this image (by default the unsaved ones), newest first."""
    root = journal_root() if root is None else Path(root)
    found = []
    labels = root / "labels"
    if not labels.is_dir():
        return []
    for folder in labels.iterdir():
        journal = LabelsJournal.load(folder)
        if journal is None or journal.shape is None:
            continue
        if journal.manifest.get("image_path") != str(image_path):
            continue
        if journal.manifest.get("image_hash") != image_hash:
            continue
        if unsaved_only and journal.clean:
            continue
        found.append(journal)
    return sorted(found, key=lambda j: -j.updated)


def prune(root: Path | None = None, max_age_days: float = MAX_AGE_DAYS,
          max_mb: float = MAX_SIZE_MB, keep: Iterable[Path] = (),
          now: float | None = None) -> list[Path]:
    """Delete journals (labels and fine-tune checkpoints) older than ``max_age_days``, then the
    oldest until all fit in ``max_mb``; folders in ``keep`` (in use) stay. Returns the removed."""
    root = journal_root() if root is None else Path(root)
    now = time.time() if now is None else now
    keep = {Path(k).resolve() for k in keep}
    entries = []
    for kind in ("labels", "finetune"):
        parent = root / kind
        if not parent.is_dir():
            continue
        for folder in parent.iterdir():
            if not folder.is_dir() or folder.resolve() in keep:
                continue
            try:
                stamp = max(p.stat().st_mtime for p in [folder, *folder.iterdir()])
            except (OSError, ValueError):
                continue
            entries.append((stamp, folder, folder_size(folder)))
    removed = []
    total = sum(size for _, _, size in entries) + sum(folder_size(k) for k in keep if k.exists())
    for stamp, folder, size in sorted(entries, key=lambda e: e[0]):
        if now - stamp > max_age_days * 86400 or total > max_mb * 1e6:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            total -= size
    return removed


# ----------------------------------------------------------------------------------------------
# fine-tune checkpoints
# ----------------------------------------------------------------------------------------------

CHECKPOINT = "best.pt"
INFO = "info.json"
#: states of a fine-tune run whose weights are nowhere else: still training when the app died,
#: or finished but never saved to a file
RECOVERABLE = ("running", "finished")


def finetune_folder(run_id: str, root: Path | None = None) -> Path:
    """Where a fine-tune run keeps its best-so-far checkpoint (created here)."""
    root = journal_root() if root is None else Path(root)
    folder = root / "finetune" / run_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_info(folder: Path, **info: Any) -> None:
    """Atomically write a fine-tune run's ``info.json`` (label, state, iteration...)."""
    _replace_synced(Path(folder) / INFO, json.dumps(json_safe(info)).encode())


def read_info(folder: Path) -> dict[str, Any] | None:
    try:
        info = json.loads((Path(folder) / INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def recoverable_checkpoints(root: Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Checkpoints of fine-tune runs the app lost (died while training, or never saved):
    ``(file, info)``, oldest first."""
    root = journal_root() if root is None else Path(root)
    parent = root / "finetune"
    if not parent.is_dir():
        return []
    found = []
    for folder in sorted(parent.iterdir()):
        info = read_info(folder)
        if info and info.get("state") in RECOVERABLE and (folder / CHECKPOINT).is_file():
            found.append((folder / CHECKPOINT, info))
    return found
