"""bioimage.io packages: our export validates and re-imports exactly; a foreign package runs
with blended tiles; a broken package gets a one-line error."""

from __future__ import annotations

import types
import zipfile

import numpy as np
import pytest
import tifffile
import torch

from napari_unet.cli.main import main
from napari_unet.engine.predict import predict_probabilities
from napari_unet.model.checkpoint import CheckpointError, save_checkpoint
from napari_unet.progress import drain
from napari_unet.zoo.loading import load_model

from ..conftest import tiny_model

spec = pytest.importorskip("bioimageio.spec")
pytest.importorskip("onnxruntime")

from bioimageio.spec.model import v0_5 as v  # noqa: E402

from napari_unet.zoo import (
    description,
    foreign,  # noqa: E402
    network,
    predict,
)
from napari_unet.zoo import export as zoo_export


def blobs(shape, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).reshape(len(shape), -1).T
    image = np.zeros(int(np.prod(shape)), np.float32)
    for _ in range(8):
        centre = rng.uniform(0, shape)
        image += 800 * np.exp(-((grid - centre) ** 2).sum(1) / 40)
    return (image.reshape(shape) + rng.normal(100, 10, shape)).astype(np.uint16)


def exported(tmp_path, model, image, **options):
    return zoo_export.export_bioimageio(model, tmp_path / "model.zip", test_image=image, **options)


# --- our own packages ---------------------------------------------------------------------

def test_export_is_valid_and_passes_the_bioimageio_core_test(tmp_path):
    core = pytest.importorskip("bioimageio.core")
    model = tiny_model(2, depth=2, task="foreground_boundary")
    model.voxel_size, model.unit = [0.5, 0.25], "um"
    report = exported(tmp_path, model, blobs((64, 72)))
    assert report.status == "valid-format"
    assert report.weight_formats == ["pytorch_state_dict", "torchscript", "onnx"]
    names = set(zipfile.ZipFile(report.path).namelist())
    assert {"rdf.yaml", "weights.pt", "weights_torchscript.pt", "weights.onnx", "models.py",
            "test_input.npy", "test_output.npy", "cover.png", "README.md"} <= names
    descr = spec.load_model_description(report.path)
    axes = {str(a.id): a for a in descr.inputs[0].axes}
    assert (axes["y"].scale, axes["x"].scale, axes["x"].unit) == (0.5, 0.25, "micrometer")
    steps = [str(s.id) for s in descr.inputs[0].preprocessing]
    assert [s for s in steps if s != "ensure_dtype"] == ["scale_range"]
    assert descr.inputs[0].preprocessing[1].kwargs.max_percentile == 99.8
    assert [str(s.id) for s in descr.outputs[0].postprocessing if s.id != "ensure_dtype"] == ["sigmoid"]
    summary = core.test_model(report.path, devices=["cpu"])
    assert summary.status == "passed", [(d.name, [e.msg for e in d.errors]) for d in summary.details
                                        if d.status != "passed"]


@pytest.mark.parametrize("dims, task, extra", [
    (2, "foreground", {}),
    (3, "semantic", {"class_names": ["background", "a", "b"], "inplane_only_levels": (0,)}),
])
def test_our_export_reimports_exactly(tmp_path, dims, task, extra):
    model = tiny_model(dims, depth=2, task=task, **extra)
    model.history = [{"iterations": 3, "best_score": 0.5}]
    image = blobs((24, 40, 40) if dims == 3 else (64, 64))
    report = exported(tmp_path, model, image, weight_formats=["pytorch_state_dict"])
    for source in (report.path, _unpacked(report.path, tmp_path / "unpacked")):
        again = load_model(source)
        assert type(again) is type(model) and again.metadata() == model.metadata()
        assert again.config == model.config
        for key, value in model.network.state_dict().items():
            assert torch.equal(value, again.network.state_dict()[key])
        options = dict(device="cpu", precision="fp32", dtype=np.float32)
        expected = drain(predict_probabilities(image, model, **options))
        got = drain(predict_probabilities(image, again, **options))
        assert float(np.max(np.abs(got - expected))) <= 1e-4
    descr = spec.load_model_description(report.path)
    if task == "semantic":
        steps = [str(s.id) for s in descr.outputs[0].postprocessing]
        assert [s for s in steps if s != "ensure_dtype"] == ["softmax"]
        assert [str(c) for c in descr.outputs[0].axes[1].channel_names] == ["background", "a", "b"]


@pytest.mark.parametrize("architecture", ["unet", "resunet", "attention", "unetpp"])
def test_every_architecture_exports_in_every_weight_format(tmp_path, architecture):
    """Each weight format of the package (the state dict through the shipped ``models.py`` run
    as a file of its own, as bioimage.io tools do) reproduces the test output."""
    model = tiny_model(2, depth=3, architecture=architecture)
    report = exported(tmp_path, model, blobs((48, 56)), validate=False)
    descr = spec.load_model_description(report.path)
    raw = np.load(description._file_bytes_io(descr.inputs[0].test_tensor.source))
    expected = np.load(description._file_bytes_io(descr.outputs[0].test_tensor.source))
    x = torch.from_numpy(zoo_export._normalize_test_input(model, raw))
    w = descr.weights
    runners = {"pytorch_state_dict": network._state_dict_module(w.pytorch_state_dict),
               "torchscript": torch.jit.load(description._file_bytes_io(w.torchscript.source)),
               "onnx": __import__("napari_unet.zoo.onnx").zoo.onnx.OnnxModule(
                   description._file_bytes(w.onnx.source))}
    for name, runner in runners.items():
        with torch.no_grad():
            got = torch.sigmoid(runner(x)).numpy()
        assert float(np.max(np.abs(got - expected))) <= 1e-4, name


def _unpacked(package, folder):
    with zipfile.ZipFile(package) as archive:
        archive.extractall(folder)
    return folder / "rdf.yaml"


def test_cli_round_trip_predicts_like_the_checkpoint(tmp_path, capsys):
    model = tiny_model(2, depth=2, task="foreground_boundary")
    checkpoint = save_checkpoint(model, tmp_path / "tiny.pt")
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, blobs((70, 66)))
    package = tmp_path / "tiny.zip"
    assert main(["export", str(checkpoint), "-o", str(package), "--test-image", str(image),
                 "--weights", "pytorch_state_dict,onnx"]) == 0
    out = capsys.readouterr().out
    assert "valid-format" in out and "pytorch_state_dict, onnx" in out
    for name, source in (("a.tif", checkpoint), ("b.tif", package)):
        assert main(["predict", str(image), "-o", str(tmp_path / name), "--model", str(source),
                     "--device", "cpu", "--precision", "fp32", "--output", "instances"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "a.tif"),
                                  tifffile.imread(tmp_path / "b.tif"))


# --- a package made elsewhere -------------------------------------------------------------

ARCHITECTURE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """Not a napari-unet network: two 3x3 convolutions (receptive radius 2)."""

    def __init__(self, channels=4, out=1):
        super().__init__()
        self.a = nn.Conv2d(1, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))
'''


def _tiny_net(out=1):
    module = types.ModuleType("tiny_architecture")
    exec(ARCHITECTURE, module.__dict__)
    torch.manual_seed(3)
    return module.TinyNet(channels=4, out=out).eval()


def _zmuv(image):
    image = image.astype(np.float32)
    return (image - image.mean()) / (image.std() + 1e-6)


def foreign_package(folder, weight_format, halo=4, classes=None):
    """A Zoo package of a tiny torch model that is not ours (built as another tool would):
    one foreground channel with a sigmoid, or ``classes`` with a softmax."""
    folder.mkdir(parents=True, exist_ok=True)
    net = _tiny_net(len(classes) if classes else 1)
    raw = blobs((48, 40), seed=1).astype(np.float32)[None, None]
    with torch.no_grad():
        logits = net(torch.from_numpy(_zmuv(raw)))
        expected = (torch.softmax(logits, 1) if classes else torch.sigmoid(logits)).numpy()
    np.save(folder / "in.npy", raw)
    np.save(folder / "out.npy", expected)
    weights = {}
    if weight_format == "pytorch_state_dict":
        (folder / "tiny_architecture.py").write_text(ARCHITECTURE)
        torch.save(net.state_dict(), folder / "state.pt")
        weights["pytorch_state_dict"] = v.PytorchStateDictWeightsDescr(
            source=folder / "state.pt", pytorch_version=v.Version("2.5"),
            architecture=v.ArchitectureFromFileDescr(source=folder / "tiny_architecture.py",
                                                     callable=v.Identifier("TinyNet"),
                                                     kwargs={"channels": 4,
                                                             "out": len(classes or "x")}))
    elif weight_format == "torchscript":
        torch.jit.trace(net, torch.from_numpy(raw)).save(str(folder / "tiny.pt"))
        weights["torchscript"] = v.TorchscriptWeightsDescr(source=folder / "tiny.pt",
                                                            pytorch_version=v.Version("2.5"))
    else:
        dynamic = {0: "b", 2: "y", 3: "x"}
        torch.onnx.export(net, (torch.from_numpy(raw),), str(folder / "tiny.onnx"), dynamo=False,
                          input_names=["input"], output_names=["output"], opset_version=17,
                          dynamic_axes={"input": dynamic, "output": dynamic})
        weights["onnx"] = v.OnnxWeightsDescr(source=folder / "tiny.onnx", opset_version=17)
    size = v.ParameterizedSize(min=16, step=8)
    descr = v.ModelDescr(
        name="tiny foreign net", description="two convolutions", license=v.LicenseId("MIT"),
        authors=[v.Author(name="someone else")],
        cite=[v.CiteEntry(text="none", url=v.HttpUrl("https://example.com"))],
        inputs=[v.InputTensorDescr(
            id=v.TensorId("image"), axes=[
                v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier("raw")]),
                v.SpaceInputAxis(id=v.AxisId("y"), size=size),
                v.SpaceInputAxis(id=v.AxisId("x"), size=size)],
            test_tensor=v.FileDescr(source=folder / "in.npy"),
            preprocessing=[v.ZeroMeanUnitVarianceDescr()])],
        outputs=[v.OutputTensorDescr(
            id=v.TensorId("mask"), axes=[
                v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier(c) for c in classes or ["fg"]]),
                *(v.SpaceOutputAxisWithHalo(id=v.AxisId(a), halo=halo, size=v.SizeReference(
                    tensor_id=v.TensorId("image"), axis_id=v.AxisId(a))) for a in "yx")],
            test_tensor=v.FileDescr(source=folder / "out.npy"),
            postprocessing=[v.SoftmaxDescr(kwargs=v.SoftmaxKwargs(axis=v.AxisId("channel")))
                            if classes else v.SigmoidDescr()])],
        weights=v.WeightsDescr(**weights))
    return spec.save_bioimageio_package(descr, output_path=folder / "tiny_foreign.zip")


@pytest.mark.parametrize("weight_format", ["torchscript", "onnx", "pytorch_state_dict"])
def test_foreign_package_runs_with_blended_tiles_using_its_halo(tmp_path, weight_format):
    package = foreign_package(tmp_path / "pkg", weight_format)
    model = load_model(package)
    assert isinstance(model, foreign.ForeignModel) and model.task == "foreground"
    assert model.halo == (4, 4) and model.notes[0] == f"{weight_format} weights"
    image = blobs((96, 88), seed=2)  # valid sizes: min 16 + steps of 8
    progress = []
    result = drain(predict.segment_model(image, model, output="labels", device="cpu",
                                     tile_shape=(72, 72), min_size=0), progress.append)
    plan = progress[0].message
    assert "blended overlap" in plan and "halo (4, 4)" in plan
    assert sum(p.stage == "predict" and p.region is not None for p in progress) == 16  # 4 x 4 tiles
    with torch.no_grad():
        reference = torch.sigmoid(_tiny_net()(torch.from_numpy(_zmuv(image))[None, None]))[0].numpy()
    # the tiles' overlaps were blended and their halos cropped: the same as one pass, except
    # the two last rows and columns (a border tile padded to the model's size step)
    inner = (slice(None), slice(0, -2), slice(0, -2))
    assert float(np.max(np.abs(result.probabilities[inner] - reference[inner]))) <= 1e-5
    np.testing.assert_array_equal(result.data[inner[1:]], (reference[0] > 0.5)[inner[1:]])


def test_foreign_softmax_package_gives_classes(tmp_path):
    model = load_model(foreign_package(tmp_path / "pkg", "onnx", classes=["bg", "nucleus", "edge"]))
    assert model.task == "semantic" and model.class_names == ["bg", "nucleus", "edge"]
    image = blobs((40, 48), seed=4)
    result = drain(predict.segment_model(image, model, output="labels", device="cpu"))
    with torch.no_grad():
        logits = _tiny_net(3)(torch.from_numpy(_zmuv(image))[None, None])[0]
    np.testing.assert_allclose(result.probabilities, torch.softmax(logits, 0).numpy(), atol=1e-5)
    np.testing.assert_array_equal(result.data, logits.argmax(0).numpy())


def test_blending_weights_sum_to_one_across_a_seam():
    spatial, overlap = (40,), (4,)
    left = predict._ramp((slice(0, 24),), spatial, overlap)  # core 0..20 plus overlap 4
    right = predict._ramp((slice(16, 40),), spatial, overlap)  # core 20..40 minus overlap 4
    total = np.zeros(40)
    total[0:24] += left
    total[16:40] += right
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert left[0] == 1 and right[-1] == 1  # no ramp at the image border
    assert 0 < left[-1] < 0.2 and 0 < right[0] < 0.2


# --- broken packages --------------------------------------------------------------------------

def test_broken_packages_get_one_line_errors(tmp_path, capsys):
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    not_a_model = tmp_path / "empty.zip"
    with zipfile.ZipFile(not_a_model, "w") as archive:
        archive.writestr("rdf.yaml", "type: model\nformat_version: 0.5.4\nname: half a model\n")
    unpacked = _unpacked(foreign_package(tmp_path / "pkg", "torchscript"), tmp_path / "unpacked")
    (tmp_path / "unpacked" / "tiny.pt").write_bytes(b"damaged weights")
    rdf_text = unpacked.read_text()  # without its sha256 (else that mismatch is the message)
    unpacked.write_text("\n".join(line for line in rdf_text.splitlines() if "sha256" not in line))
    for source, message in ((garbage, "not a bioimage.io package"),
                            (not_a_model, "not a valid bioimage.io model"),
                            (unpacked, "no weights could be loaded"),
                            (tmp_path / "missing.zip", "not found")):
        with pytest.raises(CheckpointError, match=message) as info:
            load_model(source)
        assert "\n" not in str(info.value)
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, blobs((32, 32)))
    assert main(["predict", str(image), "-o", str(tmp_path / "p.tif"), "--model", str(not_a_model)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a valid bioimage.io model" in err
