"""Evaluation: Inception features, FID/IS/precision/recall, scoring, SWD, eval file I/O and the
Fashion-MNIST judge."""
