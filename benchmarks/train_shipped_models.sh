#!/usr/bin/env bash
# Reproduce the four shipped models (napari_unet/pretrained/) and check them with the CLI.
#
#   benchmarks/train_shipped_models.sh train [TASK ...]  # select, train, peer, classical, cards
#   benchmarks/train_shipped_models.sh eval  [TASK ...]  # held-out scores via predict + eval
#
# TASK: em nuclei2d nuclei3d cells3d (default: all four). DATA defaults to ../shared/data.
# Training is benchmarks/bench_models.py (its docstring has the splits: ISBI EM train 0-19,
# validation 20-23, test 24-29; BBBC039 sorted names train 0-63, validation 64-79, test 80-99;
# nuclei3d_1135 train z 0-55, validation 58-69, test 70-99; cells3d_membrane train z 0-31,
# validation 34-43, test 44-63). The test parts are never trained or tuned on.
# `eval` runs the shipped models with their stored (tuned) post-processing: no --threshold or
# --min-size is passed.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
DATA="${DATA:-$HERE/../shared/data}"
export DATA
export WORK="${WORK:-/tmp/napari-unet-models}"
SELECT_CPU="${SELECT_CPU:-40}"   # CPU seconds per selection run
FINAL_CPU="${FINAL_CPU:-600}"    # CPU seconds for the shipped model and for its peer
mode="${1:-train}"; shift || true
tasks=("$@"); [ ${#tasks[@]} -eq 0 ] && tasks=(em nuclei2d nuclei3d cells3d)
declare -A NAME=([em]=em-membranes-2d [nuclei2d]=nuclei-2d [nuclei3d]=nuclei-3d [cells3d]=cells-3d)
bench() { OMP_NUM_THREADS="${TORCH_THREADS:-1}" python "$HERE/benchmarks/bench_models.py" "$@" --threads "${TORCH_THREADS:-1}"; }

if [ "$mode" = train ]; then
  for t in "${tasks[@]}"; do
    bench select --task "$t" --cpu-seconds "$SELECT_CPU"
    # the winner on the validation split: best architecture, then best loss on it
    read -r arch loss < <(python - "$t" <<'PY'
import json, os, sys
rows = [json.loads(l) for l in open(os.path.join(os.environ["WORK"], "results.jsonl"))]
rows = [r for r in rows if r.get("task") == sys.argv[1] and r.get("phase") == "select" and "val" in r]
best = max(rows, key=lambda r: r["val"])
print(best["architecture"], best["loss"])
PY
)
    bench train --task "$t" --architecture "$arch" --loss "$loss" --cpu-seconds "$FINAL_CPU"
    bench peer --task "$t" --cpu-seconds "$FINAL_CPU"
    case "$t" in nuclei2d|nuclei3d) bench classical --task "$t" ;; esac
    bench card --task "$t"
    cp "$WORK/models/${NAME[$t]}.pt" "$WORK/cards/${NAME[$t]}.md" "$HERE/napari_unet/pretrained/"
  done
  bench report
  exit 0
fi

# eval: the shipped models through the CLI, on the test parts
P="$WORK/cli_eval"; mkdir -p "$P"
python - "$DATA" "$P" <<'PY'
import sys
from pathlib import Path
import tifffile
data, out = Path(sys.argv[1]), Path(sys.argv[2])
tifffile.imwrite(out / "em_test.tif", tifffile.imread(data / "isbi2012_em/image.tif")[24:])
tifffile.imwrite(out / "em_test_membranes.tif", tifffile.imread(data / "isbi2012_em/membranes.tif")[24:])
for name, folder, start in (("nuclei3d", "nuclei3d_1135", 70), ("cells3d", "cells3d_membrane", 44)):
    tifffile.imwrite(out / f"{name}_test.tif", tifffile.imread(data / folder / "image.tif")[start:])
    tifffile.imwrite(out / f"{name}_test_labels.tif", tifffile.imread(data / folder / "labels.tif")[start:])
PY
for t in "${tasks[@]}"; do
  case "$t" in
    em)
      napari-unet predict "$P/em_test.tif" --model em-membranes-2d --output labels -o "$P/em.tif" >/dev/null
      echo "em-membranes-2d membranes: $(napari-unet eval "$P/em.tif" "$P/em_test_membranes.tif")" ;;
    nuclei2d)
      for f in $(ls "$DATA"/bbbc039_nuclei/images/*.tif | sort | tail -20); do
        n=$(basename "$f")
        napari-unet predict "$f" --model nuclei-2d --output instances -o "$P/bbbc_$n" >/dev/null
        napari-unet eval "$P/bbbc_$n" "$DATA/bbbc039_nuclei/labels/$n"
      done > "$P/bbbc_scores.txt"
      python - "$P/bbbc_scores.txt" <<'PY'
import sys
rows = [dict(kv.split("=") for kv in line.split()) for line in open(sys.argv[1]) if line.strip()]
tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("true_positives", "false_positives", "false_negatives"))
print(f"nuclei-2d ({len(rows)} test fields, objects pooled): f1={2*tp/(2*tp+fp+fn):.3f} tp={tp} fp={fp} fn={fn}")
PY
      ;;
    nuclei3d)
      napari-unet predict "$P/nuclei3d_test.tif" --model nuclei-3d --output instances -o "$P/nuclei3d.tif" >/dev/null
      echo "nuclei-3d: $(napari-unet eval "$P/nuclei3d.tif" "$P/nuclei3d_test_labels.tif")" ;;
    cells3d)
      napari-unet predict "$P/cells3d_test.tif" --model cells-3d --output instances -o "$P/cells3d.tif" >/dev/null
      echo "cells-3d cells: $(napari-unet eval "$P/cells3d.tif" "$P/cells3d_test_labels.tif")" ;;
  esac
done
