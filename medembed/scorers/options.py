"""Everything `medembed fit` can be told: the protocol's options plus the choice of scorer (the head and its
parameters, seeds, ensemble, token level, study pooling); stored in run.json so a run is reproducible.

It lives with the scorers because validating a choice builds the scorer (an unknown head or a bad parameter fails
when the options are made, before any store is read); the module itself imports only the standard library and
the option helpers, so `fit --help` stays fast, and the scorers are imported only to validate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medembed.errors import MedembedError
from medembed.options import check_choice, check_positive, option
from medembed.options.protocol import ProtocolOptions

HEAD_NAMES: tuple[str, ...] = ("logreg", "mlp", "xgboost")  # the built-in heads on [N, D]; plus sklearn:MODULE.CLASS
TOKEN_HEADS: tuple[str, ...] = ("attention", "concat", "adapter")  # the heads on a token level [N, T, C] (fit --level)
AUTO_LEVEL = "auto"


@dataclass
class FitOptions(ProtocolOptions):
    """Everything `medembed fit` can be told; stored in run.json so a run is reproducible."""

    head: str = option("logreg", f"Head: {' | '.join(HEAD_NAMES)} | sklearn:MODULE.CLASS (any scikit-learn classifier) on the pooled embeddings; {' | '.join(TOKEN_HEADS)} on a token level (--level). `medembed heads` lists each head's -p parameters.")
    head_params: dict[str, Any] = option(help="Head hyperparameter key=value, e.g. -p hidden=[256] -p dropout=0.2.", flag="--param -p", factory=dict)
    seeds: int = option(1, "Fit N times with seeds seed..seed+N-1 and report mean ± sd.")
    ensemble: str = option("", "Ensemble: concat (several encoders' stores, joined by image id, one feature vector) | mean | stack (heads per store and per --head, e.g. --head logreg,mlp,xgboost; stack: a logistic meta-model on out-of-fold train predictions).")
    ensemble_folds: int = option(5, "With --ensemble stack: folds of the out-of-fold train predictions the meta-model is fitted on.")
    ensemble_seeds: int = option(1, "With --ensemble: fit every member N times (seeds seed..seed+N-1), each a member of the mean or stack (e.g. --head adapter --ensemble-seeds 3).")
    level: str = option("", "Token level the head reads instead of the pooled embeddings (heads attention | concat | adapter): a store level (block14), levels with one token count joined by + (block14+block10@7x7), or auto (the best val AUROC of the store's levels). With --ensemble: one level (every store's), one per store (block14,block19), or several of one store.")
    study_pooling: str = option("", "Learned study pooling instead of a head: attention (gated attention over a study's image embeddings, trained on train studies; -p sets hidden, attention, max_epochs...). Every image gets its study's score.")
    augment_bank: bool = option(True, "Heads that train in epochs (mlp, attention, adapter) draw one view or the original per train image per epoch from the store's augmentation bank when it has one (S.views.h5, from extract --augment K); --no-augment-bank: the originals only. Other heads never use it.")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("seeds", self.seeds)
        if not isinstance(self.head_params, dict):
            raise MedembedError(f"option head_params must be a mapping, got {self.head_params!r}")
        seeded = [key for key in self.head_params if key == "seed" or str(key).endswith(".seed")]
        if seeded:  # every fit seeds its scorer itself: seed, seed+1, ... for --seeds N
            raise MedembedError(f"-p {seeded[0]}=...: a scorer's seed is fit's --seed (with --seeds N: seed..seed+N-1), not a -p parameter")
        if self.study_pooling and self.level:
            raise MedembedError(f"--level {self.level} is read by token heads; --study-pooling reads the pooled embeddings")
        from medembed.scorers.heads import make_head  # validation builds the head: imported when options are made, not for --help

        if self.study_pooling:
            from medembed.scorers.study_pooling import make_study_pooling

            if self.ensemble:
                raise MedembedError("option study_pooling replaces the head; it cannot be combined with --ensemble")
            make_study_pooling(self.study_pooling, self.head_params, self.seed)
            return
        if self.ensemble:
            from medembed.scorers.ensemble import COMBINES, parse_heads, split_head_params

            check_choice("ensemble", self.ensemble, COMBINES)
            check_positive("ensemble_folds", self.ensemble_folds, minimum=2)
            check_positive("ensemble_seeds", self.ensemble_seeds)
            heads = parse_heads(self.head)
            for head, params in split_head_params(heads, self.head_params).items():
                make_head(head, **params)
                check_level_head(head, self.level)
            if self.level:
                from medembed.scorers.members import ensemble_level_names

                if self.ensemble == "concat":
                    raise MedembedError("--ensemble concat joins pooled embeddings; members on token levels (--level) are combined by mean or stack")

                ensemble_level_names(self.level)  # refuses auto; the count and repeats are checked against the stores
            return
        if self.ensemble_seeds != 1:
            raise MedembedError("option ensemble_seeds sets the seeds of each --ensemble member; without --ensemble use --seeds")
        if "," in self.head:
            raise MedembedError(f"option head {self.head!r} names several heads; combine them with --ensemble mean or --ensemble stack")
        make_head(self.head, **self.head_params)  # an unknown head or a bad hyperparameter fails here, before any fit
        check_level_head(self.head, self.level)


def check_level_head(head: str, level: str) -> None:
    """Token heads read a level, the other heads the pooled embeddings: refuse a mismatch before any fit."""
    if head in TOKEN_HEADS and not level:
        raise MedembedError(f"head {head!r} reads a token level; name one with --level (e.g. block14, final@2x2, auto)")
    if level and head not in TOKEN_HEADS:
        raise MedembedError(f"head {head!r} reads the pooled embeddings; --level {level} needs one of {', '.join(TOKEN_HEADS)}")
