"""Live mode's display: the "live prediction" labels layer and the view the prediction follows.

The layer has the image's shape and calibration; each update of the live session is written in
place into its region (a plane or a slab), and the layer is redrawn only when that region is on
screen (see :mod:`._view`). It is never the user's labels layer, never journaled or trained on,
and adding it leaves the user's active layer active (they may be painting).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from napari_unet._widgets._state import DERIVED_KEY, view_axis
from napari_unet._widgets._view import region_on_screen
from napari_unet.labels.outlines import plane_outlines
from napari_unet.labels.slices import clip_index

LIVE_LAYER = "live prediction"
#: how the live prediction is drawn: the layer's opacity (contours are outlines the worker
#: makes, see :func:`shown_values`: napari's own contours cost ~10-17 ms per redraw)
DISPLAYS = {"contours": 0.9, "translucent": 0.4}
CONTOURS = "contours"
HIDDEN = "hidden"
#: outline width (pixels) of the contours
OUTLINE_WIDTH = 2


def shown_values(update: Any, display: str) -> np.ndarray | None:
    """What the live layer shows of ``update``'s prediction: its outlines in the plane on
    screen (contours; computed here, in the worker thread) or the labels (translucent)."""
    labels = update.prediction
    if labels is None or display != CONTOURS:
        return labels
    ndim = np.ndim(labels)
    if ndim < 3:
        return plane_outlines(labels, (ndim - 2, ndim - 1), OUTLINE_WIDTH)
    first = ndim - 3
    axes = tuple(first + a for a in range(3) if a != update.view.axis)
    return plane_outlines(labels, axes, OUTLINE_WIDTH)


def view_plane(viewer: Any, layer: Any) -> tuple[int, int]:
    """``(axis, index)`` of the slice of ``layer`` on screen: axis 0 (z), 1 (y) or 2 (x) of a
    stack, ``(0, 0)`` for a 2D layer."""
    if layer.ndim < 3:
        return 0, 0
    axis = view_axis(viewer, layer)
    world = viewer.dims.point[-layer.ndim:] if len(viewer.dims.point) >= layer.ndim \
        else viewer.dims.point
    point = layer.world_to_data(world)
    return axis, clip_index(point[-3 + axis], layer.data.shape[-3 + axis])


def live_values(prediction: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``prediction`` as labels of ``dtype`` (uint8/uint16 are drawn as they are, see
    :func:`~napari_unet.labels.writeback.labels_dtype`); a wider type when ids do not fit."""
    values = np.asarray(prediction)
    if values.dtype == np.bool_:
        values = values.view(np.uint8)
    if values.dtype == dtype:
        return values
    if values.size and int(values.max()) > np.iinfo(dtype).max:
        return values.astype(np.promote_types(dtype, values.dtype))
    return values.astype(dtype)


class LiveLayer:
    """The live prediction layer of one image (made at the first update)."""

    def __init__(self, viewer: Any, display: str = "contours"):
        self.viewer = viewer
        self.display = display
        self._layer: Any = None

    def layer(self) -> Any | None:
        """The layer, while it is in the viewer."""
        layer = self._layer
        if layer is None or layer not in self.viewer.layers:
            return None
        return layer

    def _make(self, image: Any, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        layers = self.viewer.layers
        if LIVE_LAYER in layers:  # a stale one (an earlier run)
            layers.remove(layers[LIVE_LAYER])
        active = layers.selection.active
        ndim = len(shape)
        layer = self.viewer.add_labels(
            np.zeros(shape, dtype=dtype), name=LIVE_LAYER, scale=image.scale[-ndim:],
            translate=image.translate[-ndim:], opacity=DISPLAYS.get(self.display, 0.9),
            metadata={DERIVED_KEY: True})
        layer.visible = self.display != HIDDEN
        layer.editable = False
        if active is not None and active in layers:  # the user goes on painting where they were
            layers.selection.active = active
        self._layer = layer
        return layer

    def prepare(self, image: Any, shape: tuple[int, ...]) -> Any:
        """The layer for ``image`` (made now if needed: at Live's start, not at an update)."""
        layer = self.layer()
        if layer is not None and (tuple(layer.data.shape) != tuple(shape)
                                  or not isinstance(layer.data, np.ndarray)):
            layer = None
        return layer if layer is not None else self._make(image, shape, np.dtype(np.uint16))

    def show(self, image: Any, shape: tuple[int, ...], region: tuple[slice, ...],
             prediction: np.ndarray) -> bool:
        """Write ``prediction`` (see :func:`shown_values`) into ``region`` of the layer; redraw
        it when the region is on screen. Returns whether it was redrawn."""
        layer = self.prepare(image, shape)
        values = live_values(prediction, layer.data.dtype)
        if values.dtype != layer.data.dtype:  # more ids than the layer holds (rare)
            layer.data = layer.data.astype(values.dtype)
        layer.data[region] = values
        if layer.visible and region_on_screen(self.viewer, layer, region):
            layer.refresh()
            return True
        return False

    def set_display(self, display: str) -> None:
        """``contours``, ``translucent`` or ``hidden``."""
        self.display = display
        layer = self.layer()
        if layer is None:
            return
        if display == HIDDEN:
            layer.visible = False
            return
        layer.opacity = DISPLAYS[display]
        layer.visible = True
