"""The live preview: which part is re-predicted, the foreground shown, where it lies."""

from __future__ import annotations

import numpy as np

from napari_unet.training.preview import (
    preview_foreground,
    preview_slab,
    preview_translate,
)


def test_preview_slab():
    image = np.arange(20 * 4 * 4).reshape(20, 4, 4)
    flat, start = preview_slab(image[0], 7, 3, 4)
    assert flat is not None and flat.shape == (4, 4) and start == 0
    one, start = preview_slab(image, 7, 2, 4)
    assert start == 7 and np.array_equal(one, image[7])
    slab, start = preview_slab(image, 10, 3, 2)  # depth 8 around z
    assert start == 6 and slab.shape[0] == 8
    slab, start = preview_slab(image, 19, 3, 8)  # depth 16, kept inside the stack
    assert start == 4 and slab.shape[0] == 16
    slab, start = preview_slab(image[:5], 2, 3, 4)  # a stack thinner than the slab
    assert start == 0 and slab.shape[0] == 5


def test_preview_foreground_and_translate():
    probs = np.full((2, 4, 4), 0.25, np.float16)
    fg = preview_foreground(probs, "foreground", 2)
    assert fg.dtype == np.float32 and fg.shape == (4, 4) and np.allclose(fg, 0.25)
    fg = preview_foreground(probs, "semantic", 3)  # 1 - background, with a z axis
    assert fg.shape == (1, 4, 4) and np.allclose(fg, 0.75)
    assert preview_foreground(np.zeros((1, 3, 4, 4)), "foreground", 3).shape == (3, 4, 4)
    np.testing.assert_allclose(preview_translate((1.0, 2.0, 3.0), (0.5, 1, 1), 3, 4),
                               (3.0, 2.0, 3.0))
    np.testing.assert_allclose(preview_translate((2.0, 3.0), (1, 1), 2, 4), (2.0, 3.0))
