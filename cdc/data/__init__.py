"""Data: source readers, image processing, `cdc prepare` (shards), the training loader and the
batch class-mix measurement."""
