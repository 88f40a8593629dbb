"""The control service: one long-running process per cluster (a detached Ray actor on the cluster's head) that hosts the work nobody starts by hand, now the alias follower."""
