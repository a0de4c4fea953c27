"""Ensembles: several heads, several encoders' stores, or both, behind the one scorer contract (run kind "ensemble").

    medembed fit effl0.h5 effl1.h5 effl2.h5 --ensemble concat --head logreg       one head on the joined features
    medembed fit effl0.h5 effl1.h5 --ensemble mean --head mlp                     one MLP per store, averaged
    medembed fit effl0.h5 --ensemble stack --head logreg,mlp,xgboost              three heads, a logistic meta-model

Stores of different encoders are joined by image id (`medembed.protocol.splits.join_stores`): the scorer's input
is the members' embeddings side by side, `[N, D1 + D2 + ...]`, and it knows each member's width. Each member store
keeps its own fingerprint in run.json (`details.members`), so `evaluate` checks every store and `predict` rebuilds
every encoder (`medembed.runs.inputs.JoinedStoreInputs`). Combining members:

    concat   one head per --head over all the joined features (several heads: their probabilities averaged)
    mean     one head per (store, --head) pair on that store's block; P(abnormal) averaged
    stack    the same members; a logistic regression on their logits, fitted on OUT-OF-FOLD train predictions
             (members refitted on K-1 folds of train grouped by patient, predicting the held-out fold), so the
             meta-model never sees val or test, nor a member's prediction on rows it was trained on

Members choose their own hyperparameters on val exactly as a single head does; the ensemble's probability is
then calibrated and thresholded on val by the protocol like any scorer's.

Token-level members (`--level`, `medembed.scorers.members`): with `blocks` set, the input is a `MemberInputs`
(one `[N, T, C]` token array per (store, level) block) and every --head is a member on every block: attention
or concat heads, or adapters, each adapter starting from its block's store encoder and level
(`fit A.h5 B.h5 --ensemble mean --head adapter --level block14`). `member_seeds` N fits each member N times
(seeds seed..seed+N-1), so one adapter's seeds can be averaged too (`--head adapter --ensemble-seeds 3`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from medembed._files import atomic_write_json, read_json
from medembed.errors import MedembedError
from medembed.scorers.members import MemberInputs
from medembed.scorers.heads import Head, load_head, make_head
from medembed.scorers.heads._checks import check_embeddings, check_labels
from medembed.store.views import TrainViews

KIND = "ensemble"
BLOCK_KEYS = frozenset({"store", "level", "token_shape", "encoder", "encoder_options"})
MAX_MEMBER_SEEDS = 32
MAX_TOKEN_SIDE = 1 << 20  # tokens or channels of one level: tens of thousands at most
COMBINES = ("concat", "mean", "stack")
ENSEMBLE_FILE = "ensemble.json"
FORMAT_VERSION = 1
_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] before the meta-model's logit


def parse_heads(text: str) -> tuple[str, ...]:
    """`"logreg,mlp"` -> ("logreg", "mlp"): the --head list of an ensemble, without repeats."""
    heads = tuple(name.strip() for name in str(text).split(",") if name.strip())
    if not heads:
        raise MedembedError("option head is empty; name one head or a comma-separated list, e.g. logreg,mlp,xgboost")
    if len(set(heads)) != len(heads):
        raise MedembedError(f"option head repeats a head: {text!r}")
    return heads


def member_draws_views(head: Head, combine: str) -> bool:
    """Whether an ensemble member of this head draws augmentation views: its head trains in epochs
    (`consumes_views`: mlp, attention, adapter) and the ensemble is not concat, whose members read every store's
    vectors joined, which no one store's views stand in for."""
    return combine != "concat" and bool(getattr(head, "consumes_views", False))


def split_head_params(heads: tuple[str, ...], params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each head's hyperparameters from fit's flat `-p` mapping: `mlp.hidden=[256]` goes to the MLP only, a key
    without a head prefix to every head (each must accept it)."""
    out: dict[str, dict[str, Any]] = {head: {} for head in heads}
    for key, value in params.items():
        head, dot, name = key.partition(".")
        if dot and head in out:
            out[head][name] = value
        elif dot and not key.startswith("sklearn:"):
            raise MedembedError(f"parameter {key!r} names head {head!r}, which is not one of {', '.join(heads)}")
        else:
            for own in out.values():
                own[key] = value
    return out


class EnsembleScorer(ClassifierMixin, BaseEstimator):
    """Heads over blocks of joined embeddings `[N, sum(widths)]`, combined by `combine` (see the module docstring).

    `heads`: head names; `head_params`: {head: {param: value}}; `widths`: each member store's embedding width, in
    the order of the joined columns; `folds`: K of the out-of-fold predictions a stacked ensemble is fitted on."""

    kind: ClassVar[str] = KIND
    consumes: ClassVar[str] = "embeddings"
    columns_used: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, heads: tuple[str, ...] = ("logreg",), head_params: dict[str, dict[str, Any]] | None = None,
        combine: str = "mean", widths: tuple[int, ...] = (1,), folds: int = 5, seed: int = 0,
        blocks: tuple[dict[str, Any], ...] = (), member_seeds: int = 1,
    ) -> None:
        """`blocks`: the token-level blocks (`medembed.scorers.members.block_sources`: store, level, token_shape,
        encoder, encoder_options), empty for members on the pooled embeddings; `member_seeds`: fits per member."""
        self.heads = heads
        self.head_params = head_params
        self.combine = combine
        self.widths = widths
        self.folds = folds
        self.seed = seed
        self.blocks = blocks
        self.member_seeds = member_seeds
        self._check_params()

    # -- the scorer contract ---------------------------------------------------------------------------------

    def fit(self, X: Any, y: np.ndarray, *, eval_set: Any = None, groups: np.ndarray | None = None,
            views: tuple[TrainViews | None, ...] | None = None) -> EnsembleScorer:
        """Fit every member on train (`eval_set=[(X_val, y_val)]` for their own choices), and for "stack" the
        meta-model on out-of-fold train predictions; `groups` [N] (patients) keeps a patient in one fold.

        `views`: one `TrainViews` (or None) per block (token blocks, else stores), the augmented views of train
        rows from that block's store bank, at its level; members whose head draws views per epoch
        (`consumes_views`) train on them, the others (and concat members, which read every store) on the originals.
        A training-time input only: the fitted ensemble is the same kind of object with or without them."""
        self._check_params()
        X = self._joined(X, "X")
        y = check_labels(y, len(X), "y")
        if eval_set is None:
            raise MedembedError("an ensemble is fitted with eval_set=[(X_val, y_val)] (its members choose on val)")
        X_val, y_val = eval_set[0]
        X_val = self._joined(X_val, "X_val")
        y_val = check_labels(y_val, len(X_val), "y_val")
        views = self._checked_views(views)
        members = self.member_names()
        self.members_ = [self._fit_member(k, X, y, X_val, y_val, views=views) for k in range(len(members))]
        self.meta_ = self._fit_meta(X, y, X_val, y_val, groups, views) if self.combine == "stack" else None
        self.classes_ = np.array([0, 1])
        self.selection_ = {
            "combine": self.combine,
            "members": [{"member": name, "selection": head.selection_} for name, head in zip(members, self.members_)],
            **({"meta": self.meta_} if self.meta_ else {}),
        }
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        """`[N, 2]` float64; column 1 is the combined P(abnormal), uncalibrated."""
        if not hasattr(self, "members_"):
            raise MedembedError("this ensemble is not fitted yet; call fit() or load it from a run directory")
        X = self._joined(X, "X")
        positive = self.combined(self.member_probabilities(X))
        return np.column_stack([1.0 - positive, positive])

    def member_probabilities(self, X: np.ndarray) -> np.ndarray:
        """`[N, M]` each member's P(abnormal) on joined embeddings `X`."""
        return np.column_stack([head.predict_proba(self._block(X, k))[:, 1] for k, head in enumerate(self.members_)])

    def combined(self, member_p: np.ndarray) -> np.ndarray:
        """`[N]` the ensemble's P(abnormal) from its members' `[N, M]`."""
        if self.meta_ is None:
            return member_p.mean(axis=1)
        standardized = _standardized(_logit(member_p), np.asarray(self.meta_["member_scale"]))
        z = standardized @ np.asarray(self.meta_["weights"]) + self.meta_["intercept"]
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, directory: Path) -> None:
        """ensemble.json (params, member names, the meta-model's weights) and one head directory per member."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for k, head in enumerate(self.members_):
            head.save(directory / f"member-{k}")
        params = {**self.get_params(), "heads": list(self.heads), "widths": list(self.widths), "blocks": [dict(block) for block in self.blocks]}
        document = {"format_version": FORMAT_VERSION, "params": params, "members": self.member_names(), "meta": self.meta_}
        atomic_write_json(directory / ENSEMBLE_FILE, document)

    @classmethod
    def load(cls, directory: Path) -> EnsembleScorer:
        """Read an ensemble saved by `save`; anything missing or inconsistent is one MedembedError naming the file."""
        path = Path(directory) / ENSEMBLE_FILE
        document = read_json(path, "ensemble file")
        if not isinstance(document, dict) or set(document) != {"format_version", "params", "members", "meta"}:
            raise MedembedError(f"{path}: expected an object with format_version, params, members and meta")
        if document["format_version"] != FORMAT_VERSION:
            raise MedembedError(f"{path}: format_version {document['format_version']!r} is not supported (this medembed reads {FORMAT_VERSION})")
        params = document["params"]
        if not isinstance(params, dict):
            raise MedembedError(f"{path}: params must be an object")
        try:
            scorer = cls(**{k: tuple(v) if k in ("heads", "widths", "blocks") and isinstance(v, list) else v for k, v in params.items()})
        except (MedembedError, TypeError) as error:
            raise MedembedError(f"{path}: {error}") from None
        if document["members"] != scorer.member_names():
            raise MedembedError(f"{path}: members {document['members']!r} do not match its params ({scorer.member_names()})")
        scorer.meta_ = _checked_meta(document["meta"], scorer, path)
        scorer.members_ = [load_head(Path(directory) / f"member-{k}") for k in range(len(scorer.member_names()))]
        for k, head in enumerate(scorer.members_):
            if head.name != scorer._member_head(k).partition(":")[0]:  # sklearn:MODULE.CLASS members are "sklearn" heads
                raise MedembedError(f"{path}: member-{k} is a {head.name!r} head, its params name {scorer._member_head(k)!r}")
            width = scorer._block_width(k)
            if scorer.blocks and head.name == "concat":  # the concat head reads its block's tokens flattened, T * C
                width *= int(scorer.blocks[scorer._member_block(k)]["token_shape"][1])
            if head.n_features_in_ != width:
                raise MedembedError(f"{path}: member-{k} was fitted on {head.n_features_in_} features, its block has {width}")
            if scorer.blocks:
                scorer._check_token_member(k, head, path)
        scorer.classes_ = np.array([0, 1])
        scorer.selection_ = {"combine": scorer.combine, "loaded": True}
        return scorer

    # -- members ---------------------------------------------------------------------------------------------

    def member_names(self) -> list[str]:
        """One name per member, e.g. "mlp@0" (the MLP on the first store's block, or on the first token block),
        "logreg@all" (concat), "adapter@1#2" (the third seed of the adapter on block 1, with member_seeds)."""
        seeds = [""] if self.member_seeds == 1 else [f"#{s}" for s in range(self.member_seeds)]
        if self.combine == "concat":
            return [f"{head}@all{s}" for head in self.heads for s in seeds]
        return [f"{head}@{block}{s}" for block in range(self._n_blocks()) for head in self.heads for s in seeds]

    def _n_blocks(self) -> int:
        return len(self.blocks) if self.blocks else len(self.widths)

    def member_reads(self, store_names: list[str]) -> list[str]:
        """What each member reads, its stores named by `store_names` (one per member store): its store and level
        ("effl1.h5 block19"), its store's pooled vectors, or every store joined (concat)."""
        if len(store_names) != len(self.widths):
            raise MedembedError(f"an ensemble of {len(self.widths)} stores read with {len(store_names)} store names")
        reads = []
        for k in range(len(self.member_names())):
            block = self._member_block(k)
            if self.combine == "concat":
                reads.append("all stores joined")
            elif self.blocks:
                reads.append(f"{store_names[int(self.blocks[block]['store'])]} {self.blocks[block]['level']}")
            else:
                reads.append(f"{store_names[block]} pooled")
        return reads

    def _member_head(self, k: int) -> str:
        return self.member_names()[k].split("@")[0]

    def _member_block(self, k: int) -> int:
        return k // (len(self.heads) * self.member_seeds)

    def _new_member(self, k: int, seed_offset: int = 0) -> Head:
        head = self._member_head(k)
        params = dict((self.head_params or {}).get(head, {}))
        if self.blocks:  # an adapter starts from its block's store encoder and level
            source = self.blocks[self._member_block(k)]
            params = {key: source[key] for key in ("encoder", "encoder_options", "level") if key in _param_names(head)} | params
        replica = k % self.member_seeds
        return make_head(head, **{"seed": self.seed + seed_offset * self.member_seeds + replica, **params})

    def _block(self, X: Any, k: int) -> np.ndarray:
        """What member k reads: all the columns (concat), its store's columns, or its block's tokens."""
        if self.blocks:
            return X.blocks[self._member_block(k)]
        if self.combine == "concat":
            return X
        block = self._member_block(k)
        start = int(sum(self.widths[:block]))
        return X[:, start:start + self.widths[block]]

    def _block_width(self, k: int) -> int:
        """What member k's n_features_in_ must be: its columns, or its block's token count."""
        if self.blocks:
            return int(self.blocks[self._member_block(k)]["token_shape"][0])
        return int(sum(self.widths)) if self.combine == "concat" else int(self.widths[self._member_block(k)])

    def _check_token_member(self, k: int, head: Head, path: Path) -> None:
        """A loaded token member reads its block: its channels (attention), shape and level (adapter) match it."""
        block = self.blocks[self._member_block(k)]
        tokens, channels = block["token_shape"]
        found = getattr(head, "n_channels_", channels), list(getattr(head, "token_shape_", [tokens, channels]))
        if found != (channels, [tokens, channels]) or getattr(head, "level", block["level"]) != block["level"]:
            raise MedembedError(f"{path}: member-{k} does not read its block ({block['level']} {block['token_shape']})")

    def _fit_member(self, k: int, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, rows: np.ndarray | None = None,
                    seed_offset: int = 0, views: tuple[TrainViews | None, ...] | None = None) -> Head:
        train = slice(None) if rows is None else rows
        member = self._new_member(k, seed_offset)
        own = views[self._member_block(k)] if views is not None and member_draws_views(member, self.combine) else None
        if own is not None and rows is not None:  # a fold's member sees only its fit rows' views, counted within them
            own = own.subset(rows)
        extra = {"views": own} if own is not None else {}
        return member.fit(self._block(X, k)[train], y[train], eval_set=[(self._block(X_val, k), y_val)], **extra)

    def _checked_views(self, views: Any) -> tuple[TrainViews | None, ...] | None:
        if views is None:
            return None
        if not isinstance(views, (list, tuple)) or len(views) != self._n_blocks() or not all(v is None or isinstance(v, TrainViews) for v in views):
            raise MedembedError(f"an ensemble's views must be one TrainViews or None per block ({self._n_blocks()}), got {views!r:.80}")
        return tuple(views)

    def _fit_meta(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, groups: np.ndarray | None,
                  views: tuple[TrainViews | None, ...] | None = None) -> dict[str, Any]:
        """The stacking model: logistic regression on the members' logits, fitted on their out-of-fold train
        predictions (each train row predicted by members that never saw it, nor its views); val is used only by
        the members' own choices inside each fold, never to fit the meta-model."""
        folds = _folds(y, groups, self.folds, self.seed)
        oof = np.zeros((len(y), len(self.members_)))
        for fold, (fit_rows, held_out) in enumerate(folds):
            for k in range(len(self.members_)):
                member = self._fit_member(k, X, y, X_val, y_val, rows=fit_rows, seed_offset=fold + 1, views=views)
                oof[held_out, k] = _standardized(
                    _logit(member.predict_proba(self._block(X, k)[held_out])[:, 1]), _logit_scale(member, self._block(X, k)[fit_rows])
                )[:, 0]
        # The meta-model sees the full-train members' logits standardized the same way: by their own train rows.
        scale = np.array([_logit_scale(head, self._block(X, k))[0] for k, head in enumerate(self.members_)])
        meta = LogisticRegression(C=1.0, max_iter=1000).fit(oof, y)
        return {
            "weights": [float(w) for w in meta.coef_[0]],
            "intercept": float(meta.intercept_[0]),
            "member_scale": scale.tolist(),
            "folds": len(folds),
            "grouped": groups is not None,
            "oof_auroc": [float(roc_auc_score(y, oof[:, k])) for k in range(oof.shape[1])],
        }

    # -- checks ----------------------------------------------------------------------------------------------

    def _check_params(self) -> None:
        if self.combine not in COMBINES:
            raise MedembedError(f"option ensemble must be one of {', '.join(COMBINES)}; got {self.combine!r}")
        if isinstance(self.heads, str) or not isinstance(self.heads, (list, tuple)) or not self.heads or not all(
            isinstance(head, str) for head in self.heads
        ) or len(set(self.heads)) != len(self.heads):
            raise MedembedError(f"an ensemble needs a list of distinct heads, got {self.heads!r}")
        widths = tuple(self.widths) if isinstance(self.widths, (list, tuple)) else ()
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise MedembedError(f"an ensemble's widths must be positive integers (one per store), got {self.widths!r}")
        if isinstance(self.member_seeds, bool) or not isinstance(self.member_seeds, int) or not 1 <= self.member_seeds <= MAX_MEMBER_SEEDS:
            raise MedembedError(f"option ensemble_seeds must be an integer 1..{MAX_MEMBER_SEEDS}; got {self.member_seeds!r}")
        self._check_blocks(len(widths))
        if self.combine != "concat" and len(self.heads) * (len(self.blocks) or len(widths)) * self.member_seeds < 2:
            raise MedembedError(
                f"--ensemble {self.combine} combines several members: give several stores (one per encoder), several heads "
                "(--head logreg,mlp,xgboost), several levels (--level block12,block14) or several seeds (--ensemble-seeds 3)"
            )
        if self.combine == "concat" and self.blocks:
            raise MedembedError("--ensemble concat joins pooled embeddings; members on token levels (--level) are combined by mean or stack")
        if self.combine == "concat" and len(widths) < 2:
            raise MedembedError("--ensemble concat joins the features of several stores (one per encoder); for several heads on one store use mean or stack")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise MedembedError(f"an ensemble's seed must be a non-negative integer; got {self.seed!r}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise MedembedError(f"option ensemble_folds must be an integer >= 2; got {self.folds!r}")
        if self.head_params is not None and (not isinstance(self.head_params, dict) or not all(isinstance(v, dict) for v in self.head_params.values())):
            raise MedembedError(f"an ensemble's head_params must map each head to its parameters, got {self.head_params!r}")
        for head in self.heads:
            make_head(head, **(self.head_params or {}).get(head, {}))  # unknown heads and parameters fail here

    def _check_blocks(self, n_stores: int) -> None:
        """`blocks` as `block_sources` writes them (they come back from ensemble.json: every field checked)."""
        if not isinstance(self.blocks, (list, tuple)) or not all(isinstance(block, dict) for block in self.blocks):
            raise MedembedError(f"an ensemble's blocks must be a list of objects, got {self.blocks!r:.80}")
        for k, block in enumerate(self.blocks):
            shape = block.get("token_shape")
            if set(block) != BLOCK_KEYS or isinstance(block["store"], bool) or not isinstance(block["store"], int) or not 0 <= block["store"] < n_stores \
                    or not isinstance(block["level"], str) or not block["level"] or not isinstance(block["encoder"], str) \
                    or not isinstance(block["encoder_options"], dict) or not isinstance(shape, (list, tuple)) or len(shape) != 2 \
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_TOKEN_SIDE for v in shape):
                raise MedembedError(
                    f"an ensemble's block {k} must hold {', '.join(sorted(BLOCK_KEYS))} (store 0..{n_stores - 1}, token_shape two positive "
                    f"integers), got {block!r:.120}"
                )

    def _joined(self, X: Any, what: str) -> Any:
        if self.blocks:
            return self._member_inputs(X, what)
        if isinstance(X, MemberInputs):
            raise MedembedError(f"{what} holds token-level members' inputs; this ensemble's members read the pooled embeddings")
        X = check_embeddings(X, what)
        if X.shape[1] != sum(self.widths):
            raise MedembedError(f"{what} has {X.shape[1]} features; this ensemble joins stores of widths {list(self.widths)} ({sum(self.widths)})")
        return X


    def _member_inputs(self, X: Any, what: str) -> MemberInputs:
        if not isinstance(X, MemberInputs):
            raise MedembedError(f"{what}: this ensemble's members read token levels; give its MemberInputs (medembed fit --level, or a run's rows)")
        if len(X.blocks) != len(self.blocks):
            raise MedembedError(f"{what} has {len(X.blocks)} token blocks; this ensemble reads {len(self.blocks)}")
        for k, (tokens, block) in enumerate(zip(X.blocks, self.blocks)):
            if tokens.ndim != 3 or list(tokens.shape[1:]) != list(block["token_shape"]):
                raise MedembedError(f"{what}: block {k} ({block['level']}) has tokens {tuple(tokens.shape[1:])}, this ensemble reads {tuple(block['token_shape'])}")
        return X


def _param_names(head: str) -> tuple[str, ...]:
    return type(make_head(head)).param_names()


def _folds(y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K stratified folds of the train rows, grouped (a patient in one fold) when `groups` are given."""
    minority = int(min(y.sum(), len(y) - y.sum()))
    if minority < folds:
        raise MedembedError(f"stacking needs at least {folds} train rows of each class for {folds} folds, the train split has {minority}; lower ensemble_folds")
    if groups is not None:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        result = list(splitter.split(np.zeros(len(y)), y, groups))
    else:
        result = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))
    for fit_rows, _ in result:
        if len(np.unique(y[fit_rows])) < 2:
            raise MedembedError("a stacking fold's training rows hold a single class; lower ensemble_folds")
    return result


def _logit_scale(head: Head, X_fit: np.ndarray) -> np.ndarray:
    """`[1, 2]` mean and sd of a member's logits on the rows it was fitted on. Models fitted on different folds
    differ in offset and spread (a strongly regularised head predicts nearly one value), so each one's logits are
    standardized by its own training rows before the meta-model compares them; never by val or test."""
    z = _logit(head.predict_proba(X_fit)[:, 1])
    return np.array([[float(z.mean()), max(float(z.std()), 1e-9)]])


def _standardized(z: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """`[N, M]` logits `z` ([N] or [N, M]) standardized by per-member `scale` `[M, 2]` (mean, sd)."""
    z = z.reshape(len(z), -1)
    return (z - scale[:, 0]) / scale[:, 1]


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _checked_meta(meta: Any, scorer: EnsembleScorer, path: Path) -> dict[str, Any] | None:
    if scorer.combine != "stack":
        if meta is not None:
            raise MedembedError(f"{path}: a {scorer.combine} ensemble has no meta-model, but meta is set")
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("weights"), list) or not isinstance(meta.get("intercept"), (int, float)):
        raise MedembedError(f"{path}: a stacked ensemble needs meta.weights (a list) and meta.intercept (a number)")
    if len(meta["weights"]) != len(scorer.member_names()) or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in meta["weights"]):
        raise MedembedError(f"{path}: meta.weights must be {len(scorer.member_names())} numbers, one per member")
    scale = meta.get("member_scale")
    if not (isinstance(scale, list) and len(scale) == len(meta["weights"]) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, (int, float)) for v in pair) and pair[1] > 0 for pair in scale
    )):
        raise MedembedError(f"{path}: meta.member_scale must be one [mean, sd > 0] pair per member")
    return meta


def make_ensemble(heads: str, head_params: dict[str, Any], combine: str, widths: tuple[int, ...], folds: int, seed: int,
                  blocks: list[dict[str, Any]] | tuple[dict[str, Any], ...] = (), member_seeds: int = 1) -> EnsembleScorer:
    """An unfitted ensemble from fit's options: `heads` "logreg,mlp", flat `-p` params (see `split_head_params`),
    the token blocks of --level (`medembed.scorers.members.block_sources`) and --ensemble-seeds."""
    names = parse_heads(heads)
    return EnsembleScorer(heads=names, head_params=split_head_params(names, head_params), combine=combine, widths=tuple(widths), folds=folds,
                          seed=seed, blocks=tuple(blocks), member_seeds=member_seeds)
