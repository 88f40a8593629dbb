"""MLflow as the system of record: the job record's tags, the store (runs, heartbeats, the reaper) and provenance. Used by the driver and by Ray workers."""
