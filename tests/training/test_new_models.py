"""New models: specs from a labels table and voxel size, class names, building one."""

from __future__ import annotations

import pytest

from napari_unet.training.new_models import (
    CT_WINDOW_NORMALIZATION,
    PERCENTILE_NORMALIZATION,
    NewModelSpec,
    build_new_model,
    class_list,
    class_names_from_columns,
    inplane_levels,
    model_name,
    new_model_text,
    parse_class_names,
    spec_for_labels,
)


def test_class_names_from_a_table():
    assert class_names_from_columns({}) == {}
    table = {"index": [0, 1, 3], "name": ["background", "spleen", " liver "]}
    assert class_names_from_columns(table) == {1: "spleen", 3: "liver"}
    # no index column: the row number; no known name column: the first text column
    assert class_names_from_columns({"label": ["x", "nucleus"]}) == {1: "nucleus"}
    assert class_names_from_columns({"index": [1, "a"], "Organ": ["kidney", "lung"]}) == \
        {1: "kidney"}
    assert class_names_from_columns({"index": [1, 2], "size": [4, 5]}) == {}


def test_names_and_lists():
    assert class_list({1: "a", 3: "c"}) == ["background", "a", "class_2", "c"]
    assert class_list(["a", "b"]) == ["background", "a", "b"]
    assert parse_class_names("liver, spleen;\nkidney,,") == ["liver", "spleen", "kidney"]
    assert model_name(" my labels (2) ") == "my-labels-2"
    assert model_name("???") == "model"
    assert inplane_levels(3, 2, 4) == (0, 1) and inplane_levels(3, 9, 3) == (0, 1)
    assert inplane_levels(2, 2, 4) == ()


def test_spec_for_labels():
    spec = spec_for_labels("nuclei labels", (0.28, 0.127, 0.127), 3, "foreground_boundary")
    assert spec.name == "nuclei-labels-model" and spec.inplane_only_levels == (0,)
    assert spec.voxel_size == pytest.approx((0.28, 0.127, 0.127)) and spec.depth == 4
    assert spec.normalization == PERCENTILE_NORMALIZATION
    assert spec.normalization is not PERCENTILE_NORMALIZATION  # a copy
    organs = spec_for_labels("organs", (3.0, 3.0, 3.0), 3, "semantic",
                             names_by_id={1: "spleen", 2: "liver"}, depth=3, name="ct",
                             normalization=dict(CT_WINDOW_NORMALIZATION))
    assert organs.class_names == ["background", "spleen", "liver"]
    assert organs.inplane_only_levels == () and organs.depth == 3 and organs.name == "ct"
    given = spec_for_labels("x", (1.0, 1.0), 2, "semantic", class_names=["a", "b"])
    assert given.class_names == ["background", "a", "b"] and given.inplane_only_levels == ()
    with pytest.raises(ValueError, match="no class names"):
        spec_for_labels("x", (1.0, 1.0), 2, "semantic")


def test_build_and_describe():
    spec = NewModelSpec(spatial_dims=2, task="semantic", class_names=["background", "a", "b"],
                        name="cells", base_channels=4, depth=2)
    model = build_new_model(spec)
    assert model.version == 0 and model.name == "cells" and model.class_names == spec.class_names
    assert model.config.out_channels == 3
    assert new_model_text("cells v0", spec) == \
        "New model cells v0: 2D semantic, 2 classes. Fine-tune trains it on your corrected slices."
    aniso = NewModelSpec(spatial_dims=3, task="foreground", inplane_only_levels=(0,))
    assert ", in-plane-only pooling at level(s) [0]." in new_model_text("k", aniso)
    with pytest.raises(ValueError):
        build_new_model(NewModelSpec(spatial_dims=2, task="nonsense"))
