"""Targets: a weight format plus where it runs (see ``registry``)."""
