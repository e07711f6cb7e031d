"""mulosd: speculative decoding for autoregressive image generation (MuLo-SD and peers)."""

__version__ = "0.1.0"

__all__ = ["Pipeline", "__version__"]


def __getattr__(name):  # lazy, so `import mulosd.data` does not load every model
    if name == "Pipeline":
        from mulosd.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
