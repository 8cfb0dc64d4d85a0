"""LARS optimizer and learning-rate schedules."""
