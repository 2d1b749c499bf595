"""The length unit of an image layer: saved with it, else napari's units, else the default."""

from __future__ import annotations

import pytest

from napari_unet.io.units import length_unit, unit_text


def test_a_saved_unit_wins():
    assert length_unit("mm", ["micrometer"]) == "mm"


@pytest.mark.parametrize("units, expected", [
    (["micrometer"], "um"), (["µm"], "um"), (["μm"], "um"), (["millimeter"], "mm"),
    (["nanometer"], "nm"), (["pixel"], "um"), (["px"], "um"), ([], "um"), (None, "um"),
])
def test_napari_units_are_spelled_canonically(units, expected):
    assert length_unit(None, units) == expected


def test_pint_units_and_the_default():
    pint = pytest.importorskip("pint")
    ureg = pint.UnitRegistry()
    assert unit_text(ureg.micrometer) == "µm"
    assert length_unit(None, [ureg.pixel, ureg.micrometer]) == "um"
    assert length_unit(None, [ureg.millimeter]) == "mm"
    assert length_unit(None, [ureg.pixel], default="nm") == "nm"
    assert length_unit(None, [ureg.dimensionless]) == "um"


def test_voxel_size_in_micrometres():
    from napari_unet.io.formats import voxel_size_um

    assert voxel_size_um((0.5, 0.1), "mm") == pytest.approx((500.0, 100.0))
    assert voxel_size_um((200.0,), "nm") == pytest.approx((0.2,))
    assert voxel_size_um((0.3, 0.1), "micron") == (0.3, 0.1)
    assert voxel_size_um((0.3, 0.1), None) == (0.3, 0.1)
    assert voxel_size_um((1.0, 1.0), "pixel") is None
    assert voxel_size_um(None, "um") is None
