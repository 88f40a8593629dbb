"""The prediction audit log: `writer` runs in Serve replicas (standard library only); `store` (compaction) and `query` run on the driver and in monitoring jobs."""
