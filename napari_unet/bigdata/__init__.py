"""Big images: streaming prediction into resumable Zarr stores, chunk-wise instance merging,
and dask (local or distributed) batch and block-wise runs."""
