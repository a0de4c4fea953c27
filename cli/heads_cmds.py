"""`medembed heads`: every head `fit` can train, and its `-p` parameters with their defaults.

The parameters and defaults are read from each head class's constructor signature (`medembed.scorers.heads`,
imported inside the command, so `--help` stays fast), so this list cannot drift from what `-p` accepts."""

from __future__ import annotations

import json
from typing import Any

import typer

SKLEARN = "sklearn:MODULE.CLASS"
SKLEARN_EXAMPLE = "sklearn.linear_model.LogisticRegression"  # instantiated only to reach the adapter's class
SET_BY_FIT = {"seed": "--seed"}  # constructor arguments fit sets itself: not -p parameters
ADAPTER_FROM_STORE = ("encoder", "encoder_options", "level")  # fit fills these from the store and --level
# The study pooling's class docstring points at its module's; the option's own words say what it does.
STUDY_POOLING_SUMMARY = "Gated attention over a study's image embeddings, trained on train studies; every image gets its study's score."


def heads(
    name: str = typer.Argument(None, metavar="NAME", help="Show only this head (e.g. mlp, attention); sklearn:MODULE.CLASS (e.g. sklearn:sklearn.svm.SVC) also lists that classifier's own parameters."),
    as_json: bool = typer.Option(False, "--json/--no-json", help="Print the list as JSON."),
) -> None:
    """List the heads `medembed fit` trains and each one's -p parameters with their defaults.

    Values are written as -p takes them: JSON where it parses (numbers, true/false, null, lists), else text.

    Examples:

      medembed heads

      medembed heads mlp

      medembed fit store.h5 --head mlp -p hidden=[256,64] -p dropout=0.3 --out runs/mlp
    """
    entries = head_entries()
    if name is not None and name.startswith("sklearn:") and name != SKLEARN:
        entries = [sklearn_entry(name.removeprefix("sklearn:"), next(e for e in entries if e["name"] == SKLEARN))]
    elif name is not None:
        chosen = [entry for entry in entries if name in (entry["name"], entry["name"].partition(":")[0])]
        if not chosen:
            known = ", ".join(dict.fromkeys(entry["name"] for entry in entries))
            raise typer.BadParameter(f"no head {name!r}; medembed knows {known}", param_hint="NAME")
        entries = chosen
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    typer.echo("\n\n".join(format_entry(entry) for entry in entries))


def head_entries() -> list[dict[str, Any]]:
    """One entry per head and study pooling: name, how fit chooses it, what it reads, a summary, its parameters
    (name -> default as -p writes it) and the constructor arguments fit sets itself."""
    from medembed.scorers.options import HEAD_NAMES, TOKEN_HEADS
    from medembed.scorers.heads import make_head
    from medembed.scorers.study_pooling import POOLINGS, make_study_pooling

    entries = []
    for name in (*HEAD_NAMES, SKLEARN, *TOKEN_HEADS):
        concrete = name.replace("MODULE.CLASS", SKLEARN_EXAMPLE)
        head_class = type(make_head(concrete))
        tokens = name in TOKEN_HEADS
        entry = _entry(name, head_class, f"--level LEVEL --head {name}" if tokens else f"--head {name}",
                       "a token level [N, T, C]" if tokens else "pooled embeddings [N, D]")
        if name == SKLEARN:
            for own in ("estimator", "estimator_params"):  # named by the head's name and the other -p keys
                entry["parameters"].pop(own)
            entry["note"] = "any other -p key is the classifier's own keyword argument (`medembed heads sklearn:sklearn.svm.SVC` lists them)"
        if name == "adapter":
            from medembed.scorers.heads.adapter import adapter_cost_note

            for filled in ADAPTER_FROM_STORE:
                entry["parameters"].pop(filled)
                entry["set_by_fit"][filled] = "the store and --level"
            entry["note"] = adapter_cost_note()  # what each starting level costs, counted on the meta device
        entries.append(entry)
    for pooling in POOLINGS:
        entry = _entry(pooling, type(make_study_pooling(pooling, {}, 0)), f"--study-pooling {pooling}", "a study's image embeddings [n, D]")
        entries.append({**entry, "summary": STUDY_POOLING_SUMMARY})
    return entries


def sklearn_entry(path: str, adapter: dict[str, Any]) -> dict[str, Any]:
    """The sklearn head's entry for classifier `path` (sklearn.svm.SVC): the adapter's parameters, then the
    classifier's own (fit sets random_state from --seed where the classifier has one)."""
    import inspect

    from medembed.scorers.heads.sklearn_adapter import estimator_class

    model = estimator_class(path)
    own = {p.name: _as_written(p.default) for p in inspect.signature(model.__init__).parameters.values()
           if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in adapter["parameters"]}
    set_by_fit = dict(adapter["set_by_fit"])
    if "random_state" in own:  # the adapter passes its seed (a -p random_state=N would win)
        del own["random_state"]
        set_by_fit["random_state"] = "--seed"
    return {**adapter, "name": f"sklearn:{path}", "fit": f"medembed fit --head sklearn:{path}",
            "summary": (inspect.getdoc(model) or "").split("\n\n")[0].replace("\n", " "), "note": "",
            "parameters": adapter["parameters"] | own, "set_by_fit": set_by_fit}


def _entry(name: str, cls: type, flags: str, reads: str) -> dict[str, Any]:
    import inspect

    parameters, set_by_fit = {}, {}
    for parameter in inspect.signature(cls.__init__).parameters.values():
        if parameter.kind != inspect.Parameter.KEYWORD_ONLY:
            continue
        if parameter.name in SET_BY_FIT:
            set_by_fit[parameter.name] = SET_BY_FIT[parameter.name]
        else:
            parameters[parameter.name] = _as_written(parameter.default)
    summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    return {"name": name, "fit": f"medembed fit {flags}", "reads": reads, "summary": summary,
            "parameters": parameters, "set_by_fit": set_by_fit}


def _as_written(default: Any) -> Any:
    """A default as `-p key=value` takes it: JSON types (tuples become lists), anything else as its text."""
    try:
        return json.loads(json.dumps(default))
    except (TypeError, ValueError):
        return str(default)


def format_entry(entry: dict[str, Any]) -> str:
    """A head's block: its name and summary, how fit chooses it, one `-p key=default` line per parameter."""
    lines = [f"{entry['name']}: {entry['summary']}", f"  {entry['fit']}  (reads {entry['reads']})"]
    lines += [f"  -p {key}={value if isinstance(value, str) else json.dumps(value)}" for key, value in entry["parameters"].items()]
    if entry.get("note"):
        lines.append(f"  ({entry['note']})")
    sources: dict[str, list[str]] = {}
    for key, source in entry["set_by_fit"].items():
        sources.setdefault(source, []).append(key)
    if sources:
        lines.append("  set by fit: " + "; ".join(f"{', '.join(keys)} (from {source})" for source, keys in sources.items()))
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add `medembed heads` to the top-level app."""
    app.command()(heads)
