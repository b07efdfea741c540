"""The network: the unified DiT, its layers, tokens and RoPE, attention backends, the compiled
packed trunk, stage-specific DiTs and CUDA graphs. Knows nothing of noise, files, CLI or training."""
