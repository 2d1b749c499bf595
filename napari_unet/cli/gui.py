"""``napari-unet gui``: open napari with the plugin's docks."""

from __future__ import annotations

import argparse
from pathlib import Path

from napari_unet.cli.common import UsageError

# --- gui -----------------------------------------------------------------------------------

def _add_gui(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("gui", help="open napari with the napari-unet docks",
                                 description="Open napari with the Segment, Edit, Fine-tune and "
                                             "Export docks and FILE loaded (a sample without FILE).")
    parser.add_argument("file", nargs="?", default=None,
                        help="image to open (TIFF/OME-TIFF, PNG/JPEG, NIfTI, DICOM folder)")
    parser.add_argument("--sample", default="nuclei_3d",
                        choices=["em_2d", "nuclei_2d", "nuclei_3d", "cells_3d", "ct_small"],
                        help="sample opened when no FILE is given (default: nuclei_3d)")
    parser.set_defaults(handler=_run_gui)


def _run_gui(args: argparse.Namespace) -> int:
    if args.file is not None and not Path(args.file).exists():
        raise UsageError(f"file not found: {args.file}")
    # lazily: napari is imported only for this command
    from napari_unet._widgets._launch import run_gui

    run_gui(args.file, sample=args.sample)
    return 0
