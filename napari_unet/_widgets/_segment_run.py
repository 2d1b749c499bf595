"""Segment dock, second half: a run in progress. Tiles and the result go into the labels layer,
the status line and the progress bars follow, and the dock is freed when the run ends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_unet._widgets._common import ChunkedWriter
from napari_unet._widgets._journal import note_changed
from napari_unet._widgets._state import (
    PROBABILITIES_KEY,
    corrected_slices,
    notify_error,
    set_suggested_slices,
)
from napari_unet._widgets._view import region_on_screen
from napari_unet.engine.live import (
    RunExtras,
    SegmentOutcome,
    UncertaintyRequest,
    uncertainty_name,
)
from napari_unet.engine.messages import format_seconds, found_text, short_list
from napari_unet.engine.regions import PredictRegion, covers
from napari_unet.labels.slices import plane_label
from napari_unet.labels.writeback import KEEP, fits_in_place, write_unprotected

#: the labels layer is redrawn at most this often while tiles arrive (seconds)
REFRESH_INTERVAL = 0.1


def spatial_shape(layer: Any) -> tuple[int, ...]:
    """Shape of an image layer's data (its first level when multiscale)."""
    return tuple(np.shape(layer.data[0] if layer.multiscale else layer.data))


@dataclass
class SegmentRun:
    """The dock's state while a run goes on (and after it, until the next one)."""

    image: Any
    model: Any
    #: the labels layer written into, and whether the run made it
    layer: Any
    created: bool
    region: PredictRegion
    output: str
    threshold: float
    #: what the precision resolved to, e.g. ``bf16 (auto: native bf16 CPU)``
    precision: str
    #: :data:`~napari_unet.labels.writeback.KEEP` (the corrected slices stay) or ``OVERWRITE``
    mode: str
    history: Any
    uncertain: UncertaintyRequest | None = None
    #: the description of napari's activity-panel bar (made with the first tile count: making
    #: it repaints the window, which the click handler does not wait for)
    activity: str = ""
    activity_made: bool = False
    start: float = field(default_factory=time.perf_counter)
    last_refresh: float = 0.0
    #: a tile on the slice on screen was written since the last redraw
    stale: bool = False
    #: seconds from the click to the first tile on screen
    first_tile: float | None = None
    done: int = 0
    total: int = 0
    #: the tile plan, as the core describes it
    plan: str = ""
    wrote: bool = False
    returned: bool = False
    finished: bool = False
    extras: RunExtras = field(default_factory=RunExtras)


class SegmentRunMixin:
    """The callbacks of a Segment run (main thread); the dock provides the widgets they update
    (``status``, ``progress_bar``, ``segment_button``, ``cancel_button``)."""

    viewer: Any
    worker: Any
    _run: SegmentRun | None
    _writer: ChunkedWriter | None
    _pbar: Any

    def cancel(self) -> None:
        """Stop at the next tile; the tiles done so far stay in the labels layer."""
        run = self._run
        if self.worker is not None and run is not None and not run.returned and not run.finished:
            self.worker.quit()
            self.status.setText("Cancelling at the next tile…")

    @property
    def first_tile_seconds(self) -> float | None:
        """Seconds from clicking Segment to the first tile on screen (last run)."""
        return self._run.first_tile if self._run is not None else None

    # writing into the layer -------------------------------------------------------------------
    def _protected(self) -> list:
        """Slices of the layer not to write, along z, y or x (read now: a slice painted
        meanwhile is kept too)."""
        run = self._run
        if run.mode != KEEP or run.layer.ndim < 3:
            return []
        return corrected_slices(run.layer)

    def _write_block(self, layer_region: tuple[slice, ...], values: np.ndarray) -> bool:
        """Write ``values`` into ``layer_region``, except the protected slices."""
        return write_unprotected(self._run.layer.data, layer_region, values, self._protected())

    def _on_progress(self, item: tuple[Any, np.ndarray | None]) -> None:
        update, preview = item
        run = self._run
        if run.finished or run.returned:  # a late update
            return
        run.done, run.total = update.done, update.total
        if preview is not None:
            mapped = run.region.to_layer(update.region)
            if mapped is not None:
                layer_region, out_region = mapped
                local = tuple(slice(o.start - r.start, o.stop - r.start)
                              for o, r in zip(out_region, update.region))
                run.wrote = True
                on_screen = region_on_screen(self.viewer, run.layer, layer_region)
                self._writer.push(layer_region, preview[local],
                                  then=lambda: self._tile_written(on_screen),
                                  itemsize=run.layer.data.dtype.itemsize)
        if update.stage == "postprocess":
            self.status.setText("Post-processing (objects, small-object removal)…")
        elif update.stage == "plan":
            run.plan = update.message
            self.status.setText(f"{update.message}…")
        else:
            self.progress_bar.setRange(0, max(1, update.total))
            self.progress_bar.setValue(update.done)
            self.status.setText(f"{update.done}/{update.total} tiles · "
                                f"{format_seconds(update.elapsed)} · "
                                f"{format_seconds(update.eta)} left · {run.precision}")
        if update.message and update.stage not in ("postprocess", "plan"):
            from napari.utils.notifications import show_warning

            show_warning(update.message)
        # last: napari's activity-panel bar calls processEvents, which may run later callbacks
        if update.stage not in ("postprocess", "plan") and update.total:
            self._show_activity(run)

    def _show_activity(self, run: SegmentRun) -> None:
        """napari's activity-panel bar, made with the first tile count (not at the click: making
        it repaints the window). Making and updating it call processEvents: later callbacks,
        even the end of the run, may run inside."""
        if self._pbar is None:
            if run.activity_made:  # being made: this is a later callback run inside
                return
            run.activity_made = True
            from napari.utils import progress

            bar = progress(total=run.total, desc=run.activity)
            if run.finished:  # the run ended inside: nothing else will close it
                bar.close()
                return
            self._pbar = bar
        if self._pbar.total != run.total:
            self._pbar.total = run.total
        self._pbar.update(run.done - self._pbar.n)

    def _tile_written(self, on_screen: bool = True) -> None:
        """A tile's preview is in the layer: redraw the layer, at most every REFRESH_INTERVAL,
        when this tile or one before it is on the slice on screen (a tile elsewhere in the
        stack changes nothing the user sees: it shows when they move there)."""
        run = self._run
        now = time.perf_counter()
        if run.first_tile is None and on_screen:
            run.first_tile = now - run.start
        run.stale = run.stale or on_screen
        if run.stale and (now - run.last_refresh >= REFRESH_INTERVAL or not self._writer.pending):
            run.last_refresh = now
            run.stale = False
            run.layer.refresh()

    def _on_result(self, outcome: SegmentOutcome) -> None:
        run = self._run
        run.extras = outcome.extras
        run.returned = True
        layer = run.layer
        values = np.asarray(outcome.result.data)[run.region.keep]  # a view
        if not fits_in_place(layer.data, values.dtype, outcome.largest):
            # a reused layer whose dtype cannot hold the ids (rare): a wider copy of its data
            layer.data = np.asarray(layer.data, dtype=np.promote_types(layer.data.dtype,
                                                                       values.dtype))
        self.status.setText("Writing the result into the layer…")
        # the final labels overwrite the previews in the layer's own array, a piece per
        # event-loop pass: no new array, no data event, no long block of the viewer
        self._writer.push(run.region.layer_region, values,
                          then=lambda: self._result_written(outcome.result, outcome.n_found),
                          itemsize=layer.data.dtype.itemsize)

    def _result_written(self, result: Any, n_found: int) -> None:
        run = self._run
        layer = run.layer
        if run.region.reads_all(layer.data.shape):
            layer.metadata[PROBABILITIES_KEY] = result.probabilities
        else:
            layer.metadata.pop(PROBABILITIES_KEY, None)
        self.last_result = result
        self.progress_bar.setRange(0, max(1, run.total))
        self.progress_bar.setValue(max(1, run.total))
        elapsed = time.perf_counter() - run.start
        text = (f"Done in {format_seconds(elapsed)}: {found_text(result.output, n_found)} "
                f"({run.model.label}, {run.precision}).")
        protected = self._protected()
        if protected:
            text += f" Corrected slices {short_list([plane_label(p) for p in protected])} were left as they were."
        text += " Ctrl+Z puts the layer back as it was."
        text += self._show_uncertainty(run.extras)
        for message in result.messages:
            text += f"\n{message}"
        layer.refresh()
        note_changed(layer, run.region.layer_region)  # the result, journaled
        self.status.setText(text)

    # uncertainty ------------------------------------------------------------------------------
    def _show_uncertainty(self, extras: RunExtras) -> str:
        """Put the uncertainty map and the suggested slices in place (main thread); returns
        what to add to the status line."""
        text = ""
        if extras.uncertainty is not None:
            self.uncertainty_layer = self._uncertainty_into_layer(extras.uncertainty)
            text += f" Uncertainty in {self.uncertainty_layer.name!r}."
        if extras.suggested is not None:
            set_suggested_slices(self._run.layer, extras.suggested)
            if extras.suggested:
                text += (f" Suggested slices to correct: "
                         f"{short_list([z for z, _ in extras.suggested])} (Edit dock).")
        return text

    def _uncertainty_into_layer(self, uncertainty: np.ndarray) -> Any:
        """Add the image's uncertainty layer, or update the one there (same shape)."""
        from napari.layers import Image

        run = self._run
        image = run.image
        shape = spatial_shape(image)
        name = uncertainty_name(image.name)
        values = uncertainty[run.region.keep]
        region = run.region.layer_region
        whole = covers(region, shape)
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if not isinstance(layer, Image) or tuple(layer.data.shape) != shape \
                or not isinstance(layer.data, np.ndarray):
            if layer is not None:
                self.viewer.layers.remove(layer)
            data = values if whole else np.zeros(shape, np.float32)
            if not whole:
                data[region] = values
            ndim = len(shape)
            return self.viewer.add_image(data, name=name, colormap="magma", blending="additive",
                                         contrast_limits=(0.0, 1.0), scale=image.scale[-ndim:],
                                         translate=image.translate[-ndim:])
        if whole:
            layer.data = values
        else:
            layer.data[region] = values
            layer.refresh()
        return layer

    def _refused(self, message: str, shown: bool = False) -> None:
        """A run that does not start: the reason in the status line (and a notification,
        unless ``shown`` already), the progress bar back to empty."""
        from napari.utils.notifications import show_warning

        if not shown:
            show_warning(message)
        self.status.setText(message)
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)

    # the end ----------------------------------------------------------------------------------
    def _write_failed(self, err: BaseException) -> None:
        self._on_error(err)

    def _on_error(self, err: BaseException) -> None:
        run = self._run
        message = notify_error(err, f"Segment with {run.model.label}")
        self.status.setText(message)
        self.progress_bar.setRange(0, 1)  # no "n / n tiles" of a run that failed
        self.progress_bar.setValue(0)
        if run.created and not run.wrote and run.layer in self.viewer.layers:
            self.viewer.layers.remove(run.layer)  # an empty layer would only confuse
            self.labels_layer = None

    def _on_abort(self) -> None:
        run = self._run
        run.layer.refresh()
        self.status.setText(f"Cancelled after {run.done}/{run.total} tiles; the tiles done "
                            "so far are kept (thresholded, not split into objects). Ctrl+Z puts "
                            "the layer back as it was.")

    def _on_finish(self) -> None:
        self._run.finished = True
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._writer.when_done(self._finalize)  # after the tiles and result still queued

    def _finalize(self) -> None:
        """The run is over (result written, cancelled or failed): the dock is free again."""
        if self._run.history is not None:
            self._run.history.busy = None
        self._run.layer.refresh()
        self.worker = None
        try:
            self.segment_button.setEnabled(True)
            self.cancel_button.setEnabled(False)
        except RuntimeError:
            pass
