"""Models from and for elsewhere: bioimage.io packages (import and export), ONNX export, and
:func:`~napari_unet.zoo.loading.load_model`, which loads any model."""
