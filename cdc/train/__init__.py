"""Training: the loop, checkpoints, run files (metrics, grids, config), distributed helpers and
`--init` (fine-tunes)."""
