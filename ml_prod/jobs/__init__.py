"""Notebook jobs: the kernel and the supervisor run in Ray workers; `submit` and `query` run on the driver."""
