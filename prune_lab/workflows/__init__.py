"""Workflows over a pruning state and an evaluator, through their public methods only:
sensitivity sweeps, masked fine-tuning with schedules and distillation, trade-off grids, and the
Ray executor that measures sweep and trade-off points on workers (``distributed``)."""
