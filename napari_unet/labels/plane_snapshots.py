"""Copies of the corrected planes of a labels array, for training while the user paints.

Live mode (see :mod:`napari_unet.training.live`) trains on a snapshot of the corrected planes,
taken on the main thread after each change and handed to the worker with a version number.
:class:`PlaneSnapshots` copies only the planes that may have changed since the last snapshot
(the others are shared with it: a snapshot is never written to), so a stroke costs a copy of
the planes it touched. numpy only.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from napari_unet.labels.slices import Plane, plane_in_range, plane_region, slice_list


def plane_copy(data: Any, p: Plane) -> np.ndarray:
    """A copy of plane ``p`` of a labels array (a 2D array: the whole array)."""
    if np.ndim(data) < 3:
        return np.array(data, copy=True)
    return np.array(data[plane_region(p, np.ndim(data))], copy=True)


class PlaneSnapshots:
    """The corrected planes of one labels array as of the last :meth:`take`, and its version.

    :meth:`mark` says which planes changed (None: any of them may have); :meth:`take` copies
    those, and the planes newly marked corrected, and returns the new snapshot when something
    differs from the last one (None otherwise). ``version`` counts the snapshots taken.
    """

    def __init__(self) -> None:
        #: the last snapshot: plane -> its labels (copies, shared by later snapshots: never
        #: written to)
        self.planes: dict[Plane, np.ndarray] = {}
        self.version = 0
        #: planes changed since the last snapshot; None: any
        self._dirty: set[Plane] | None = set()
        #: whether something was marked since the last snapshot
        self.pending = False
        #: ``time.perf_counter()`` of the oldest change not yet in a snapshot
        self.since: float | None = None

    def mark(self, planes: Iterable[Plane] | None, when: float) -> None:
        """Planes that changed at time ``when`` (None: any may have; empty: only which planes
        are corrected may have changed)."""
        if planes is None:
            self._dirty = None
        elif self._dirty is not None:
            self._dirty |= set(slice_list(planes))
        self.pending = True
        if self.since is None:
            self.since = when

    def take(self, data: Any, corrected: Iterable[Plane]) -> dict[Plane, np.ndarray] | None:
        """The snapshot of ``data``'s ``corrected`` planes (a new dict; the arrays of unchanged
        planes are those of the last snapshot), or None when nothing changed since it. A 2D
        array has one plane, ``0``, when it is marked corrected."""
        ndim = np.ndim(data)
        planes = [p for p in slice_list(corrected)
                  if (p == 0 if ndim < 3 else plane_in_range(p, np.shape(data)))]
        dirty = self._dirty
        self._dirty, self.pending = set(), False
        changed = set(planes) != set(self.planes)
        snapshot: dict[Plane, np.ndarray] = {}
        for p in planes:
            old = self.planes.get(p)
            if old is not None and dirty is not None and p not in dirty:
                snapshot[p] = old
                continue
            new = plane_copy(data, p)
            if old is not None and old.shape == new.shape and old.dtype == new.dtype \
                    and np.array_equal(old, new):
                snapshot[p] = old
                continue
            snapshot[p] = new
            changed = True
        if not changed:
            self.since = None
            return None
        self.planes = snapshot
        self.version += 1
        self.since = None
        return dict(snapshot)
