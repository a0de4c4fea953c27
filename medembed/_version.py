"""The version of medembed and of the packages it records (a leaf module: the store, runs and baselines record
them without importing the package face; standard library only, so the CLI's start-up can use it)."""

from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"


def package_version(*distributions: str) -> str:
    """The installed version of the first of `distributions` that is installed (from package metadata, nothing
    imported), or '' when none is."""
    for distribution in distributions:
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return ""
