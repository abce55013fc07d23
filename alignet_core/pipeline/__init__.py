"""What runs the stages and is not a stage: the runner, computed code versions, preflight, the report."""
