"""The network and what it is stored with: the UNet family (2D and 3D), input normalisation,
precision policies, and checkpoints."""
