"""The flow math, pure tensor code: pyramid operators, schedule/couplings/interpolants/loss, the
sampler and the shortcut objective. Takes the network as a callable; imports no files, CLI or training."""
