import numpy as np
import pytest
import torch

from napari_unet.engine.predict import predict_probabilities
from napari_unet.model.checkpoint import (
    CheckpointError,
    SegmentationModel,
    expected_channels,
    list_pretrained,
    load_checkpoint,
    model_from_bytes,
    model_to_bytes,
    save_checkpoint,
)
from napari_unet.progress import drain
from napari_unet.zoo.loading import load_model

from ..conftest import tiny_model


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


# --- faults (issue 14) ----------------------------------------------------------------------


def test_shipped_models_and_their_folder_are_never_written(tmp_path):
    import hashlib

    shipped = list_pretrained()
    folder = next(iter(shipped.values())).parent
    before = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in shipped.items()}
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    alias = tmp_path / "alias.pt"
    alias.symlink_to(shipped["cells-3d"])
    model = tiny_model(2, depth=2, base=2)
    for target in (shipped["cells-3d"], folder / "new.pt", link / "new.pt", folder / "sub" / ".." / "x.pt", alias):
        with pytest.raises(CheckpointError, match=r"^refusing to write .*shipped with napari-unet"):
            save_checkpoint(model, target)
    assert not (folder / "new.pt").exists() and not (folder / "x.pt").exists()
    assert before == {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in list_pretrained().items()}
    assert save_checkpoint(model, tmp_path / "fine.pt").is_file()


def test_text_file_and_folder_given_as_model(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("(not a model)\n")
    with pytest.raises(CheckpointError, match=r"^notes.pt is not a checkpoint") as info:
        load_checkpoint(text)
    assert "pickled" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"is a folder, not a model file"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"^model data is not a checkpoint"):
        model_from_bytes(b"hello")


def test_damaged_checkpoint_message_is_one_line_with_the_details_chained(tmp_path):
    path = save_checkpoint(tiny_model(2, depth=2, base=2), tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["config"]["base_channels"] = 8
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300 and message.endswith(" ...")
    assert message.startswith("m.pt is damaged: Error(s) in loading state_dict for UNet: size mismatch")
    assert str(info.value.__cause__).count("size mismatch") > 10
