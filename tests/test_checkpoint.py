import numpy as np
import pytest
import torch

from napari_unet.checkpoint import (
    CheckpointError,
    SegmentationModel,
    expected_channels,
    list_pretrained,
    load_checkpoint,
    load_model,
    model_from_bytes,
    model_to_bytes,
    save_checkpoint,
)
from napari_unet.inference import predict_probabilities
from napari_unet.progress import drain

from .conftest import tiny_model


def test_round_trip_keeps_weights_config_and_metadata(tmp_path):
    model = tiny_model(3, depth=2, base=2, task="foreground_boundary", inplane_only_levels=(0,))
    model.voxel_size = [0.28, 0.127, 0.127]
    model.unit = "um"
    model.history = [{"kind": "train", "iterations": 3}]
    model.normalization = {"mode": "window", "center": 40.0, "width": 400.0}
    path = save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert loaded.metadata() == model.metadata()
    for key, value in model.network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value)
    assert not loaded.network.training
    image = np.random.default_rng(0).random((6, 20, 20), dtype=np.float32)
    a = drain(predict_probabilities(image, model, device="cpu", dtype=np.float32))
    b = drain(predict_probabilities(image, loaded, device="cpu", dtype=np.float32))
    np.testing.assert_array_equal(a, b)


def test_bytes_round_trip_is_a_checkpoint(tmp_path):
    model = tiny_model(2, depth=2, base=2, task="foreground_boundary")
    model.history = [{"kind": "train", "iterations": 3}]
    data = model_to_bytes(model)
    assert isinstance(data, bytes)
    loaded = model_from_bytes(data)
    assert loaded.config == model.config and loaded.metadata() == model.metadata()
    for key, value in model.network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[key], value)
    assert not loaded.network.training
    (tmp_path / "m.pt").write_bytes(data)  # the same bytes as a file
    assert load_checkpoint(tmp_path / "m.pt").metadata() == model.metadata()
    with pytest.raises(CheckpointError, match="model data"):
        model_from_bytes(b"not a checkpoint")
    buffer = __import__("io").BytesIO()
    torch.save({"format": "napari-unet/1", "config": {}, "state_dict": {}, "metadata": Payload()},
               buffer)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        model_from_bytes(buffer.getvalue())


def test_checkpoint_loads_with_weights_only(tmp_path):
    path = save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "napari-unet/1"


class Payload:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "napari-unet/1", "config": {}, "state_dict": {}, "metadata": Payload()}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    good = save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "good.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(broken)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a napari-unet checkpoint"):
        load_checkpoint(foreign)


def test_damaged_state_dict_is_reported(tmp_path):
    path = save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["base_channels"] = 8
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "m.pt")
    before = path.read_bytes()

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model(2, depth=2, base=2, seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_task_and_channels_must_agree():
    assert expected_channels("foreground_boundary", 2) == 2
    assert expected_channels("semantic", 4) == 4
    with pytest.raises(CheckpointError, match="output channels"):
        SegmentationModel(tiny_model(2, depth=2, base=2).network, task="foreground_boundary")
    with pytest.raises(CheckpointError, match="unknown task"):
        SegmentationModel(tiny_model(2, depth=2, base=2).network, task="blobs")


def test_copy_is_independent():
    model = tiny_model(2, depth=2, base=2)
    clone = model.copy()
    with torch.no_grad():
        next(clone.network.parameters()).add_(1)
    assert not torch.equal(next(clone.network.parameters()), next(model.network.parameters()))
    assert clone.metadata() == model.metadata()


def test_load_model_by_name_or_path(tmp_path):
    path = save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "mine.pt")
    assert load_model(str(path)).name == "tiny"
    with pytest.raises(CheckpointError, match="unknown model"):
        load_model("no-such-model")
    for name in list_pretrained():
        assert load_model(name).name == name
