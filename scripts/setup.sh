#!/usr/bin/env bash
# Set up napari-unet on a fresh machine: torch (CPU build first, so pip never pulls a multi-GB
# CUDA build), the package with its Qt binding, and with --test the test tools plus Xvfb for the
# GUI tests. Safe to run again: what is installed already is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
# the app with every optional feature (dask, ONNX, bioimage.io); `pip install -e ".[pyqt5]"` is
# the minimal install
extras="pyqt5,all"
[[ "${1:-}" == "--test" ]] && extras="pyqt5,testing"

PYTHON=${PYTHON:-python3}
# The distribution was called napari-unet before; that name belongs to another project on PyPI.
# An editable install under the old name is a checkout of ours (PyPI's is never editable): it
# is removed, so that napari does not find the plugin twice (the import name napari_unet and
# the command napari-unet stay).
if $PYTHON -m pip show napari-unet 2>/dev/null | grep -q '^Editable project location: '; then
    $PYTHON -m pip uninstall --disable-pip-version-check -y -q napari-unet
fi
$PYTHON -m pip install --disable-pip-version-check -q "torch==2.13.0"
$PYTHON -m pip install --disable-pip-version-check -q -e ".[${extras}]"

if [[ "${1:-}" == "--test" ]] && ! command -v Xvfb >/dev/null 2>&1; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        xvfb xauth libdbus-1-3 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
        libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xinput0 libxcb-xfixes0 \
        libxcb-shape0 libxcb-cursor0 libopengl0 libgl1 libglx-mesa0 >/dev/null
fi
