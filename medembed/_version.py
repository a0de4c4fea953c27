"""The version of medembed (a leaf module: the store, runs and baselines record it without importing the package face)."""

__version__ = "0.1.0"
