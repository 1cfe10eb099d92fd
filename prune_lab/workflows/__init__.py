"""Workflows over a pruning state and an evaluator, through their public methods only:
sensitivity sweeps, masked fine-tuning with schedules, and trade-off grids."""
