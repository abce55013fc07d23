"""Statistics shared by the stages: arrays in, numbers out (accuracies, intervals, uncertainty, agreement)."""
