"""medembed: abnormality detection in musculoskeletal radiographs with frozen foundation-model embeddings.

The library is importable without the CLI's dependencies (typer, tqdm). Data flows one way:
manifest -> images -> encoders -> store -> extract -> heads -> calibrate -> evaluate -> report -> fit -> predict;
zeroshot, robustness, baselines and sweep build on that chain.

The Python API (`medembed.api`) is exported here and loaded on first use, so `import medembed` stays light:
`open_store`, `load_run`, `extract`, `fit`, `evaluate`, `predict`.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_API = frozenset({"open_store", "load_run", "extract", "fit", "evaluate", "predict"})
__all__ = ["__version__", "evaluate", "extract", "fit", "load_run", "open_store", "predict"]


class _Package(types.ModuleType):
    """The package whose API names always mean the API's functions.

    `extract`, `fit`, `evaluate` and `predict` are also submodules, and importing a submodule binds its name on the
    package, so a plain module `__getattr__` would hand out the module instead whenever the submodule was imported
    first. Submodules are still imported as usual (`from medembed.fit import fit_run`), just not reached as
    attributes of the package (`medembed.fit.fit_run`)."""

    def __getattribute__(self, name: str):
        if name in _API:
            return getattr(importlib.import_module("medembed.api"), name)
        return super().__getattribute__(name)

    def __dir__(self):
        return sorted(set(super().__dir__()) | _API)


sys.modules[__name__].__class__ = _Package
