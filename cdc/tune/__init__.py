"""Tuning a finished run: post-hoc EMA reconstruction (ema.py) and the sampler search (sampler.py)."""
