"""Sampling: `cdc sample` (generate), sampler options and figures."""
