"""How runs are described: durations, short lists, models and results."""

from __future__ import annotations

from types import SimpleNamespace

from napari_unet.engine.messages import (
    format_seconds,
    found_text,
    model_summary,
    short_list,
)


def test_format_seconds():
    assert format_seconds(None) == "?"
    assert format_seconds(4.4) == "4 s"
    assert format_seconds(59.6) == "1 min 00 s"
    assert format_seconds(185) == "3 min 05 s"
    assert format_seconds(2 * 3600 + 7 * 60 + 20) == "2 h 07 min"


def test_short_list():
    assert short_list([2, 5]) == "2, 5"
    assert short_list(list(range(10)), limit=3) == "0, 1, 2, … (10 in all)"
    assert short_list([]) == ""


def test_model_summary_and_found_text():
    model = SimpleNamespace(spatial_dims=3, task="foreground", description="Nuclei.\nMore.")
    assert model_summary(model) == "3D · foreground · Nuclei."
    model.description = ""
    assert model_summary(model) == "3D · foreground"
    assert found_text("instances", 12) == "12 objects"
    assert found_text("labels", 1) == "1 class(es)"
