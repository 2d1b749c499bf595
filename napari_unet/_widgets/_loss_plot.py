"""The Fine-tune dock's live curve: a small matplotlib figure of a
:class:`~napari_unet.training.loss_curve.LossCurve`."""

from __future__ import annotations

from typing import Any

from napari_unet.training.loss_curve import LossCurve


class LossPlot:
    """A small matplotlib figure in the dock: training loss and validation Dice.

    The axes are fixed for the run (x: the time limit or iteration count), so updates only
    redraw the two lines (blitting, a few ms) instead of the whole figure. The numbers are
    :attr:`curve`'s.
    """

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.curve = LossCurve()
        self.figure = Figure(figsize=(3.6, 2.2), dpi=80, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        # a fixed height: a status line that wraps differently must not resize the canvas
        # (every resize is a full figure redraw, ~50 ms, on the main thread)
        self.canvas.setFixedHeight(150)
        self.canvas.setToolTip("Training loss relative to its first value (blue, left) and "
                               "validation Dice (orange, right)")
        self.ax = self.figure.add_subplot(111)
        self.ax.set_ylabel("loss / first loss", fontsize=8)
        self.ax.tick_params(labelsize=7)
        self.dice_ax = self.ax.twinx()
        self.dice_ax.set_ylim(0, 1)
        self.dice_ax.set_ylabel("val. Dice", fontsize=8)
        self.dice_ax.tick_params(labelsize=7)
        (self.loss_line,) = self.ax.plot([], [], color="tab:blue", lw=1.2, animated=True)
        (self.dice_line,) = self.dice_ax.plot([], [], color="tab:orange", marker="o", ms=3, lw=1,
                                              animated=True)
        self._background = None
        self.canvas.mpl_connect("draw_event", self._on_full_draw)
        self._drawn_axes: tuple[Any, ...] | None = None
        self.clear()
        self._full_redraw()
        # the layout is computed once; constrained layout on every full redraw costs ~0.3 s
        self.figure.set_layout_engine("none")

    # the curve's points (read by tests and benchmarks)
    @property
    def x(self) -> list[float]:
        return self.curve.x

    @property
    def losses(self) -> list[float]:
        return self.curve.losses

    @property
    def dice_x(self) -> list[float]:
        return self.curve.dice_x

    @property
    def dice(self) -> list[float]:
        return self.curve.dice

    def clear(self, time_limit: float | None = None, iterations: int | None = None) -> None:
        """Empty the plot; x is seconds when there is a time limit, else iterations."""
        curve = self.curve
        curve.reset(time_limit, iterations)
        if curve.axes == self._drawn_axes and self._background is not None:
            self._blit()  # same axes as the last run: only the lines go (no full redraw)
            return
        self._drawn_axes = curve.axes
        self.ax.set_xlabel("seconds" if curve.by_time else "iteration", fontsize=8)
        self.ax.set_xlim(0, curve.x_max)
        self.ax.set_ylim(0, curve.y_max)
        # a full matplotlib draw takes ~50 ms: the timer's next draw() does it in its own
        # event-loop pass, not in the click (which also paints the new preview layer)
        self._background = None

    def _full_redraw(self) -> None:
        self._set_lines()
        self.canvas.draw()  # triggers _on_full_draw (background + lines)

    def _set_lines(self) -> None:
        curve = self.curve
        self.loss_line.set_data(curve.x, curve.losses)
        self.dice_line.set_data(curve.dice_x, curve.dice)

    def _on_full_draw(self, _event: Any = None) -> None:
        self._background = self.canvas.copy_from_bbox(self.figure.bbox)
        self._draw_lines()

    def _draw_lines(self) -> None:
        self.ax.draw_artist(self.loss_line)
        self.dice_ax.draw_artist(self.dice_line)

    def add(self, stats: Any) -> None:
        self.curve.add(stats)

    def draw(self) -> None:
        """Show new points (called by a timer, at most every PLOT_INTERVAL)."""
        curve = self.curve
        if not curve.taken() and self._background is not None:
            return
        rescale = False
        if curve.grow_y():
            self.ax.set_ylim(0, curve.y_max)
            rescale = True
        if curve.grow_x():  # ran past the plan (e.g. no limit given)
            self.ax.set_xlim(0, curve.x_max)
            rescale = True
        if rescale or self._background is None:
            self._drawn_axes = curve.axes
            self._full_redraw()
            return
        self._blit()

    def _blit(self) -> None:
        self._set_lines()
        self.canvas.restore_region(self._background)
        self._draw_lines()
        # update(), not blit(): blit repaints at once, i.e. one more flush of the whole window
        # (a GL composition in napari); update() joins the dock's other changes in one repaint
        self.canvas.update()
