"""The model list the docks share: shipped models, files, in-memory versions, the last choice."""

from __future__ import annotations

import pytest

from napari_unet.io.settings import load_settings
from napari_unet.model.checkpoint import (
    CheckpointError,
    list_pretrained,
    save_checkpoint,
)
from napari_unet.zoo.registry import (
    ModelEntry,
    ModelRegistry,
    remember_model,
    restore_last_model,
)

from ..conftest import tiny_model


@pytest.fixture
def model_file(tmp_path):
    return save_checkpoint(tiny_model(2), tmp_path / "tiny.pt")


def test_shipped_models_are_listed_without_loading():
    registry = ModelRegistry()
    shipped = list(list_pretrained())
    assert registry.keys() == shipped and len(registry) == len(shipped)
    assert registry.current == (shipped[0] if shipped else None)
    assert all(e.source == "shipped" and e.model is None for e in registry.entries())


def test_files_are_loaded_once_and_selected(model_file):
    registry = ModelRegistry()
    changed, selected = [], []
    registry.changed.connect(lambda: changed.append(1))
    registry.current_changed.connect(selected.append)
    key = registry.add_file(model_file)
    assert registry.current == key and selected == [key] and changed == [1]
    entry = registry.entry(key)
    assert entry.source == "file" and entry.path == model_file and entry.model is not None
    assert entry.display == f"{key}  ({model_file.name})"
    assert registry.get() is entry.model
    assert registry.add_file(model_file) == key and len(changed) == 1  # the same file: reused


def test_in_memory_versions_get_unique_keys_and_fall_back_to_their_parent(model_file):
    registry = ModelRegistry()
    parent = registry.add_file(model_file)
    model = registry.get(parent)
    first = registry.add_model(model, parent_key=parent)
    second = registry.add_model(model, parent_key=parent, source="new")
    assert len({parent, first, second}) == 3 and second.endswith("(3)")
    assert registry.entry(first).display.endswith("(fine-tuned)")
    assert registry.entry(second).display.endswith("(new, untrained)")
    registry.remove(second)
    assert registry.current == parent and second not in registry
    registry.remove("not there")  # nothing to do
    with pytest.raises(CheckpointError):
        registry.current = "not there"
    with pytest.raises(CheckpointError):
        registry.entry("not there")
    registry.reset()
    assert parent not in registry and first not in registry


def test_no_model_selected_is_a_checkpoint_error():
    registry = ModelRegistry()
    registry._entries.clear()
    registry._current = None
    with pytest.raises(CheckpointError, match="no model selected"):
        registry.get()


def test_entry_display_of_a_shipped_model():
    assert ModelEntry("nuclei-2d", "shipped").display == "nuclei-2d"


def test_the_last_file_comes_back_in_the_next_session(model_file, monkeypatch):
    from napari_unet.zoo import registry as module

    registry = ModelRegistry()
    monkeypatch.setattr(module, "_REGISTRY", registry)
    key = registry.add_file(model_file)
    remember_model(key)
    assert load_settings()["model_file"] == str(model_file.resolve())
    in_memory = registry.add_model(registry.get(key))
    remember_model(in_memory)  # a version held in memory cannot come back: not saved
    assert load_settings()["model_file"] == str(model_file.resolve())
    fresh = ModelRegistry()
    assert restore_last_model(fresh) == fresh.current == key

    model_file.write_bytes(b"broken")  # a file that no longer loads is skipped
    assert restore_last_model(ModelRegistry()) is None


def test_a_shipped_model_comes_back_by_name(monkeypatch):
    from napari_unet.zoo import registry as module

    registry = ModelRegistry()
    if len(registry) < 2:
        pytest.skip("needs two shipped models")
    monkeypatch.setattr(module, "_REGISTRY", registry)
    name = registry.keys()[1]
    registry.current = name
    remember_model(name)
    assert load_settings()["model"] == name and load_settings().get("model_file") is None
    assert restore_last_model(ModelRegistry()) == name
