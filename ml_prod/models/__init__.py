"""The model registry: versions, aliases with their history, and guarded promotion. Runs on the driver and in job kernels."""
