"""Merging chunk-wise instance labels into one consistent labelling."""

from __future__ import annotations

import time
from typing import Any, Generator

import numpy as np

from napari_unet.bigdata.store import (
    ATTRS_KEY,
    _axis_names,
    _set_state,
    array_path,
    stored_plan,
    stream_array,
)
from napari_unet.labels.stitch import DEFAULT_STITCH_THRESHOLD
from napari_unet.progress import Progress

# --- instances across chunks ---------------------------------------------------------------


def _face_pairs(low_side: np.ndarray, high_side: np.ndarray, min_overlap: float,
                same_class: np.ndarray | None = None, min_iou: float | None = None) -> np.ndarray:
    """Pairs ``(a, b)`` of global ids that touch across a face and overlap enough: contact
    at least ``min_overlap`` of the smaller area, or (``min_iou``, for 2D objects stitched
    through z) an IoU of the two face areas at least ``min_iou`` (``<= 0``: no pairs)."""
    if min_iou is not None and min_iou <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    touching = (low_side > 0) & (high_side > 0)
    if same_class is not None:
        touching &= same_class
    if not touching.any():
        return np.zeros((0, 2), dtype=np.int64)
    pairs, contacts = np.unique(np.stack([low_side[touching], high_side[touching]], axis=1),
                                axis=0, return_counts=True)
    if min_overlap <= 0 and min_iou is None:
        return pairs
    ids_a, area_a = np.unique(low_side[low_side > 0], return_counts=True)
    ids_b, area_b = np.unique(high_side[high_side > 0], return_counts=True)
    areas_a = area_a[np.searchsorted(ids_a, pairs[:, 0])]
    areas_b = area_b[np.searchsorted(ids_b, pairs[:, 1])]
    if min_iou is not None:
        return pairs[contacts >= min_iou * (areas_a + areas_b - contacts)]
    return pairs[contacts >= min_overlap * np.minimum(areas_a, areas_b)]


def merge_chunk_instances(group: Any, *, min_size: int = 0, min_overlap: float = 0.5
                          ) -> Generator[Progress, None, int]:
    """Turn per-chunk labels (``_local``) into globally consistent ``instances``; restartable.

    Chunk ``g``'s ids ``1..counts[g]`` become global ids ``offset[g] + 1 ..``; objects that
    touch across a chunk face (face connectivity; within one class for semantic models) are
    merged (union-find: connected components of the pair graph), objects smaller than
    ``min_size`` voxels are removed, and the rest are numbered ``1..N`` in order of first
    appearance. Memory: one chunk, one cross-section of faces, and a few numbers per object.

    The instances of a 2D model on a stack (settings ``per_slice``) are joined across
    z faces only where their areas overlap with IoU at least the run's ``stitch_threshold``,
    as slices are stitched within a chunk.

    Returns the number of objects ``N``.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    info = dict(group.attrs[ATTRS_KEY])
    if info.get("state") == "done":
        return int(info.get("n_objects", 0))
    plan = stored_plan(group)
    local = group["_local"]
    classes = stream_array(group, "labels") if info["task"] == "semantic" else None
    settings = dict(info.get("fingerprint", {}).get("settings", {}))
    z_iou = float(settings.get("stitch_threshold", DEFAULT_STITCH_THRESHOLD)) if settings.get("per_slice") else None
    grid = plan.grid
    counts = np.asarray(group["_counts"][...], dtype=np.int64).ravel()
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    total = int(counts.sum())
    n_chunks = plan.n_tiles
    start = time.perf_counter()
    state = info.get("state")

    if state != "relabeling" or "_lut" not in group:
        _set_state(group, state="merging")
        sizes = np.zeros(total + 1, dtype=np.int64)
        high_faces: dict[tuple[tuple[int, ...], int], tuple[np.ndarray, np.ndarray | None]] = {}
        edges: list[np.ndarray] = []
        for index in range(n_chunks):
            position = tuple(int(p) for p in np.unravel_index(index, grid))
            region = plan.tile(index).write
            block = np.asarray(local[region]).astype(np.int64)
            n = int(counts[index])
            if n:
                sizes[offsets[index] + 1: offsets[index] + n + 1] += np.bincount(
                    block.ravel(), minlength=n + 1)[1:n + 1]
            block[block > 0] += offsets[index]
            cls = np.asarray(classes[region]) if classes is not None else None
            for axis in range(len(grid)):
                first = (slice(None),) * axis + (0,)
                last = (slice(None),) * axis + (-1,)
                if position[axis] > 0:
                    below = tuple(p - (a == axis) for a, p in enumerate(position))
                    low_side, low_cls = high_faces.pop((below, axis))
                    same = None if cls is None else low_cls == cls[first]
                    edges.append(_face_pairs(low_side, block[first], min_overlap, same,
                                             z_iou if axis == 0 else None))
                if position[axis] < grid[axis] - 1:
                    high_faces[(position, axis)] = (
                        block[last].copy(), None if cls is None else cls[last].copy())
            del block, cls
            yield Progress(index + 1, n_chunks, time.perf_counter() - start, stage="postprocess",
                           message="merging objects across chunks" if index == 0 else "")
        pairs = np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)
        graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                           shape=(total + 1, total + 1))
        n_comp, component = connected_components(graph, directed=False)
        comp_sizes = np.bincount(component, weights=sizes, minlength=n_comp)
        keep = comp_sizes >= max(1, min_size)
        keep[component[0]] = False  # background
        first_id = np.full(n_comp, total + 1, dtype=np.int64)
        np.minimum.at(first_id, component, np.arange(total + 1))
        kept = np.flatnonzero(keep)
        kept = kept[np.argsort(first_id[kept], kind="stable")]
        n_objects = len(kept)
        if n_objects > np.iinfo(np.uint32).max:
            raise ValueError(f"{n_objects} objects do not fit uint32 labels")
        final = np.zeros(n_comp, dtype=np.uint32)
        final[kept] = np.arange(1, n_objects + 1, dtype=np.uint32)
        lut = final[component]
        lut[0] = 0
        del sizes, pairs, graph, component
        if "_lut" in group:
            del group["_lut"]
        lut_array = group.create_array("_lut", shape=lut.shape, chunks=(min(len(lut), 1 << 22),),
                                       dtype="uint32", fill_value=0)
        lut_array[...] = lut
        if array_path(group, "instances") not in group:
            group.create_array(array_path(group, "instances"), shape=plan.spatial, chunks=plan.core, dtype="uint32",
                               fill_value=0, dimension_names=_axis_names(len(plan.spatial)))
        if "_relabeled" in group:
            del group["_relabeled"]
        group.create_array("_relabeled", shape=grid, chunks=(1,) * len(grid), dtype="uint8",
                           fill_value=0)
        _set_state(group, state="relabeling", n_objects=n_objects)
    else:
        lut = np.asarray(group["_lut"][...])
        n_objects = int(info.get("n_objects", int(lut.max(initial=0))))

    # pass 3: relabel every chunk from _local (idempotent, so an interruption is harmless)
    instances, relabeled = stream_array(group, "instances"), group["_relabeled"]
    todo = np.flatnonzero(np.asarray(relabeled[...]).ravel() == 0)
    for count, index in enumerate(todo):
        region = plan.tile(int(index)).write
        n, offset = int(counts[index]), int(offsets[index])
        if n:
            table = np.concatenate([[0], lut[offset + 1: offset + n + 1]]).astype(np.uint32)
            instances[region] = table[np.asarray(local[region])]
        relabeled[np.unravel_index(int(index), grid)] = 1
        yield Progress(count + 1, len(todo), time.perf_counter() - start, stage="postprocess",
                       message="relabelling chunks" if count == 0 else "")
    _set_state(group, state="done", n_objects=n_objects)
    # the per-chunk labels are not needed any more; keep the small bookkeeping arrays
    del group["_local"]
    return n_objects
