"""Training: the one loop, its checkpoints, and the objectives plugged into it."""
