"""What the viewer shows, and keeping the first Segment click short.

A labels layer is redrawn only when a write touches the slice on screen: each redraw is one
canvas repaint (~40-50 ms under a software OpenGL stack), and tiles of the other slices of a
stack change nothing the user sees (napari slices the layer again when they move there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_warmed = False


def region_on_screen(viewer: Any, layer: Any, region: tuple[slice, ...]) -> bool:
    """Whether writing ``region`` (data indices of ``layer``) changes what the viewer shows.

    In 3D view, and for 2D layers, always; otherwise when the region contains the slice shown
    on every axis that is not displayed (both the floor and the nearest index count, so a
    point between two slices never hides a change).
    """
    ndim = layer.ndim
    if viewer.dims.ndisplay == 3 or ndim <= viewer.dims.ndisplay:
        return True
    offset = viewer.dims.ndim - ndim  # the layer's axes are the viewer's last ``ndim`` axes
    displayed = {axis - offset for axis in viewer.dims.displayed}
    point = np.asarray(layer.world_to_data(viewer.dims.point[-ndim:]), dtype=float)
    shape = layer.data.shape
    for axis in range(min(ndim, len(region))):
        if axis in displayed:
            continue
        where = region[axis]
        start, stop, _ = where.indices(shape[axis])
        candidates = {int(np.floor(point[axis])), int(np.round(point[axis]))}
        if not any(start <= index < stop for index in candidates):
            return False
    return True


def warm_up_labels_visuals() -> None:
    """Build, once per process, what napari's first labels layer would build at the click.

    napari gives every labels layer a polygon overlay drawn with vispy's "agg" lines; the first
    one computes vispy's dash patterns (cached afterwards): ~0.15 s of the first Segment click
    on the project's VM. Done when the dock opens instead.
    """
    global _warmed
    if _warmed:
        return
    _warmed = True
    try:
        from vispy.visuals.line.dash_atlas import DashAtlas
    except ImportError:  # another vispy layout: nothing to warm
        return
    DashAtlas()
