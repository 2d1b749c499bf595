"""The package shows its layers: each imports only from lower ones, the core no GUI toolkit, and
no module grows past 500 lines (see docs/CONTRIBUTING.md)."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "napari_unet"
GUI_MODULES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "superqt", "vispy")
#: lowest first; a module may import from its own package and from lower layers only. Packages
#: on one layer (a tuple) do not import each other.
LAYERS = ("progress", "labels", "io", "model", "engine", ("training", "bigdata"), "zoo", "_widgets", "cli")
MAX_LINES = 500


def _layer(part: str) -> int:
    for rank, layer in enumerate(LAYERS):
        if part == layer or (isinstance(layer, tuple) and part in layer):
            return rank
    raise AssertionError(f"napari_unet.{part} is in no layer of LAYERS")


def _modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py")
            if p.relative_to(PACKAGE).parts[0] not in ("pretrained", "sample_data")
            and p.relative_to(PACKAGE) != Path("__init__.py")]


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = [PACKAGE.name, *path.relative_to(PACKAGE).parent.parts]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function, as absolute names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(path, node)
            names.add(module)
            if module == PACKAGE.name:  # from napari_unet import io
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_core_modules_import_no_gui_toolkit():
    offenders = {}
    for path in _modules():
        if path.relative_to(PACKAGE).parts[0] == "_widgets":
            continue
        bad = {name.split(".")[0] for name in _imports(path)} & set(GUI_MODULES)
        if bad:
            offenders[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert offenders == {}


def _upward(path: Path, imported: set[str]) -> list[str]:
    """The imports of module ``path`` that reach a higher layer or a peer package."""
    own = path.relative_to(PACKAGE).with_suffix("").parts[0]
    bad = []
    for name in sorted(imported):
        parts = name.split(".")
        if parts[0] != PACKAGE.name or len(parts) < 2 or parts[1] == own:
            continue
        if _layer(parts[1]) >= _layer(own):
            bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    return bad


def test_no_module_imports_from_a_higher_layer_or_a_peer():
    assert [line for path in _modules() for line in _upward(path, _imports(path))] == []


def test_the_layer_rule_catches_upward_peer_and_relative_imports():
    labels = PACKAGE / "labels" / "instances.py"
    training = PACKAGE / "training" / "trainer.py"
    assert _upward(labels, {"napari_unet.engine.predict"}) != []
    assert _upward(training, {"napari_unet.bigdata.store"}) != []  # a peer on its layer
    assert _upward(training, {"napari_unet.engine.runner", "napari_unet.training.losses"}) == []
    relative = ast.parse("from ..engine import predict").body[0]
    assert _absolute(labels, relative) == "napari_unet.engine"


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_every_package_says_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        if init.parent.name in ("pretrained",):
            continue
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), init


def test_importing_the_core_loads_no_gui_toolkit():
    core = sorted(
        "napari_unet." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in _modules()
        if p.relative_to(PACKAGE).parts[0] not in ("_widgets", "cli") and p.name != "__init__.py")
    code = (
        "import importlib, sys\n"
        f"for name in {core!r} + ['napari_unet.cli.main']:\n"
        "    importlib.import_module(name)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {GUI_MODULES!r}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
