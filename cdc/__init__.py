"""cdc: CDC-FM, coarse-to-fine pixel-space flow matching with conditional dependent coupling."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`from cdc import load` (cdc.sample.api.load), imported on first use so `import cdc` stays
    cheap (no torch) for the modules that only read __version__."""
    if name == "load":
        from cdc.sample.api import load

        return load
    raise AttributeError(f"module 'cdc' has no attribute {name!r}")
