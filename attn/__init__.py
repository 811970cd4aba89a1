"""attn: a JAX/Flax research codebase for Transformer attention variants."""

__version__ = "0.1.0"
