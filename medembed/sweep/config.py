"""The sweep's TOML config: what to run (encoders x heads x label budgets x seeds, baselines) under which protocol.

    name = "fracatlas"
    manifest = "data_manifests/fracatlas.csv"
    root = "${FRACATLAS:-../shared/data/fracatlas}"   # ${VAR} and ${VAR:-default} read the environment
    out = "work/sweeps/fracatlas"
    budgets = [0.01, 0.1, 1.0]          # fractions of the training labels, in (0, 1]
    seeds = [0, 1, 2]
    heads = ["logreg", "mlp", "xgboost"]
    threshold = "f1"                    # chosen on val, as `medembed fit --threshold` (default: fit's)
    calibration = "none"                # default: fit's
    aggregation = "mean"                # default: fit's
    bootstrap = 1000                    # resamples for the 95% intervals (0: none; default: fit's)

    [head_params.xgboost]               # optional, per head, as `medembed fit --param`
    n_estimators = 200

    [extract]                           # optional, as `medembed extract`'s options
    batch_size = 32

    [[encoders]]
    name = "efficientnet-lite0"         # a registered encoder
    label = "effl0-224"                 # optional: results' encoder column and store name (default: name)
    options = { size = 224 }            # optional, as `medembed extract --option` (used when the sweep extracts)
    store = "work/fracatlas-effl0.h5"   # optional: an existing, complete store, used as is; otherwise
                                        # OUT/stores/<label>.h5 is extracted (or finished) with `options`
    levels = ["block14", "final@2x2"]   # optional: a levels axis: token levels (extracted with the store, as
                                        # `extract --levels`), each a source "<label>:<level>" (levels joined by +
                                        # are concatenated) whose cells are the `token_heads`, as `fit --level`
    token_heads = ["attention"]         # optional (default ["attention"]): attention | concat | adapter

    [[ensembles]]                       # optional: ensembles as cells beside the single heads (medembed.scorers.ensemble)
    label = "stack3"                    # the results' head column
    heads = ["logreg", "mlp", "xgboost"]
    combine = "stack"                   # concat | mean | stack, as `medembed fit --ensemble`
    encoders = ["effl0-224", "effl1"]   # optional: labels of [[encoders]] whose stores are joined by image id
                                        # (encoder column "effl0-224+effl1"); default: each encoder on its own
    params = { "mlp.max_epochs" = 20 }  # optional, as `medembed fit --param` (head.key for one head)
    folds = 5                           # optional: stacking's out-of-fold folds

    [[baselines]]
    kind = "cnn"                        # fine-tuned EfficientNet-Lite0: one run per seed and budget
    label = "cnn-224"                   # optional: results' encoder column and run directories' name (default: kind)
    options = { size = 224, epochs = 10 }
    budgets = [1.0]                     # optional (default [1.0]: each run fine-tunes a CNN)
    seeds = [0]                         # optional (default: the sweep's seeds)

    [[baselines]]
    kind = "autoencoder"                # trained once on the train images, then heads x budgets x seeds on its store
    label = "ae-e20"                    # optional: results' encoder column and store name (default: kind)
    options = { epochs = 20 }

A sweep may hold several baselines of one kind, each with its own `label` (e.g. a CNN at the default 128 px and
one at the store's 224 px), for the CNN and the autoencoder alike: a CNN's runs go to
OUT/baselines/<label>-budget<b>-seed<s>/, an autoencoder's store to OUT/stores/<label>.h5. Labels are distinct
across [[encoders]] and [[baselines]]; a baseline's label may be its own kind (the default, so results of a
config without labels stay valid) but not another kind's name.

Relative paths resolve against the current directory. Every problem raises SweepConfigError naming the file
and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from medembed.options.baselines import AutoencoderOptions
from medembed.scorers.baselines.autoencoder import KIND as AUTOENCODER
from medembed.options.baselines import CNNOptions
from medembed.options.protocol import CALIBRATIONS, ProtocolOptions
from medembed.encoders import available_encoders
from medembed.errors import MedembedError
from medembed.options.protocol import AGGREGATIONS
from medembed.options.extract import ExtractOptions
from medembed.scorers.options import HEAD_NAMES, TOKEN_HEADS
from medembed.scorers.heads import make_head
from medembed.sweep.budgets import check_fraction

CNN = "cnn"
BASELINE_KINDS = (CNN, AUTOENCODER)
_TOP_KEYS = (
    "name", "manifest", "root", "out", "budgets", "seeds", "heads", "head_params", "threshold", "calibration",
    "aggregation", "bootstrap", "extract", "encoders", "baselines", "ensembles",
)
_ENSEMBLE_KEYS = ("label", "heads", "combine", "encoders", "params", "folds")
_ENCODER_KEYS = ("name", "label", "options", "store", "levels", "token_heads")
_BASELINE_KEYS = {CNN: ("kind", "label", "options", "budgets", "seeds"), AUTOENCODER: ("kind", "label", "options")}
# Baseline options the sweep sets itself: the CNN's seed is each sweep seed.
_BASELINE_OPTIONS = {
    CNN: tuple(f.name for f in fields(CNNOptions) if f.name != "seed"),
    AUTOENCODER: tuple(f.name for f in fields(AutoencoderOptions)),
}
# A sweep embeds every image once, so extraction's `limit` and `retry_failed` have no place here.
_EXTRACT_KEYS = ("batch_size", "num_workers", "device", "precision", "store_dtype", "compile")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


class SweepConfigError(MedembedError):
    """A sweep config that cannot be read or asks for something medembed cannot do; names the file and key."""


@dataclass(frozen=True)
class EncoderSpec:
    """One embedding source: a registered encoder (extracted into the sweep's own store unless `store` is given)."""

    name: str
    label: str  # the results' encoder column; also the store's file name
    options: dict[str, Any]
    store: Path | None = None
    levels: tuple[str, ...] = ()  # the levels axis: each a source "<label>:<level>" of the token heads
    token_heads: tuple[str, ...] = ()

    def level_sources(self) -> list[tuple[str, str]]:
        """(results' encoder column, level) of each level on the axis."""
        return [(f"{self.label}:{level}", level) for level in self.levels]


@dataclass(frozen=True)
class EnsembleSpec:
    """An ensemble cell type: `heads` combined by `combine` on each encoder's store, or on the stores of
    `encoders` joined by image id."""

    label: str  # the results' head column
    heads: tuple[str, ...]
    combine: str
    encoders: tuple[str, ...]  # labels of [[encoders]] joined into one source; () = each encoder on its own
    params: dict[str, Any]
    folds: int

    def sources(self, encoders: tuple[EncoderSpec, ...]) -> list[tuple[EncoderSpec, ...]]:
        """The member stores of each source the ensemble runs on (one tuple per results' encoder column)."""
        if not self.encoders:
            return [(spec,) for spec in encoders]
        by_label = {spec.label: spec for spec in encoders}
        return [tuple(by_label[label] for label in self.encoders)]


def source_label(members: tuple[EncoderSpec, ...]) -> str:
    """The results' encoder column of an ensemble's source: its members' labels joined by '+'."""
    return "+".join(spec.label for spec in members)


@dataclass(frozen=True)
class BaselineSpec:
    """A conventional baseline from medembed.scorers.baselines. The CNN runs once per (budget, seed) of its own; the
    autoencoder is trained once (its `seed` option) and its store gets the sweep's budgets and seeds."""

    kind: str  # "cnn" | "autoencoder"
    label: str  # the results' encoder column; also its run directories' (CNN) or store's (autoencoder) name
    options: dict[str, Any]
    budgets: tuple[float, ...] = ()
    seeds: tuple[int, ...] = ()


@dataclass(frozen=True)
class SweepConfig:
    """A validated sweep: the grid and the one protocol every cell of it follows."""

    name: str
    manifest: Path
    root: Path | None  # needed only to extract stores or train baselines
    out: Path
    budgets: tuple[float, ...]
    seeds: tuple[int, ...]
    heads: tuple[str, ...]
    head_params: dict[str, dict[str, Any]]
    protocol: ProtocolOptions  # threshold, calibration, aggregation, bootstrap: fit's options, as `medembed fit` takes them
    extract: ExtractOptions
    encoders: tuple[EncoderSpec, ...]
    baselines: tuple[BaselineSpec, ...]
    source: Path
    ensembles: tuple[EnsembleSpec, ...] = ()

    @property
    def threshold(self) -> str:
        return self.protocol.threshold

    @property
    def calibration(self) -> str:
        return self.protocol.calibration

    @property
    def aggregation(self) -> str:
        return self.protocol.aggregation

    @property
    def bootstrap(self) -> int:
        return self.protocol.n_resamples

    def baselines_of(self, kind: str) -> tuple[BaselineSpec, ...]:
        """The sweep's baselines of one kind, in config order."""
        return tuple(b for b in self.baselines if b.kind == kind)


def load_config(path: Path) -> SweepConfig:
    """Read and validate a sweep config TOML file."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepConfigError(f"{path}: no such sweep config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise SweepConfigError(f"{path}: not valid TOML ({error})") from None
    return parse_config(document, source=path)


def parse_config(document: dict[str, Any], source: Path) -> SweepConfig:
    """Validate a parsed TOML document (see the module docstring for the keys)."""
    where = _Where(source)
    where.known_keys(document, _TOP_KEYS, "the top level")
    heads = tuple(where.items(document, "heads"))
    for head in heads:
        if head not in HEAD_NAMES:
            raise where.error("heads", f"unknown head {head!r}; choose from {', '.join(HEAD_NAMES)}")
    protocol = _protocol(where, document)
    seeds = _seeds(where, document, "seeds", [0])
    encoders = tuple(_encoder(where, entry, i) for i, entry in enumerate(where.tables(document, "encoders")))
    baselines = tuple(_baseline(where, entry, i, seeds) for i, entry in enumerate(where.tables(document, "baselines")))
    if not encoders and not baselines:
        raise where.error("encoders", "the sweep needs at least one [[encoders]] or [[baselines]] entry")
    labels = [e.label for e in encoders] + [b.label for b in baselines]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        key = "baselines" if any(b.label in repeated for b in baselines) else "encoders"
        raise where.error(key, f"{', '.join(repeated)} appears twice; give each encoder and baseline a distinct `label`")
    ensembles = tuple(_ensemble(where, entry, i, encoders) for i, entry in enumerate(where.tables(document, "ensembles")))
    repeated = sorted({e.label for e in ensembles if [x.label for x in ensembles].count(e.label) > 1})
    if repeated:
        raise where.error("ensembles", f"{', '.join(repeated)} appears twice; give each ensemble a distinct `label`")
    extract_options = where.value(document, "extract", dict, {})
    where.known_keys(extract_options, _EXTRACT_KEYS, "[extract]")
    return SweepConfig(
        name=where.value(document, "name", str, source.stem),
        manifest=where.path(document, "manifest", required=True),
        root=where.path(document, "root", required=False),
        out=where.path(document, "out", required=True),
        budgets=_budgets(where, document, "budgets", [1.0]),
        seeds=seeds,
        heads=heads,
        head_params=_head_params(where, where.value(document, "head_params", dict, {}), heads),
        protocol=protocol,
        extract=ExtractOptions(**extract_options),
        encoders=encoders,
        baselines=baselines,
        source=source,
        ensembles=ensembles,
    )


# Top-level keys read into ProtocolOptions (named as fit's flags: bootstrap is --bootstrap, the n_resamples field).
_PROTOCOL_KEYS = {"threshold": "threshold", "calibration": "calibration", "aggregation": "aggregation", "bootstrap": "n_resamples"}
_PROTOCOL_CHOICES = {"calibration": CALIBRATIONS, "aggregation": AGGREGATIONS}


def _protocol(where: _Where, document: dict) -> ProtocolOptions:
    """The sweep's protocol: each key typed and checked against fit's ProtocolOptions (its defaults where absent),
    every problem naming its key."""
    defaults, values = ProtocolOptions(), {}
    for key, name in _PROTOCOL_KEYS.items():
        if key not in document:
            continue
        value = where.count(document[key], key) if name == "n_resamples" else where.value(document, key, str)
        if key in _PROTOCOL_CHOICES and value not in _PROTOCOL_CHOICES[key]:
            raise where.error(key, f"{value!r} is not one of {', '.join(_PROTOCOL_CHOICES[key])}")
        values[name] = where.check(lambda: getattr(replace(defaults, **{name: value}), name), key)
    return ProtocolOptions(**values)


def _budgets(where: _Where, table: dict, name: str, default: list, key: str | None = None) -> tuple[float, ...]:
    key = key or name
    return tuple(where.check(lambda: check_fraction(b, "budget"), key) for b in where.items(table, name, default, key))


def _seeds(where: _Where, table: dict, name: str, default: list, key: str | None = None) -> tuple[int, ...]:
    key = key or name
    return tuple(where.count(seed, key) for seed in where.items(table, name, default, key))


def _head_params(where: _Where, table: dict, heads: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    for head, params in table.items():
        if head not in heads:
            raise where.error(f"head_params.{head}", f"{head!r} is not one of the sweep's heads ({', '.join(heads)})")
        if not isinstance(params, dict):
            raise where.error(f"head_params.{head}", "must be a table of the head's parameters")
        where.check(lambda: make_head(head, **params), f"head_params.{head}")
    return {head: dict(table.get(head, {})) for head in heads}


def _label(where: _Where, entry: dict, key: str, default: str | None, reserved: tuple[str, ...], reserved_as: str) -> str:
    """entry's `label` (`default` where absent; required when None): a name usable as a file name and a results
    column, and not one of `reserved` (`reserved_as` says what those are)."""
    label = where.value(entry, "label", str, default, key=f"{key}.label")
    if not _LABEL.match(label) or label in reserved:
        raise where.error(f"{key}.label", f"{label!r} must be letters, digits, '.', '_' or '-' and not {reserved_as} ({', '.join(reserved)})")
    return label


def _encoder(where: _Where, entry: dict, index: int) -> EncoderSpec:
    key = f"encoders[{index}]"
    where.known_keys(entry, _ENCODER_KEYS, key)
    name = where.value(entry, "name", str, key=f"{key}.name")
    if name not in available_encoders():
        raise where.error(f"{key}.name", f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    label = _label(where, entry, key, name, BASELINE_KINDS, "a baseline's name")
    options = dict(where.value(entry, "options", dict, {}, key=f"{key}.options"))
    levels = tuple(where.items(entry, "levels", [], key=f"{key}.levels")) if "levels" in entry else ()
    token_heads = tuple(where.items(entry, "token_heads", ["attention"], key=f"{key}.token_heads")) if levels else ()
    for head in token_heads:
        if head not in TOKEN_HEADS:
            raise where.error(f"{key}.token_heads", f"unknown token head {head!r}; choose from {', '.join(TOKEN_HEADS)}")
    if levels and "levels" not in options:  # the sweep's own store is extracted with the levels on the axis
        stored = [name for level in levels for name in level.split("+")]
        options["levels"] = ",".join(dict.fromkeys(stored))
    return EncoderSpec(name, label, options, where.path(entry, "store", required=False, key=f"{key}.store"), levels, token_heads)


def _ensemble(where: _Where, entry: dict, index: int, encoders: tuple[EncoderSpec, ...]) -> EnsembleSpec:
    from medembed.scorers.ensemble import COMBINES, EnsembleScorer, split_head_params

    key = f"ensembles[{index}]"
    where.known_keys(entry, _ENSEMBLE_KEYS, key)
    label = _label(where, entry, key, None, HEAD_NAMES, "a head's name")  # the sweep's heads are among them
    members = tuple(where.items(entry, "heads", key=f"{key}.heads"))
    for head in members:
        if head not in HEAD_NAMES:
            raise where.error(f"{key}.heads", f"unknown head {head!r}; choose from {', '.join(HEAD_NAMES)}")
    combine = where.value(entry, "combine", str, "mean", key=f"{key}.combine")
    if combine not in COMBINES:
        raise where.error(f"{key}.combine", f"{combine!r} is not one of {', '.join(COMBINES)}")
    joined = tuple(where.items(entry, "encoders", key=f"{key}.encoders")) if "encoders" in entry else ()
    known = [spec.label for spec in encoders]
    for label_ in joined:
        if label_ not in known:
            raise where.error(f"{key}.encoders", f"{label_!r} is not the label of an [[encoders]] entry ({', '.join(known) or 'none'})")
    params = dict(where.value(entry, "params", dict, {}, key=f"{key}.params"))
    folds = where.count(entry.get("folds", 5), f"{key}.folds")
    head_params = where.check(lambda: split_head_params(members, params), f"{key}.params")
    where.check(lambda: EnsembleScorer(heads=members, head_params=head_params, combine=combine, widths=(1,) * max(len(joined), 1), folds=folds), key)
    return EnsembleSpec(label, members, combine, joined, params, folds)


def _baseline(where: _Where, entry: dict, index: int, sweep_seeds: tuple[int, ...]) -> BaselineSpec:
    key = f"baselines[{index}]"
    kind = where.value(entry, "kind", str, key=f"{key}.kind")
    if kind not in BASELINE_KINDS:
        raise where.error(f"{key}.kind", f"unknown baseline {kind!r}; choose from {', '.join(BASELINE_KINDS)}")
    where.known_keys(entry, _BASELINE_KEYS[kind], f"{key} ({kind})")
    label = _label(where, entry, key, kind, tuple(k for k in BASELINE_KINDS if k != kind), "another baseline's name")
    options = dict(where.value(entry, "options", dict, {}, key=f"{key}.options"))
    where.known_keys(options, _BASELINE_OPTIONS[kind], f"{key}.options ({kind})")
    if kind == AUTOENCODER:
        return BaselineSpec(kind, label, options)
    return BaselineSpec(
        kind,
        label,
        options,
        budgets=_budgets(where, entry, "budgets", [1.0], f"{key}.budgets"),
        seeds=_seeds(where, entry, "seeds", list(sweep_seeds), f"{key}.seeds"),
    )


class _Where:
    """Typed access to config values; every error names the file and the key."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def error(self, key: str, problem: str) -> SweepConfigError:
        return SweepConfigError(f"{self.source}: {key}: {problem}")

    def check(self, validate: Callable[[], Any], key: str) -> Any:
        """validate()'s result, its MedembedError re-raised naming the key."""
        try:
            return validate()
        except MedembedError as error:
            raise self.error(key, str(error)) from None

    def known_keys(self, table: dict, allowed: tuple[str, ...], where: str) -> None:
        unknown = sorted(set(table) - set(allowed))
        if unknown:
            raise SweepConfigError(f"{self.source}: unknown key(s) {', '.join(unknown)} in {where}; expected {', '.join(allowed)}")

    def value(self, table: dict, name: str, expected: type, default: Any = None, key: str | None = None) -> Any:
        """table[name] checked to be of type `expected`; `default` where absent (required when default is None)."""
        key = key or name
        if name not in table:
            if default is None:
                raise self.error(key, "is required")
            return default
        value = table[name]
        # TOML booleans are Python ints: refuse them where a number is expected.
        if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
            raise self.error(key, f"expected {_TYPE_NAMES[expected]}, got {value!r}")
        return value

    def count(self, value: Any, key: str) -> int:
        """An integer >= 0 (a seed, a number of resamples)."""
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.error(key, f"expected an integer >= 0, got {value!r}")
        return value

    def items(self, table: dict, name: str, default: list | None = None, key: str | None = None) -> list:
        """A non-empty list without repeats."""
        values = self.value(table, name, list, default, key)
        if not values:
            raise self.error(key or name, "must list at least one value")
        if len(set(map(repr, values))) != len(values):
            raise self.error(key or name, f"repeats a value: {values}")
        return values

    def tables(self, table: dict, name: str) -> list[dict]:
        """An array of tables ([[name]]), possibly empty."""
        values = self.value(table, name, list, [])
        for value in values:
            if not isinstance(value, dict):
                raise self.error(name, f"expected [[{name}]] tables, got {value!r}")
        return values

    def path(self, table: dict, name: str, required: bool, key: str | None = None) -> Path | None:
        """A path with ${VAR} / ${VAR:-default} expanded from the environment."""
        if name not in table and not required:
            return None
        text = self.value(table, name, str, key=key)

        def expand(match: re.Match) -> str:
            variable, default = match.group(1), match.group(2)
            if variable in os.environ:
                return os.environ[variable]
            if default is None:
                raise self.error(key or name, f"environment variable {variable} is not set (write ${{{variable}:-default}} for a fallback)")
            return default

        return Path(_ENV.sub(expand, text))


_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "a table"}
