"""Where Ray runs: connecting to the profile's cluster, the persistent local one, and every private Ray API (`_compat`). Used by the driver and the CLI."""
