"""Dagster orchestration: one asset per stage, composed in `assets/definitions.py`."""
