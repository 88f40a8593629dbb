"""Monitoring: an audit window and the model's reference profile in, drift, integrity, quality and service health out, with one decision."""
