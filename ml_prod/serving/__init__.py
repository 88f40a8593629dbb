"""Serving on Ray Serve: `spec` (the YAML schema), the request path that runs in each replica (`request`, `model`, `replica`, `app`), and the driver's `control`."""
