"""Learning: one module per stage of the cycle, plus the lineage of generations."""
