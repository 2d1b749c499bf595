"""Training: targets from labels, patch sampling, augmentation, losses, and the training loop."""
