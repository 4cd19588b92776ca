"""Optimizers and schedules: building them from factories, splitting parameter groups, warm-up schedules."""
