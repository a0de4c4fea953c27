"""medembed: abnormality detection in musculoskeletal radiographs with frozen foundation-model embeddings.

The packages are the pipeline: data (manifests, images) -> store -> encoders -> extract -> protocol (splits,
calibration, metrics) -> scorers -> runs; the workflows (fit, evaluate, predict, robustness, transfer, sweep) sit on
top and the CLI (`medembed.cli`) on them. The library imports without the CLI's dependencies (typer, tqdm).

For notebooks and scripts, `medembed.api` has every command as a function (`from medembed import api`;
`api.extract`, `api.fit`, `api.evaluate`, `api.predict` (a DataFrame), `api.open_store`, `api.load_run`); `fit` and
`load_run` return an `api.Run` (`.metrics` as a DataFrame, `.predict_proba(X)`, `.predict(images)`). `open_store`
and `load_run` are also here, loaded on first use so that `import medembed` stays light; `fit`, `predict`,
`extract` and `evaluate` are not, as those names are medembed's modules (`medembed.fit` is the fit workflow).
"""

from typing import Any

from medembed._version import __version__
__all__ = ["__version__", "load_run", "open_store"]


def __getattr__(name: str) -> Any:
    """`open_store` and `load_run` from `medembed.api`, imported on first use (h5py, numpy)."""
    if name in ("open_store", "load_run"):
        from medembed import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
