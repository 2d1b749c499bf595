"""Reading and writing images: the readers (TIFF, PNG/JPEG, NIfTI, DICOM), lazy opening of big
images, calibrated writers, atomic file replacement, and the user's settings file."""
