"""Alignment metrics shared by the stages (an evaluate stage builds on them)."""
