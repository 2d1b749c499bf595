"""``napari-unet models``: list the shipped models."""

from __future__ import annotations

import argparse
import sys

# --- models --------------------------------------------------------------------------------

def _add_models(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="list the shipped models, one per line, name first")
    parser.set_defaults(handler=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from napari_unet.model.checkpoint import list_pretrained, load_checkpoint

    for name, path in list_pretrained().items():
        model = load_checkpoint(path)
        print(f"{name}\t{model.spatial_dims}D\t{model.task}\t{model.description}")
    sys.stdout.flush()  # a closed pipe (| head -1) is reported here, inside main()
    return 0
