#!/usr/bin/env bash
# Train the four shipped models with `napari-unet train` and score them on held-out data with
# `napari-unet predict` + `napari-unet eval`. These are the exact commands behind the model cards
# in napari_unet/pretrained/.
#
#   benchmarks/train_shipped_models.sh train [MODEL ...]   # train (default: all four)
#   benchmarks/train_shipped_models.sh eval  [MODEL ...]   # held-out scores
#
# MODEL: em-membranes-2d nuclei-2d nuclei-3d cells-3d.  DATA defaults to ../shared/data.
# The shipped models were trained as: `train em-membranes-2d` and `train nuclei-2d` (one after the
# other, torch default threads), then `train nuclei-3d`, and `TIME_LIMIT=660 ... train cells-3d`.
# Splits (never train on the test part): ISBI EM train slices 0-23, test 24-29; BBBC039 sorted
# file names, first 80 train, last 20 test; nuclei3d_1135 train z 0-69, test z 70-99;
# cells3d_membrane train z 0-43, test z 44-63.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${DATA:-$HERE/../shared/data}"
OUT="${OUT:-$HERE/napari_unet/pretrained}"
WORK="${WORK:-/tmp/napari-unet-shipped}"
# `napari-unet train` never writes into the package's model folder: train into $TRAINED, then copy
TRAINED="${TRAINED:-$WORK/models}"
TIME="${TIME_LIMIT:-600}"
# one torch thread per training: on a CPU shared with other jobs, two threads per process were
# 3x slower (threads waiting for each other); on a free machine set TORCH_THREADS=0 (torch default)
if [ "${TORCH_THREADS:-1}" != 0 ]; then export OMP_NUM_THREADS="${TORCH_THREADS:-1}"; fi
mode="${1:-train}"; shift || true
models=("$@"); [ ${#models[@]} -eq 0 ] && models=(em-membranes-2d nuclei-2d nuclei-3d cells-3d)

# 1. training and test slabs (written once into $WORK)
python - "$DATA" "$WORK" <<'PY'
import os, sys
from pathlib import Path
import numpy as np, tifffile
from napari_unet.training import training_targets
data, work = Path(sys.argv[1]), Path(sys.argv[2])
work.mkdir(parents=True, exist_ok=True)
def save(name, array, spacing=None, pixel=None):
    path = work / name
    if path.exists():
        return
    kw = {}
    if spacing is not None:
        kw = dict(imagej=True, resolution=(1 / pixel, 1 / pixel), metadata={"spacing": spacing, "unit": "um", "axes": "ZYX"})
    tifffile.imwrite(path, array, compression="zlib", **kw)
em, mem = tifffile.imread(data / "isbi2012_em/image.tif"), tifffile.imread(data / "isbi2012_em/membranes.tif")
save("em_train.tif", em[:24]); save("em_train_membranes.tif", mem[:24])
save("em_test.tif", em[24:]); save("em_test_membranes.tif", mem[24:])
files = sorted((data / "bbbc039_nuclei/images").glob("*.tif"))
for part, chosen in (("train", files[:80]), ("test", files[80:])):
    for sub in ("images", "labels"):
        folder = work / f"bbbc_{part}" / sub
        folder.mkdir(parents=True, exist_ok=True)
        for f in chosen:
            link = folder / f.name
            if not link.exists():
                os.symlink(data / "bbbc039_nuclei" / sub / f.name, link)
img, lab = tifffile.imread(data / "nuclei3d_1135/image.tif"), tifffile.imread(data / "nuclei3d_1135/labels.tif")
save("nuclei3d_train.tif", img[:70], 0.28, 0.127); save("nuclei3d_train_labels.tif", lab[:70], 0.28, 0.127)
save("nuclei3d_test.tif", img[70:], 0.28, 0.127); save("nuclei3d_test_labels.tif", lab[70:], 0.28, 0.127)
img, lab = tifffile.imread(data / "cells3d_membrane/image.tif"), tifffile.imread(data / "cells3d_membrane/labels.tif")
save("cells3d_train.tif", img[:44]); save("cells3d_train_labels.tif", lab[:44])
save("cells3d_test.tif", img[44:]); save("cells3d_test_labels.tif", lab[44:])
save("cells3d_test_membranes.tif", training_targets(lab[44:], "membranes")[0])
PY

train() {
  case "$1" in
    em-membranes-2d) napari-unet train --image "$WORK/em_train.tif" --labels "$WORK/em_train_membranes.tif" \
        --dims 2 --task membranes --base-channels 16 --depth 4 --patch 128,128 --batch-size 8 \
        --time-limit "$TIME" --name em-membranes-2d \
        --description "EM membranes, 2D (ISBI 2012 serial-section TEM); instances = cells" \
        -o "$TRAINED/em-membranes-2d.pt" ;;
    nuclei-2d) napari-unet train --image "$WORK/bbbc_train/images" --labels "$WORK/bbbc_train/labels" \
        --dims 2 --task foreground_boundary --base-channels 16 --depth 4 --patch 128,128 --batch-size 8 \
        --time-limit "$TIME" --name nuclei-2d \
        --description "Fluorescent nuclei, 2D (BBBC039 U2OS Hoechst); splits touching nuclei" \
        -o "$TRAINED/nuclei-2d.pt" ;;
    nuclei-3d) napari-unet train --image "$WORK/nuclei3d_train.tif" --labels "$WORK/nuclei3d_train_labels.tif" \
        --dims 3 --task foreground_boundary --base-channels 8 --depth 4 --patch 16,64,64 --batch-size 2 \
        --time-limit "$TIME" --name nuclei-3d \
        --description "Nuclei in 3D confocal stacks (anisotropic z), foreground + boundary" \
        -o "$TRAINED/nuclei-3d.pt" ;;
    cells-3d) napari-unet train --image "$WORK/cells3d_train.tif" --labels "$WORK/cells3d_train_labels.tif" \
        --dims 3 --task membranes --anisotropic 0 --base-channels 8 --depth 4 --patch 32,64,64 --batch-size 2 \
        --percentiles 1,95 --time-limit "$TIME" --name cells-3d \
        --description "Membrane-stained cells in 3D confocal stacks; instances = cells" \
        -o "$TRAINED/cells-3d.pt" ;;
    *) echo "unknown model $1" >&2; exit 2 ;;
  esac
}

evaluate() {
  local P="$WORK/pred"; mkdir -p "$P"
  case "$1" in
    em-membranes-2d)
      napari-unet predict "$WORK/em_test.tif" --model "$OUT/em-membranes-2d.pt" --output labels -o "$P/em.tif" >/dev/null
      echo "em-membranes-2d membranes: $(napari-unet eval "$P/em.tif" "$WORK/em_test_membranes.tif")" ;;
    nuclei-2d)
      for f in "$WORK"/bbbc_test/images/*.tif; do
        n=$(basename "$f")
        napari-unet predict "$f" --model "$OUT/nuclei-2d.pt" --output instances --min-size 30 -o "$P/bbbc_$n" >/dev/null
        napari-unet eval "$P/bbbc_$n" "$WORK/bbbc_test/labels/$n"
      done > "$P/bbbc_scores.txt"
      python - "$P/bbbc_scores.txt" <<'PY'
import sys
rows = [dict(kv.split("=") for kv in line.split()) for line in open(sys.argv[1]) if line.strip()]
tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("true_positives", "false_positives", "false_negatives"))
dice = sum(float(r["dice"]) for r in rows) / len(rows)
print(f"nuclei-2d ({len(rows)} test images): mean dice={dice:.3f} f1={2*tp/(2*tp+fp+fn):.3f} "
      f"precision={tp/(tp+fp):.3f} recall={tp/(tp+fn):.3f} (objects pooled, tp={tp} fp={fp} fn={fn})")
PY
      ;;
    nuclei-3d)
      napari-unet predict "$WORK/nuclei3d_test.tif" --model "$OUT/nuclei-3d.pt" --output instances --min-size 30 -o "$P/nuclei3d.tif" >/dev/null
      echo "nuclei-3d: $(napari-unet eval "$P/nuclei3d.tif" "$WORK/nuclei3d_test_labels.tif")" ;;
    cells-3d)
      napari-unet predict "$WORK/cells3d_test.tif" --model "$OUT/cells-3d.pt" --output labels -o "$P/cells3d_mem.tif" >/dev/null
      echo "cells-3d membranes: $(napari-unet eval "$P/cells3d_mem.tif" "$WORK/cells3d_test_membranes.tif")"
      napari-unet predict "$WORK/cells3d_test.tif" --model "$OUT/cells-3d.pt" --output instances --min-size 100 -o "$P/cells3d.tif" >/dev/null
      echo "cells-3d cells: $(napari-unet eval "$P/cells3d.tif" "$WORK/cells3d_test_labels.tif")"
      napari-unet predict "$WORK/cells3d_test.tif" --model "$OUT/cells-3d.pt" --output instances --min-size 100 --threshold 0.2 -o "$P/cells3d_t02.tif" >/dev/null
      echo "cells-3d cells, --threshold 0.2: $(napari-unet eval "$P/cells3d_t02.tif" "$WORK/cells3d_test_labels.tif")" ;;
  esac
}

for m in "${models[@]}"; do
  if [ "$mode" = train ]; then
    start=$(date +%s); train "$m"; cp "$TRAINED/$m.pt" "$OUT/$m.pt"; chmod 644 "$OUT/$m.pt"
    echo "$m: trained in $(( $(date +%s) - start )) s wall"
  else
    evaluate "$m"
  fi
done
