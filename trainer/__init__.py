"""Learning: one module per stage of the cycle (dataset, replay, fine-tune, convert), the cycle
that strings them together, its process, its lock and the scheduler."""
