"""Batch scoring of registered models on Ray Data, with the online path's validation, steps and decision."""
