"""``predict --stitch-threshold``: a 2D model's instances on a stack, stitched or per slice."""

import numpy as np
import tifffile

from napari_unet.cli.main import main
from napari_unet.engine.predict import segment
from napari_unet.io.readers import read_image
from napari_unet.model.checkpoint import load_checkpoint, save_checkpoint
from napari_unet.progress import drain

from ..conftest import tiny_model


def test_stitch_threshold_option(tmp_path):
    model_path = save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "tiny.pt")
    yy, xx = np.indices((40, 50))
    stack = np.stack([((yy - 20) ** 2 + (xx - 10 - z) ** 2 < 60) * 900 + 50 for z in range(8)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack.astype(np.uint16))
    model = load_checkpoint(model_path)
    probs = drain(segment(stack, model, output="probabilities", device="cpu")).data
    threshold = f"{float(np.quantile(probs, 0.85)):.3f}"
    for stitch in ("0", "0.25"):
        out = tmp_path / f"out_{stitch}.tif"
        assert main(["predict", str(path), "-o", str(out), "--model", str(model_path),
                     "--device", "cpu", "--output", "instances", "--threshold", threshold,
                     "--min-size", "0", "--stitch-threshold", stitch]) == 0
        written = read_image(out).data
        expected = drain(segment(stack, model, output="instances", device="cpu",
                                 threshold=float(threshold), min_size=0,
                                 stitch_threshold=float(stitch))).data
        np.testing.assert_array_equal(written, expected)
        assert written.max() > 0
        spans = [np.count_nonzero((written == i).any(axis=(1, 2))) for i in np.unique(written)[1:]]
        if stitch == "0":
            assert max(spans) == 1
    assert main(["predict", str(path), "-o", str(tmp_path / "x.tif"), "--model", str(model_path),
                 "--stitch-threshold", "2"]) != 0  # out of 0..1: a usage error
