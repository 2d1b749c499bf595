"""Small Qt helpers shared by the docks."""

from __future__ import annotations


def test_progress_bar_repaints_with_the_window_not_at_once(qtbot):
    from napari_unet._widgets._common import ProgressBar

    class Counting(ProgressBar):
        paints = 0

        def paintEvent(self, event):  # noqa: N802 - Qt API
            Counting.paints += 1
            super().paintEvent(event)

    bar = Counting()
    bar.setRange(0, 100)
    qtbot.addWidget(bar)
    bar.show()
    qtbot.waitExposed(bar)
    qtbot.waitUntil(lambda: Counting.paints > 0)
    before = Counting.paints
    bar.setValue(50)  # QProgressBar.setValue would repaint() here, synchronously
    assert bar.value() == 50 and Counting.paints == before
    qtbot.waitUntil(lambda: Counting.paints > before)  # repainted in the next paint pass
    bar.setValue(50)  # no change: nothing to do
    assert bar.value() == 50
