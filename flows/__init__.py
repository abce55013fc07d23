"""Prefect flows: one per stage plus the end-to-end `alignet` flow, and the CLI."""

import importlib

importlib.import_module("tasks")  # analytics off before Prefect loads (see tasks/__init__.py)
