"""Whether and where `fit`, `evaluate` and `sweep` log to MLflow (the optional `medembed[tracking]` extra)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from medembed.errors import MedembedError
from medembed.options import option

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


@dataclass
class TrackingOptions:
    """MLflow tracking: on with --track, --track-uri or MLFLOW_TRACKING_URI set."""

    track: bool = option(False, "Also log to MLflow: the options, metrics with interval bounds, figures and the run directory "
                                "(pip install 'medembed[tracking]'); on whenever MLFLOW_TRACKING_URI is set.")
    tracking_uri: str | None = option(None, "MLflow tracking URI (implies --track; default: MLFLOW_TRACKING_URI, else ./mlruns).", flag="--track-uri")
    experiment: str = option("medembed", "MLflow experiment the runs are logged under.", flag="--track-experiment")

    def __post_init__(self) -> None:
        if not isinstance(self.experiment, str) or not self.experiment.strip():
            raise MedembedError(f"option experiment (--track-experiment) must be a non-empty name; got {self.experiment!r}")
        if self.tracking_uri is not None and not (isinstance(self.tracking_uri, str) and self.tracking_uri.strip()):
            raise MedembedError(f"option tracking_uri (--track-uri) must be a URI or path; got {self.tracking_uri!r}")

    @property
    def asked(self) -> bool:
        """Tracking was asked for on the command line (then a missing MLflow is an error, not a silent no-op)."""
        return bool(self.track or self.tracking_uri)

    @property
    def enabled(self) -> bool:
        """Asked for, or MLFLOW_TRACKING_URI is set in the environment."""
        return self.asked or bool(os.environ.get(TRACKING_URI_ENV))

    @property
    def uri(self) -> str:
        """Where the runs go: --track-uri, MLFLOW_TRACKING_URI, else ./mlruns (a local file store)."""
        return self.tracking_uri or os.environ.get(TRACKING_URI_ENV) or "./mlruns"
