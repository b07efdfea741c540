"""cdc: CDC-FM, coarse-to-fine pixel-space flow matching with conditional dependent coupling."""

__version__ = "0.1.0"
