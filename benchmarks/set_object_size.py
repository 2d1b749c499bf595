"""Store the training objects' size in the four shipped models (issue 21, item 2); reproducible.

For each shipped model: load it, measure the median equivalent diameter of the objects in its
training labels (the training splits of ``train_shipped_models.sh`` / ``bench_models.py``), set
``object_size`` (µm where the training data has a voxel size, and voxels), store the tuned
``min_size`` also as ``min_size_fraction`` of that median volume (same value at the training
resolution, and it follows the voxel size elsewhere), and save it with the checkpoint writer
(:func:`napari_unet.model.checkpoint.save_checkpoint`, into a temporary file that then
replaces the shipped one). The weights stay bit-identical (checked), and the file loads with
``torch.load(weights_only=True)`` (checked).

cells-3d also gets its post-processing re-tuned for the new membrane instances (PlantSeg-style
seeds, watershed and border agglomeration) on its validation slab, cells3d_membrane z 34-43,
as ``bench_models.py`` tunes it (its weights were trained on z 0-43, so that score is
optimistic; the test slab z 44-63 is never used here).

Training objects (objects cut by a split's border are counted as they are):

* em-membranes-2d: ISBI 2012 slices 0-19, cells = 4-connected regions of non-membrane per slice;
* nuclei-2d: BBBC039 fields 0-63 by sorted name;
* nuclei-3d: nuclei3d_1135 z 0-55, voxel 0.28 x 0.127 x 0.127 µm;
* cells-3d: cells3d_membrane z 0-43 (what its shipped weights were trained on; no voxel size).

Run::

    OMP_NUM_THREADS=2 nice -n 10 python benchmarks/set_object_size.py [--dry-run] [--models NAME ...]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage as ndi

from napari_unet.engine.predict import predict_probabilities
from napari_unet.labels.object_size import measure_object_size
from napari_unet.labels.tuning import tune_postprocessing
from napari_unet.model.checkpoint import list_pretrained, load_checkpoint, save_checkpoint
from napari_unet.progress import drain

DATA = Path(os.environ.get("DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def training_labels(name: str) -> tuple[list[np.ndarray], tuple[float, ...] | None, str]:
    """The training labels of shipped model ``name``, their voxel size and a description."""
    if name == "em-membranes-2d":
        membranes = tifffile.imread(DATA / "isbi2012_em/membranes.tif")[:20]
        return ([ndi.label(m == 0)[0] for m in membranes], None,
                "ISBI 2012 slices 0-19, cells = regions between membranes")
    if name == "nuclei-2d":
        files = sorted((DATA / "bbbc039_nuclei/labels").glob("*.tif"))[:64]
        return [tifffile.imread(f) for f in files], None, "BBBC039 fields 0-63 by sorted name"
    if name == "nuclei-3d":
        return ([tifffile.imread(DATA / "nuclei3d_1135/labels.tif")[:56]], (0.28, 0.127, 0.127),
                "nuclei3d_1135 z 0-55")
    if name == "cells-3d":
        return ([tifffile.imread(DATA / "cells3d_membrane/labels.tif")[:44]], None,
                "cells3d_membrane z 0-43")
    raise ValueError(f"no training data known for {name!r}")


def retune_cells(model) -> dict:
    """cells-3d's post-processing tuned for the new membrane instances on z 34-43."""
    image = tifffile.imread(DATA / "cells3d_membrane/image.tif")[34:44]
    truth = tifffile.imread(DATA / "cells3d_membrane/labels.tif")[34:44]
    probs = drain(predict_probabilities(image, model, device="cpu", precision="fp32",
                                        dtype=np.float32))
    result = tune_postprocessing([probs], [truth], model.task, instances=True)
    where = ("the validation split of bench_models.py (cells3d: cells3d_membrane z 34-43; "
             "note: this model was trained on those slices, so this score is optimistic); "
             "membrane instances: distance-transform seeds, watershed, border agglomeration")
    return result.to_postprocess(where)


def _card_line(size: dict) -> str:
    um = "unknown (the training data has no voxel size)" if size["diameter_um"] is None \
        else f"{size['diameter_um']:.2f} µm"
    return (f"- **Object size** (stored as `object_size`): median equivalent diameter {um}, "
            f"{size['diameter_voxels']:.1f} voxels ({size['n_objects']} training objects, "
            f"{size['measured_on']}); post-processing sizes are relative to it.")


def update_card(path: Path, size: dict, postprocess: dict) -> None:
    text = path.read_text(encoding="utf-8")
    line = _card_line(size)
    text = re.sub(r"^- \*\*Object size\*\*.*\n", "", text, flags=re.M)
    keys = [k for k in ("threshold", "seed_threshold", "merge_threshold", "min_size",
                        "min_size_fraction") if k in postprocess]
    settings = ", ".join(f"`{k}={postprocess[k]}`" for k in keys)
    text = re.sub(r"(- \*\*Post-processing defaults\*\*[^:]*: ).*\n",
                  lambda m: m.group(1) + settings + ".\n" + line + "\n", text, count=1)
    if line not in text:
        text = text.rstrip("\n") + "\n\n" + line + "\n"
    path.write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print, do not write")
    parser.add_argument("--models", nargs="*", default=None,
                        help="only these shipped models (e.g. one just retrained); default: all")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not DATA.is_dir():
        print(f"no data at {DATA}", file=sys.stderr)
        return 1
    for name, path in list_pretrained().items():
        if args.models is not None and name not in args.models:
            continue
        model = load_checkpoint(path)
        before = {k: v.clone() for k, v in model.network.state_dict().items()}
        labels, voxel_size, where = training_labels(name)
        model.object_size = measure_object_size(labels, voxel_size, measured_on=where)
        postprocess = dict(model.postprocess)
        if name == "cells-3d":
            postprocess = retune_cells(model)
        if postprocess.get("min_size") is not None:
            postprocess["min_size_fraction"] = round(
                float(postprocess["min_size"]) / model.object_size["volume_voxels"], 4)
        model.postprocess = postprocess
        print(f"{name}: object_size={model.object_size} postprocess={postprocess}")
        if args.dry_run:
            continue
        # a temporary folder beside the shipped models' folder (the writer refuses that one),
        # on the same file system, so the finished file replaces the shipped one atomically
        with tempfile.TemporaryDirectory(dir=path.parent.parent) as folder:
            written = save_checkpoint(model, Path(folder) / path.name)
            payload = torch.load(written, map_location="cpu", weights_only=True)
            for key, value in before.items():
                if not torch.equal(payload["state_dict"][key], value):
                    raise RuntimeError(f"{name}: weights of {key} changed")
            os.replace(written, path)
        reloaded = load_checkpoint(path)
        assert reloaded.object_size == model.object_size
        update_card(path.with_suffix(".md"), model.object_size, postprocess)
    return 0


if __name__ == "__main__":
    sys.exit(main())
