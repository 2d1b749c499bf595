"""ONNX export: dynamic batch and spatial axes, same numbers as torch (onnxruntime)."""

from __future__ import annotations

import pytest
import torch

from napari_unet.cli.main import main
from napari_unet.model.checkpoint import save_checkpoint

from ..conftest import tiny_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from napari_unet.zoo.onnx import (
    OnnxExportError,
    OnnxModule,
    export_onnx,
    exportable_network,
    read_metadata,
)


@pytest.mark.parametrize("dims, config", [
    (2, {}),
    (3, {"inplane_only_levels": (0,)}),
])
def test_onnx_matches_torch_on_sizes_that_need_padding(tmp_path, dims, config):
    model = tiny_model(dims, depth=3, task="foreground_boundary", **config)
    path = export_onnx(model, tmp_path / "tiny.onnx")
    runner = OnnxModule(path)
    network = exportable_network(model)
    divisor = model.config.divisor()
    # odd sizes (padded inside the graph), a batch of three, and sizes on the grid
    shapes = [(1, 1, *(d * 3 + 1 for d in divisor)), (3, 1, *(d * 2 + 3 for d in divisor)),
              (1, 1, *(d * 4 for d in divisor))]
    for shape in shapes:
        x = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            expected = model.network.eval()(x)
            fused = network(x)
        got = runner(x)
        assert got.shape == expected.shape == x.shape[:1] + (2,) + x.shape[2:]
        assert float((got - expected).abs().max()) <= 1e-4
        assert float((got - fused).abs().max()) <= 1e-4
    meta = read_metadata(path)
    assert meta["task"] == "foreground_boundary" and meta["config"]["spatial_dims"] == dims
    assert meta["normalization"] == model.normalization


def test_cli_export_onnx_and_refusals(tmp_path, capsys):
    checkpoint = save_checkpoint(tiny_model(2, depth=2), tmp_path / "tiny.pt")
    out = tmp_path / "tiny.onnx"
    assert main(["export", str(checkpoint), "-o", str(out), "--format", "onnx"]) == 0
    assert out.is_file() and "onnxruntime" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "x.onnx")]) == 0  # auto format
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "x.zip"), "--format", "onnx"]) == 2
    assert "writes a .onnx file" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "-o", str(tmp_path / "x.bin")]) == 2
    err = capsys.readouterr().err
    assert "cannot tell the format" in err and len(err.strip().splitlines()) == 1


def test_a_wrong_export_is_refused_not_written(tmp_path, monkeypatch):
    import napari_unet.zoo.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "compare_with_torch", lambda *a, **k: 0.5)
    with pytest.raises(OnnxExportError, match="differs from torch by 0.5"):
        export_onnx(tiny_model(2, depth=2), tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())

