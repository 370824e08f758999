"""kslm_jax: raw Korean text to a trained, evaluated and exportable small language model."""

__version__ = "0.1.0"
