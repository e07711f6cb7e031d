"""Decoding: the method registry and parameters, the one decoding loop and its parts, the sampling module."""
