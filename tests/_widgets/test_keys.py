"""Key bindings of the docks: free keys, bound while the dock is open, released when it closes."""

from __future__ import annotations

import pytest

#: napari-animation's viewer bindings (capture, replace, delete key frame, next, previous)
NAPARI_ANIMATION = {"Alt+F", "Alt+R", "Alt+D", "Alt+A", "Alt+B"}


def _docks():
    from napari_unet._widgets import (
        EditWidget,
        ExportWidget,
        FineTuneWidget,
        SegmentWidget,
    )

    return (SegmentWidget, EditWidget, FineTuneWidget, ExportWidget)


def _all_keys() -> list[str]:
    from napari_unet._widgets import _edit, _export, _finetune, _live, _segment

    return [_segment.KEY, *_edit.KEYS.values(), _finetune.KEY, _live.KEY, _export.KEY]


def test_keys_are_free_in_napari_and_napari_animation(make_napari_viewer):
    from napari._app_model import get_app_model
    from napari.utils.key_bindings import coerce_keybinding

    viewer = make_napari_viewer()
    napari_keys = {str(kb.keybinding) for kb in get_app_model().keybindings}
    # Alt+<letter> also opens a menu whose title has that mnemonic (&File, &View, ...)
    mnemonics = {f"Alt+{a.text()[a.text().index('&') + 1].upper()}"
                 for a in viewer.window._qt_window.menuBar().actions() if "&" in a.text()}
    mnemonics.add("Alt+D")  # napari's &Debug menu (when enabled)
    ours = [str(coerce_keybinding(k)) for k in _all_keys()]
    assert len(set(ours)) == len(ours)
    taken = napari_keys | NAPARI_ANIMATION | mnemonics
    assert not set(ours) & taken, set(ours) & taken


@pytest.mark.parametrize("index", range(4))
def test_keys_released_when_the_dock_closes(make_napari_viewer, qtbot, registry, index):
    from napari.utils.key_bindings import coerce_keybinding

    cls = _docks()[index]
    viewer = make_napari_viewer()
    earlier = []

    def other_plugin(_viewer):
        earlier.append(1)

    widget = cls(viewer)
    keys = widget.keys.keys
    assert keys
    viewer.window.remove_dock_widget(viewer.window.add_dock_widget(widget, name="dock"))
    for key in keys:
        assert coerce_keybinding(key) not in viewer.keymap, key  # unbound after closing

    # a binding someone else had before is put back
    viewer.bind_key(keys[0], other_plugin)
    widget2 = cls(viewer)
    dock = viewer.window.add_dock_widget(widget2, name="dock2")
    assert viewer.keymap[coerce_keybinding(keys[0])] is not other_plugin
    viewer.window.remove_dock_widget(dock)
    assert viewer.keymap[coerce_keybinding(keys[0])] is other_plugin
    for key in keys[1:]:
        assert coerce_keybinding(key) not in viewer.keymap
    viewer.window._qt_viewer._key_map_handler.press_key(str(coerce_keybinding(keys[0])))
    assert earlier == [1]


def test_key_runs_the_dock_while_open(make_napari_viewer, qtbot, registry, notifications):
    from napari.utils.key_bindings import coerce_keybinding

    from napari_unet._widgets._export import KEY, ExportWidget

    viewer = make_napari_viewer()
    widget = ExportWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Export")
    handler = viewer.window._qt_viewer._key_map_handler
    handler.press_key(str(coerce_keybinding(KEY)))  # Export with no labels layer: says so
    assert [sev for sev, msg in notifications if "Export" in msg] == ["error"]
    viewer.window.remove_dock_widget(dock)
    handler.press_key(str(coerce_keybinding(KEY)))
    assert len(notifications) == 1
