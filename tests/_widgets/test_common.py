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
    qtbot.wait(50)
    before = Counting.paints
    bar.setRange(0, 0)  # below the value: QProgressBar.reset() would repaint() here (a click)
    assert bar.maximum() == 0 and Counting.paints == before
    qtbot.waitUntil(lambda: Counting.paints > before)


def test_pieces_cover_the_block_in_small_parts():
    import numpy as np

    from napari_unet._widgets._common import pieces

    values = np.arange(3 * 50 * 40, dtype=np.uint32).reshape(3, 50, 40)
    out = np.zeros((6, 60, 40), np.uint32)
    region = (slice(2, 5), slice(7, 57), slice(0, 40))
    parts = list(pieces(region, values, piece_bytes=40 * 4 * 8))  # 8 rows of a slice
    for where, part in parts:
        assert part.nbytes <= 40 * 4 * 8
        out[where] = part
    np.testing.assert_array_equal(out[region], values)
    assert out.sum() == values.sum() and len(parts) == 3 * 7
    assert list(pieces(region, values, piece_bytes=values.nbytes)) [0][1] is values


def test_chunked_writer_spreads_a_block_over_event_loop_passes(qtbot):
    import numpy as np

    from napari_unet._widgets._common import ChunkedWriter

    target = np.zeros((4, 64, 64), np.uint16)
    writes, done = [], []

    def write(region, values):
        writes.append(region)
        target[region] = values

    passes = []
    writer = ChunkedWriter(write, budget_s=0.0, piece_bytes=64 * 64 * 2)  # a slice per pass
    writer._timer.timeout.connect(lambda: passes.append(len(writes)))
    block = np.ones((4, 64, 64), np.uint16)
    writer.push((slice(0, 4), slice(0, 64), slice(0, 64)), block, then=lambda: done.append(1))
    writer.when_done(lambda: done.append(2))
    assert writer.pending and not writes  # nothing written in the call itself
    qtbot.waitUntil(lambda: done == [1, 2])
    assert target.all() and len(writes) == 4
    assert passes[:4] == [1, 2, 3, 4]  # one slice per event-loop pass
    writer.when_done(lambda: done.append(3))  # nothing queued: at once
    assert done == [1, 2, 3]
