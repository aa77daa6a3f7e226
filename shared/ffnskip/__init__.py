"""ffnskip: adaptive FFN-skip decoding (FFN-SkipLLM) for Llama-family models."""

__version__ = "0.1.0"
