"""`cdc ablate`: the sweep table, the runner and the report."""
