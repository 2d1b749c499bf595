"""Inference: devices, tile planning, the one tile engine, test-time augmentation, prediction
and segmentation of in-memory images, and uncertainty-ranked slice suggestions."""
