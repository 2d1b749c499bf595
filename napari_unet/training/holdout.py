"""Holding a part of the annotations out of training, for validation (the held-out split)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from napari_unet.labels.slices import AXIS_NAMES, Plane, plane_key, plane_region
from napari_unet.training.config import AUTO_VALIDATION_FRACTION
from napari_unet.training.sampling import _Item

#: a part that can be held out: ``(item index, plane)`` pairs, ``plane`` None for a whole 2D
#: item, else a z slice (int) or a y or x slice ``(axis, index)`` of a stack
Part = list[tuple[int, Plane | None]]


def validation_parts(items: list[_Item], gap: int) -> list[Part]:
    """What can be held out.

    Each 2D image, and each run of annotated slices of a stack in which consecutive slices
    (along the same axis: z, y or x slices) are at most ``gap`` apart (so a held-out run has
    no annotated slice along that axis within that distance). A part lists ``(item index,
    plane)``; ``plane`` is None for a whole 2D item (an image, or a slice of a stack for a 2D
    model).
    """
    gap = max(0, int(gap))
    parts: list[Part] = []
    stacks: dict[tuple[int, int], list[tuple[int, int, Plane | None]]] = {}
    for i, item in enumerate(items):
        pair, z = item.source
        if item.image.ndim == 3 and item.planes is not None:  # a stack corrected in any plane
            for p in item.planes:
                axis, k = plane_key(p)
                stacks.setdefault((pair, axis), []).append((k, i, p))
        elif item.image.ndim == 3:  # a stack for a 3D model
            annotated = item.mask.any(axis=(1, 2)) if item.mask is not None else \
                np.ones(item.image.shape[0], bool)
            stacks.setdefault((pair, 0), []).extend((int(k), i, int(k)) for k in np.flatnonzero(annotated))
        elif z is not None:  # one slice of a stack, for a 2D model
            axis, k = plane_key(z)
            stacks.setdefault((pair, axis), []).append((k, i, None))
        else:
            parts.append([(i, None)])
    for pair in sorted(stacks):
        entries = sorted(stacks[pair])
        run = [entries[0]]
        for entry in entries[1:]:
            if entry[0] - run[-1][0] > gap:
                parts.append([(i, k) for _, i, k in run])
                run = []
            run.append(entry)
        parts.append([(i, k) for _, i, k in run])
    return parts


def describe(items: list[_Item], part: Part) -> str:
    """A part in words: ``slices 15-17 of image 1``, ``y 40 of image 1``, ``image 2``."""
    pair = items[part[0][0]].source[0] + 1
    planes = [items[i].source[1] if k is None else k for i, k in part]
    if planes[0] is None:
        return f"image {pair}"
    keys = sorted(plane_key(p) for p in planes)
    axis, zs = keys[0][0], [k for _, k in keys]
    run = zs[-1] - zs[0] == len(zs) - 1
    if axis == 0:
        where = f"slice {zs[0]}" if len(zs) == 1 else (
            f"slices {zs[0]}-{zs[-1]}" if run else f"slices {', '.join(map(str, zs))}")
    else:
        name = AXIS_NAMES[axis]
        where = f"{name} {zs[0]}" if len(zs) == 1 else (
            f"{name} {zs[0]}-{zs[-1]}" if run else ", ".join(f"{name} {k}" for k in zs))
    return f"{where} of image {pair}"


def hold_out(items: list[_Item], part: Part) -> None:
    """Move ``part`` from training (``item.mask``) to validation (``item.valid``)."""
    for i, z in part:
        item = items[i]
        full = np.ones(item.image.shape, bool) if item.mask is None else item.mask.copy()
        if item.valid is None:
            item.valid = np.zeros_like(full)
        if z is None:
            item.valid |= full
            item.mask = np.zeros_like(full)
        else:
            where = plane_region(z)
            item.valid[where] = full[where]
            full[where] = False
            item.mask = full


def crosses_z(part: Part) -> bool:
    """Whether a part is made of y or x planes of a stack (planes that show z)."""
    return all(k is not None and not isinstance(k, (int, np.integer)) and plane_key(k)[0] != 0
               for _, k in part)


def split_validation(items: list[_Item], fraction: float | None, gap: int, seed: int,
                     reindex: Callable[[_Item], None], cross_planes_first: bool = False
                     ) -> tuple[list[_Item], bool, str]:
    """Hold a part of the annotations out of training, for validation.

    ``fraction`` None (automatic): with two or more parts (annotated 2D images, or runs of
    annotated slices, see :func:`validation_parts`) a fifth of them (at least one) is held
    out; a single run of at least ``gap + 2`` slices gives its last slices, with ``gap``
    slices between them and the training slices. An explicit fraction does the same, and
    else holds out a strip along the last axis (one 2D image). 0 never holds anything out.

    Parameters
    ----------
    items
        The training items; changed in place (masks, ``valid``), and emptied items dropped.
    fraction, gap, seed
        ``validation_fraction``, ``validation_gap`` and ``seed`` of the training config.
    reindex
        Recomputes the sampling indices of an item whose mask changed.
    cross_planes_first
        Hold out y or x planes when there are any (a 3D membrane model: only planes that show
        z can show whether cells stacked in z stay apart).

    Returns
    -------
    val_items, keeps_best, message
        The items with held-out voxels, whether the best-scoring weights are kept, and the
        validation message saying what was held out (or why nothing).
    """
    auto = fraction is None
    frac = AUTO_VALIDATION_FRACTION if auto else float(fraction)
    gap = max(0, int(gap))
    if frac <= 0:
        return [], False, "validation is off: keeping the last weights"
    rng = np.random.default_rng(seed + 11)
    parts = validation_parts(items, gap)
    described = ""
    changed: set[int] = set()  # items whose training mask changed, besides validation items
    if len(parts) >= 2:
        n_val = min(len(parts) - 1, max(1, round(frac * len(parts))))
        pool = [k for k, part in enumerate(parts) if crosses_z(part)] if cross_planes_first else []
        if len(pool) < n_val or len(pool) == len(parts):
            pool = list(range(len(parts)))
        chosen = sorted(int(k) for k in rng.choice(pool, n_val, replace=False))
        for k in chosen:
            hold_out(items, parts[k])
        described = ", ".join(describe(items, parts[k]) for k in chosen)
    elif len(parts) == 1 and len(parts[0]) >= gap + 2:
        run = parts[0]  # one run of slices: its last ones, a gap, then the training slices
        n_val = min(len(run) - gap - 1, max(1, round(frac * len(run))))
        held, dropped = run[len(run) - n_val:], run[len(run) - n_val - gap:len(run) - n_val]
        hold_out(items, held)
        for i, z in dropped:
            item = items[i]
            changed.add(i)
            if z is None:
                item.mask = np.zeros(item.image.shape, bool)
            else:
                if item.mask is None:
                    item.mask = np.ones(item.image.shape, bool)
                item.mask[plane_region(z)] = False
        described = describe(items, held)
        if dropped:
            described += f" ({describe(items, dropped)} not trained on)"
    elif not auto and len(items) == 1 and items[0].source[1] is None:  # one 2D image: a strip
        item = items[0]
        full = np.ones(item.image.shape, bool) if item.mask is None else item.mask.copy()
        columns = np.flatnonzero(full.any(axis=tuple(range(full.ndim - 1))))
        cut = columns[int(len(columns) * (1 - frac))]
        valid = full.copy()
        valid[..., :cut] = False
        full[..., cut:] = False
        if full.any() and valid.any():
            item.mask, item.valid = full, valid
            described = f"the strip x >= {cut} of image {item.source[0] + 1}"
    if not described:
        if len(parts[0]) > 1:
            what = f"only neighbouring annotated slices ({describe(items, parts[0])})"
        else:
            what = f"one annotated {'image' if items[0].source[1] is None and items[0].image.ndim == 2 else 'slice'}"
        return [], False, (f"{what}: nothing held out for validation, keeping the last weights "
                           "(correct two or more slices or images, apart, to keep the best)")
    val_items: list[_Item] = []
    kept: list[_Item] = []
    for i, item in enumerate(items):
        if item.valid is not None:
            val_items.append(item)
        if item.mask is None or item.mask.any():
            if item.valid is not None or i in changed:
                reindex(item)
            kept.append(item)
    items[:] = kept
    return val_items, True, f"held out for validation: {described}; keeping the best-scoring weights"
