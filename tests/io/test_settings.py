"""Saved settings: a JSON file in the config folder, written atomically, damage tolerated."""

from __future__ import annotations

import json

from napari_unet.io import settings


def test_settings_round_trip_in_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path / "cfg"))
    assert settings.load_settings() == {} and settings.get_setting("device", "auto") == "auto"
    assert settings.save_settings(device="cpu", time_limit=120, model="nuclei-2d")
    assert settings.save_settings(model=None, model_file="/data/m.pt")  # None removes a key
    path = tmp_path / "cfg" / "settings.json"
    assert json.loads(path.read_text()) == {"device": "cpu", "time_limit": 120,
                                            "model_file": "/data/m.pt"}
    assert settings.get_setting("time_limit") == 120
    assert [p.name for p in path.parent.iterdir()] == ["settings.json"]  # no temporary left


def test_damaged_or_unwritable_settings_are_not_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.ENV_VAR, str(tmp_path))
    (tmp_path / "settings.json").write_text("{not json")
    assert settings.load_settings() == {}
    assert settings.save_settings(device="cpu")  # replaces the damaged file
    assert settings.load_settings() == {"device": "cpu"}
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(settings.ENV_VAR, str(blocker / "sub"))  # a folder under a file
    assert settings.save_settings(device="cuda") is False


def test_default_folder_is_the_user_config_dir(monkeypatch):
    from platformdirs import user_config_dir

    monkeypatch.delenv(settings.ENV_VAR, raising=False)
    assert str(settings.config_dir()) == user_config_dir("napari-unet", appauthor=False)
