"""The pipeline above the stages: the stage registry (the order, declared once), the run context,
preflight and the run's report. It imports the stages; no stage imports it."""
