"""Work made of many jobs: pipelines (a cached DAG), Ray Tune sweeps, and reproducing a past job. Runs on the driver; trials run in Ray workers."""
