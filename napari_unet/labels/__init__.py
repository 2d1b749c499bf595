"""Label images as arrays: dtypes, editing operations, probabilities to instances, statistics,
metrics, and tuning of the post-processing. Depends on numpy/scipy/scikit-image only."""
