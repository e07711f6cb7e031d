"""Decoding: the sampling module, the AR baseline, and (in later modules) the speculative engine."""
