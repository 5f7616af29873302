"""alignpipe: align language models with human and AI preferences, from data version to served model."""

__version__ = "0.1.0"
