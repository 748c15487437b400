"""`token-objectives bench`: the T x V x TP grid, its baselines and the measuring."""
