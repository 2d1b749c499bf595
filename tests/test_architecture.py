"""The core never imports Qt, napari or magicgui; only the widget package does."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "napari_unet"
GUI_MODULES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt", "vispy")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_modules_import_no_gui_toolkit():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if "_widgets" in path.relative_to(PACKAGE).parts:
            continue
        bad = _imported_modules(path) & set(GUI_MODULES)
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert offenders == {}


def test_importing_the_core_loads_no_gui_toolkit():
    code = (
        "import sys\n"
        "import napari_unet.models, napari_unet.checkpoint, napari_unet.tiling, napari_unet.inference\n"
        "import napari_unet.postprocess, napari_unet.metrics, napari_unet.io, napari_unet.cli\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {GUI_MODULES!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
