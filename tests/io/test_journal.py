"""The crash journal: round trips, only changed chunks, never half-valid, pruning."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from napari_unet.io import journal as jr
from napari_unet.io import recovery as rc
from napari_unet.io.journal import LabelsJournal


def _labels(shape=(10, 300, 280), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, np.uint32)
    for _ in range(20):
        z, y, x = (int(rng.integers(0, max(1, s - 20))) for s in shape)
        data[z:z + 3, y:y + 20, x:x + 20] = rng.integers(1, 1 << 20)
    return data


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(jr.ENV_VAR, str(tmp_path / "c"))
    assert jr.journal_root() == tmp_path / "c" / "journal"


def test_content_hash_sees_shape_dtype_and_content():
    data = _labels()
    base = jr.content_hash(data)
    assert jr.content_hash(data.copy()) == base
    assert jr.content_hash(data.astype(np.uint16)) != base
    other = data.copy()
    other[::2, ::2, ::2] += 1
    assert jr.content_hash(other) != base


def test_round_trip_with_corrected_planes(tmp_path):
    data = _labels()
    journal = LabelsJournal.for_layer("/img/a.tif", "h", "a labels", root=tmp_path)
    assert not journal.exists
    result = journal.write(data, corrected=[3, 1, (1, 40)])
    assert result.committed and result.chunks > 0
    again = LabelsJournal.for_layer("/img/a.tif", "h", "a labels", root=tmp_path)
    np.testing.assert_array_equal(again.read_labels(), data)
    assert again.corrected == [3, 1, (1, 40)]
    assert again.manifest["corrected"] == [[0, 3], [0, 1], [1, 40]]
    assert not again.clean
    # 2D too
    flat = _labels((1, 300, 280))[0]
    j2 = LabelsJournal.for_layer("/img/b.tif", "h", "b", root=tmp_path)
    j2.write(flat, corrected=[0])
    np.testing.assert_array_equal(LabelsJournal.load(j2.folder).read_labels(), flat)


def test_only_changed_chunks_are_written(tmp_path):
    data = _labels()
    journal = LabelsJournal.for_layer("/img/a.tif", "h", "L", root=tmp_path)
    journal.write(data)
    assert journal.write(data).committed is False  # nothing changed
    data[5, 100:104, 100:104] = 7
    touched = jr.chunks_of_indices(journal.manifest["chunks"], np.nonzero(data == 7))
    result = journal.write(data, touched)
    assert result.committed and result.chunks == len(touched) == 1
    np.testing.assert_array_equal(LabelsJournal.load(journal.folder).read_labels(), data)
    # erasing a whole chunk removes its file; a different shape starts afresh
    data[:] = 0
    journal.write(data)
    assert journal.manifest["files"] == {}
    assert sorted(p.name for p in journal.folder.iterdir()) == [jr.MANIFEST]
    small = _labels((4, 50, 50))
    journal.write(small)
    np.testing.assert_array_equal(LabelsJournal.load(journal.folder).read_labels(), small)


def test_chunks_of_region_and_indices():
    assert jr.chunks_of_region((10, 10), (4, 4), (slice(3, 5), slice(0, 1))) == {(0, 0), (1, 0)}
    assert jr.chunks_of_region((10, 10), (4, 4)) == {(i, j) for i in range(3) for j in range(3)}
    assert jr.chunks_of_region((10, 10), (4, 4), (slice(5, 5), slice(None))) == set()
    ids = jr.chunks_of_indices((4, 4), (np.array([0, 9]), np.array([1, 1])))
    assert ids == {(0, 0), (2, 0)}


@pytest.mark.parametrize("fail_at", [1, 2, 3, "manifest"])
def test_a_write_killed_midway_leaves_the_previous_state(tmp_path, monkeypatch, fail_at):
    first = _labels(seed=1)
    journal = LabelsJournal.for_layer("/img/a.tif", "h", "L", root=tmp_path)
    journal.write(first, corrected=[1])
    second = _labels(seed=2)
    calls = {"n": 0}
    real_write, real_replace = jr._write_synced, os.replace

    def dying_write(path, payload):  # the process "dies" after a partial chunk file
        calls["n"] += 1
        if calls["n"] == fail_at:
            path.write_bytes(payload[: len(payload) // 2])
            raise KeyboardInterrupt("killed")
        real_write(path, payload)

    def dying_replace(src, dst):
        if str(dst).endswith(jr.MANIFEST):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(jr, "_write_synced", dying_write)
    if fail_at == "manifest":
        monkeypatch.setattr(jr.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        journal.write(second, corrected=[1, 2])
    monkeypatch.undo()
    reopened = LabelsJournal.for_layer("/img/a.tif", "h", "L", root=tmp_path)
    np.testing.assert_array_equal(reopened.read_labels(), first)
    assert reopened.corrected == [1]
    named = {entry[0] for entry in reopened.manifest["files"].values()} | {jr.MANIFEST}
    assert {p.name for p in journal.folder.iterdir()} == named  # leftovers cleaned


def test_leftovers_of_a_sigkill_are_removed_by_the_next_writer(tmp_path):
    data = _labels()
    journal = LabelsJournal.for_layer("/img/a.tif", "h", "L", root=tmp_path)
    journal.write(data)
    (journal.folder / "c0.0.0-99.z").write_bytes(b"half")
    (journal.folder / ".manifest.json.x.tmp").write_bytes(b"{")
    assert LabelsJournal.load(journal.folder) is not None
    assert (journal.folder / "c0.0.0-99.z").exists()  # a reader leaves them (a writer may be busy)
    reopened = LabelsJournal.for_layer("/img/a.tif", "h", "L", root=tmp_path)
    np.testing.assert_array_equal(reopened.read_labels(), data)
    assert not (journal.folder / "c0.0.0-99.z").exists()


def test_damaged_chunk_is_an_error_not_wrong_labels(tmp_path):
    journal = LabelsJournal.for_layer("/img/a.tif", "h", "L", root=tmp_path)
    journal.write(_labels())
    name = next(iter(journal.manifest["files"].values()))[0]
    (journal.folder / name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="damaged"):
        LabelsJournal.load(journal.folder).read_labels()


def test_find_journals_by_image_and_clean_state(tmp_path):
    data = _labels()
    a = LabelsJournal.for_layer("/img/a.tif", "h1", "L", root=tmp_path)
    a.write(data)
    LabelsJournal.for_layer("/img/a.tif", "other-content", "L", root=tmp_path).write(data)
    LabelsJournal.for_layer("/img/b.tif", "h1", "L", root=tmp_path).write(data)
    found = rc.find_journals("/img/a.tif", "h1", root=tmp_path)
    assert [j.folder for j in found] == [a.folder]
    a.mark_clean()
    assert rc.find_journals("/img/a.tif", "h1", root=tmp_path) == []
    assert LabelsJournal.load(a.folder).clean
    # painting again makes it unsaved
    data[0, 0, 0] = 5
    a.write(data, [(0, 0, 0)])
    assert len(rc.find_journals("/img/a.tif", "h1", root=tmp_path)) == 1


def test_prune_by_age_then_size(tmp_path):
    folders = []
    for i in range(4):
        j = LabelsJournal.for_layer(f"/img/{i}.tif", "h", "L", root=tmp_path)
        j.write(_labels(seed=i))
        folders.append(j.folder)
    now = time.time()
    for i, folder in enumerate(folders):  # 0 is the oldest
        stamp = now - (4 - i) * 86400
        for p in [folder, *folder.iterdir()]:
            os.utime(p, (stamp, stamp))
    removed = rc.prune(tmp_path, max_age_days=3.5, max_mb=1e6, now=now)
    assert removed == [folders[0]]
    sizes = [rc.folder_size(f) for f in folders[1:]]
    removed = rc.prune(tmp_path, max_age_days=100, max_mb=(sizes[1] + sizes[2]) / 1e6, now=now)
    assert removed == [folders[1]]
    removed = rc.prune(tmp_path, max_age_days=100, max_mb=0, keep=[folders[3]], now=now)
    assert removed == [folders[2]] and folders[3].exists()


def test_finetune_checkpoints_the_app_lost(tmp_path):
    running = rc.finetune_folder("run1", tmp_path)
    (running / rc.CHECKPOINT).write_bytes(b"weights")
    rc.write_info(running, label="nuclei-3d v2", state="running", iteration=5)
    done = rc.finetune_folder("run2", tmp_path)
    (done / rc.CHECKPOINT).write_bytes(b"weights")
    rc.write_info(done, label="nuclei-3d v3", state="finished")  # never saved to a file
    saved = rc.finetune_folder("run3", tmp_path)
    (saved / rc.CHECKPOINT).write_bytes(b"weights")
    rc.write_info(saved, label="nuclei-3d v4", state="saved")
    rc.finetune_folder("run4", tmp_path)  # died before its first checkpoint
    found = rc.recoverable_checkpoints(tmp_path)
    assert [(p.parent.name, info["label"]) for p, info in found] == [("run1", "nuclei-3d v2"),
                                                                     ("run2", "nuclei-3d v3")]
