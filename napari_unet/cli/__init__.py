"""The ``napari-unet`` command line, one module per subcommand; :mod:`.main` holds the parser."""
