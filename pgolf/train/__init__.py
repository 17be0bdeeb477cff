"""Training: the loop, optimizers, schedules, checkpoints, export and the shipped bundle."""
