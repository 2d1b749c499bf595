"""napari state shared by the docks: layer metadata keys, correction marks and their signals,
the viewer's slice and view, main-thread imports, error notifications.

Nothing here computes; the rules are in the core (the model list in
:mod:`napari_unet.zoo.registry`, units in :mod:`napari_unet.io.units`, slice bookkeeping in
:mod:`napari_unet.labels.slices`, durations in :mod:`napari_unet.engine.messages`).
"""

from __future__ import annotations

import importlib
import logging
import threading
import traceback
import weakref
from typing import Any, Callable

import numpy as np
from psygnal import Signal

from napari_unet.engine.messages import format_seconds  # noqa: F401 - used by the docks
from napari_unet.io.units import length_unit
from napari_unet.labels.slices import (
    Plane,
    clip_index,
    clip_point,
    plane_key,
    slice_list,
    touched_slices,
)
from napari_unet.model.checkpoint import CheckpointError
from napari_unet.zoo.registry import (  # noqa: F401 - the docks and tests import them from here
    ModelEntry,
    ModelRegistry,
    get_registry,
    remember_model,
    restore_last_model,
)

log = logging.getLogger("napari_unet")

#: metadata keys written on napari layers (read by the other docks and the writer)
CORRECTED_KEY = "napari_unet_corrected_slices"
PROBABILITIES_KEY = "napari_unet_probabilities"
MODEL_KEY = "napari_unet_model"
UNIT_KEY = "napari_unet_unit"
SOURCE_KEY = "napari_unet_source_path"
#: on a labels layer: the slices Segment suggests to correct, ``[[z, score], ...]`` best first
SUGGESTED_KEY = "napari_unet_suggested_slices"
#: on a layer a dock derived from a model (Live mode's prediction): not the user's labels, so
#: never journaled
DERIVED_KEY = "napari_unet_derived"

#: errors that are the user's situation, not a bug: shown as one-line notifications
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, CheckpointError, MemoryError,
                                                    FileNotFoundError, PermissionError, OSError)


# ----------------------------------------------------------------------------------------------
# heavy imports on the main thread
# ----------------------------------------------------------------------------------------------

#: modules imported on the main thread before a worker starts. torch._dynamo (and triton on
#: CUDA builds) are imported lazily by the first optimizer step / compiled op; importing triton
#: in a worker thread crashed napari (segfault) with the CUDA build of torch 2.14.1.
MAIN_THREAD_IMPORTS = ("torch", "torch._dynamo", "triton", "scipy.ndimage", "skimage.segmentation",
                       "skimage.measure", "napari_unet.labels.instances",
                       "napari_unet.training.trainer",
                       # napari imports pandas when the first labels layer is added (0.6 s):
                       # when the dock opens rather than when Segment is clicked
                       "pandas")
_imported_on_main: set[str] = set()
_import_module = importlib.import_module  # a seam for tests


def import_heavy_modules_on_main_thread(modules: tuple[str, ...] = MAIN_THREAD_IMPORTS) -> list[str]:
    """Import ``modules`` now, on the main thread, so worker threads never import them.

    Call before starting any worker (Segment and Fine-tune both do). Missing optional modules
    (``triton`` on CPU builds, ``napari_unet.training`` in a partial install) are skipped.

    Returns
    -------
    list of str
        The modules that are imported (now or before).
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("heavy modules must be imported on the main thread")
    for name in modules:
        if name in _imported_on_main:
            continue
        try:
            _import_module(name)
        except ImportError:
            continue
        except Exception as err:  # noqa: BLE001 - a broken optional module must not stop the GUI
            log.warning("could not import %s on the main thread: %s", name, err)
            continue
        _imported_on_main.add(name)
    return sorted(_imported_on_main)


# ----------------------------------------------------------------------------------------------
# layers and slices
# ----------------------------------------------------------------------------------------------

def layer_unit(layer: Any, default: str = "um") -> str:
    """Length unit of a layer: our metadata, else napari's ``units``, else ``default``."""
    saved = (getattr(layer, "metadata", None) or {}).get(UNIT_KEY)
    return length_unit(saved, getattr(layer, "units", None), default)


def current_slice_index(viewer: Any, layer: Any) -> int | None:
    """Index along the first axis of a 3D layer that the viewer shows now (None for 2D)."""
    if layer.ndim < 3:
        return None
    point = layer.world_to_data(viewer.dims.point[-layer.ndim:] if len(viewer.dims.point) >= layer.ndim
                                else viewer.dims.point)
    return clip_index(point[-3], layer.data.shape[-3])


def view_point(viewer: Any, layer: Any) -> tuple[int, ...]:
    """Data index of ``layer`` under the centre of the view, on the slice shown now."""
    point = list(viewer.dims.point)
    displayed = list(viewer.dims.displayed)
    center = list(viewer.camera.center)[-len(displayed):]
    for axis, value in zip(displayed, center):
        if axis < len(point):
            point[axis] = value
    world = point[-layer.ndim:] if len(point) >= layer.ndim else point
    data = np.asarray(layer.world_to_data(world), dtype=float)[-layer.ndim:]
    shape = layer.data[0].shape if getattr(layer, "multiscale", False) else layer.data.shape
    return clip_point(data, shape[-layer.ndim:])


def set_current_slice(viewer: Any, layer: Any, z: Plane) -> None:
    """Show slice ``z`` of ``layer``: a z slice (an int, the data index along its first
    spatial axis) or a y or x slice ``(axis, index)``. When the view shows that axis, the
    viewer's axis order changes (as napari's transpose/roll do) so that the slice is seen."""
    if layer.ndim < 3:
        return
    axis, index = plane_key(z)
    data_point = [0.0] * layer.ndim
    data_point[-3 + axis] = float(index)
    world = layer.data_to_world(data_point)
    dims = viewer.dims
    target = dims.ndim - 3 + axis
    if dims.ndisplay == 2 and target in dims.displayed:
        order = list(dims.order)
        spatial = [dims.ndim - 3 + a for a in range(3)]
        shown = sorted((a for a in spatial if a != target), key=order.index)
        dims.order = tuple([a for a in order if a not in spatial] + [target] + shown)
    dims.set_point(target, float(world[-3 + axis]))


def view_axis(viewer: Any, layer: Any) -> int:
    """The axis of a stack (0 = z, 1 = y, 2 = x) that the viewer slices ``layer`` along now:
    the one of its three spatial axes not on screen (0 in a 3D view)."""
    dims = viewer.dims
    if dims.ndisplay != 2:
        return 0
    hidden = [a for a in range(3) if dims.ndim - 3 + a not in dims.displayed]
    return hidden[0] if len(hidden) == 1 else 0


def layer_view_axis(layer: Any) -> int:
    """As :func:`view_axis`, from the layer's own slicing (napari's paint events carry only
    the layer): 0 when napari does not say."""
    slicing = getattr(layer, "_slice_input", None)
    displayed = getattr(slicing, "displayed", None)
    if displayed is None or getattr(slicing, "ndisplay", 2) != 2 or layer.ndim < 3:
        return 0
    first = layer.ndim - 3
    hidden = [a for a in range(3) if first + a not in list(displayed)]
    return hidden[0] if len(hidden) == 1 else 0


def current_plane(viewer: Any, layer: Any) -> Plane | None:
    """The slice of a 3D layer that the viewer shows now: ``z`` (an int) when it slices along
    z, else ``(axis, index)``; None for 2D."""
    if layer.ndim < 3:
        return None
    axis = view_axis(viewer, layer)
    point = layer.world_to_data(viewer.dims.point[-layer.ndim:] if len(viewer.dims.point) >= layer.ndim
                                else viewer.dims.point)
    index = clip_index(point[-3 + axis], layer.data.shape[-3 + axis])
    return index if axis == 0 else (axis, index)


def corrected_slices(layer: Any) -> list[Plane]:
    """The slices of a labels layer marked corrected (a 2D layer: ``[0]`` when it is): z
    slices as ints, y and x slices as ``(axis, index)`` (see :mod:`napari_unet.labels.slices`)."""
    return slice_list(layer.metadata.get(CORRECTED_KEY, []))


def set_corrected_slices(layer: Any, slices: Any) -> None:
    layer.metadata[CORRECTED_KEY] = slice_list(slices)
    corrections_changed.emit(layer)


class _CorrectionSignals:
    changed = Signal(object)


_correction_signals = _CorrectionSignals()
corrections_changed = _correction_signals.changed


class _SuggestionSignals:
    changed = Signal(object)


_suggestion_signals = _SuggestionSignals()
#: emitted with the labels layer whose suggested slices changed
suggestions_changed = _suggestion_signals.changed


def suggested_slices(layer: Any) -> list[tuple[int, float]]:
    """The slices Segment suggested to correct on ``layer``: ``[(z, score), ...]``, best first."""
    return [(int(z), float(score)) for z, score in layer.metadata.get(SUGGESTED_KEY, [])]


def set_suggested_slices(layer: Any, ranked: Any) -> None:
    layer.metadata[SUGGESTED_KEY] = [[int(z), float(score)] for z, score in ranked]
    suggestions_changed.emit(layer)


def mark_painted(layer: Any, atoms: Any, axis: int | None = None) -> None:
    """Mark the slices napari's brush/fill/eraser touched as corrected: slices along the axis
    the view slices the layer along (``axis``; None = the layer's own view, see
    :func:`layer_view_axis`), so a stroke in a view along y marks ``y`` slices."""
    if layer.ndim < 3:
        slices = {0}
    else:
        axis = layer_view_axis(layer) if axis is None else axis
        slices = {z if axis == 0 else (axis, z) for z in touched_slices(atoms, layer.ndim, axis)}
    if slices:
        now = set(corrected_slices(layer))
        if not slices <= now:
            set_corrected_slices(layer, now | slices)


_TRACKED_LAYERS: "weakref.WeakSet[Any]" = weakref.WeakSet()
_TRACKED_VIEWERS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _on_paint(event: Any) -> None:
    mark_painted(event.source, event.value)


def track_corrections(layer: Any) -> None:
    """Connect a labels layer's paint events to correction tracking (idempotent)."""
    if layer in _TRACKED_LAYERS:
        return
    layer.events.paint.connect(_on_paint)
    _TRACKED_LAYERS.add(layer)
    layer.metadata.setdefault(CORRECTED_KEY, [])


def install_correction_tracking(viewer: Any) -> None:
    """Track painting on every labels layer of ``viewer``, now and later (idempotent)."""
    from napari.layers import Labels

    for layer in viewer.layers:
        if isinstance(layer, Labels):
            track_corrections(layer)
    if viewer in _TRACKED_VIEWERS:
        return

    def on_insert(event: Any) -> None:
        if isinstance(event.value, Labels):
            track_corrections(event.value)

    viewer.layers.events.inserted.connect(on_insert)
    _TRACKED_VIEWERS.add(viewer)
    from napari_unet._widgets._journal import install_journal

    install_journal(viewer)  # nothing lost: the layers are journaled (see _journal)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

def notify_error(err: BaseException, what: str) -> str:
    """Show an error as a napari notification (one line); returns the message."""
    from napari.utils.notifications import show_error

    if isinstance(err, EXPECTED_ERRORS):
        message = f"{what}: {err}"
    else:
        message = f"{what} failed unexpectedly: {type(err).__name__}: {err}"
        log.error("%s\n%s", message, "".join(traceback.format_exception(err)))
    show_error(message)
    return message


def connect_layer_list(viewer: Any, callback: Callable[[Any], None]) -> None:
    """Call ``callback(event)`` when layers are added, removed, renamed or reordered.

    ``callback`` should be a bound method: napari holds it weakly, so a closed dock is not kept
    alive (or called) by the viewer.
    """
    events = viewer.layers.events
    for name in ("inserted", "removed", "reordered", "moved"):
        emitter = getattr(events, name, None)
        if emitter is not None:
            emitter.connect(callback)

    watched: weakref.WeakSet = weakref.WeakSet()

    def watch_names(event: Any = None) -> None:
        for layer in viewer.layers:
            if layer not in watched:
                layer.events.name.connect(callback)
                watched.add(layer)

    events.inserted.connect(watch_names)
    watch_names()
