"""Thin Prefect tasks, one per stage package. Importing this package (or `flows`, which imports it)
turns Prefect's analytics off, client (`DO_NOT_TRACK`) and server side, before Prefect loads,
however the pipeline is started; an explicit setting in the environment is kept."""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
