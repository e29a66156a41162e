"""lmstack: the whole life of a language model, from scratch, in one small package."""

__version__ = "0.1.0"
