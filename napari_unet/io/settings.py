"""What the docks remember between sessions (last model, device, output, time limit).

A small JSON file, ``settings.json``, in the user's config folder
(``platformdirs.user_config_dir("napari-unet")``, e.g. ``~/.config/napari-unet`` on Linux), or
in ``$NAPARI_UNET_CONFIG_DIR`` when that is set (tests, portable installs). It is written
atomically; a missing, unreadable or damaged file counts as empty, and a file that cannot be
written is skipped (settings are a convenience, never an error).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

ENV_VAR = "NAPARI_UNET_CONFIG_DIR"
FILE_NAME = "settings.json"

log = logging.getLogger("napari_unet")


def config_dir() -> Path:
    """The folder of napari-unet's settings (not created here)."""
    folder = os.environ.get(ENV_VAR)
    if folder:
        return Path(folder).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("napari-unet", appauthor=False))


def settings_path() -> Path:
    return config_dir() / FILE_NAME


def load_settings() -> dict[str, Any]:
    """All saved settings (empty when there are none or the file is damaged)."""
    path = settings_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring the settings in %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def get_setting(key: str, default: Any = None) -> Any:
    return load_settings().get(key, default)


def save_settings(**values: Any) -> bool:
    """Merge ``values`` (JSON values; None removes a key) into the file, atomically.

    Returns False when the file could not be written (the reason is logged).
    """
    from napari_unet.io.files import atomic_write

    data = load_settings()
    for key, value in values.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = settings_path()
    text = json.dumps(data, indent=2, sort_keys=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as err:
        log.warning("could not save the settings to %s: %s", path, err)
        return False
    return True
