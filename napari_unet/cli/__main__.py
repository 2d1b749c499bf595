"""``python -m napari_unet.cli`` runs the ``napari-unet`` command."""

import sys

from napari_unet.cli.main import main

sys.exit(main())
