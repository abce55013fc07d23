"""The `human` and `vice` sections of the config: the human data, its folds, the proxy and VICE."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignet_core.records import ConfigModel

ProxyLevel = Literal["global", "local", "class_boundary"]


class HumanConfig(ConfigModel):
    """Human odd-one-out triplets (THINGS format) or the taxonomy-derived proxy, and how the
    objects are split so that held-out figures never involve an object a fit has seen."""

    triplets: str | None = Field(
        None, description="THINGS-format triplet file (rows 'i j k', k the odd one); null: the taxonomy proxy from the source's "
        "labels (demo, class folders, CSV label_columns), named a proxy in every report"
    )
    probabilities: str | None = Field(
        None, description=".npy (n, 3) probabilities that pair (i,j), (i,k), (j,k) is the most similar"
    )
    objects: str | None = Field(
        None, description="CSV 'object,image_id' mapping the triplet file's object ids to image ids (one row per "
        "image of an object)"
    )
    concepts: str | None = Field(
        None, description="THINGS concept-order file (one concept per line as THINGS' unique_id.txt, or a CSV/TSV "
        "with a 'uniqueID' column as things_concepts.tsv): object i = concept i, whose images are the source's "
        "images in a folder named after it (object_images/<concept>/<concept>_NN.jpg), averaged"
    )
    positional: bool = Field(
        False, description="declare that object i of the triplet file is image i of the source (its order); never "
        "assumed: a triplet file needs human.concepts, human.objects or this"
    )
    folds: int = Field(
        5, ge=2, description="objects are dealt into this many folds (seeded); the transform is fitted once per fold "
        "on the triplets with no object in it (early stopping and any search on a triplet split of those: "
        "transform.val_fraction) and scored on the triplets with all three objects in it; the held-out figures pool "
        "the folds (every object tested once)"
    )
    test_fold: int = Field(0, ge=0, description="the designated test fold: with teacher 'heldout' the later stages "
                           "use the transform fitted without it, and evaluate/distill score the student on its "
                           "triplets")
    teacher: Literal["heldout", "all"] = Field(
        "heldout", description="the fitted transform the later stages (cluster, sample, distill) use: heldout = the fit "
        "that never saw a triplet naming a test-fold object, and the sampler leaves the test fold's images out, so the "
        "student's test-fold figures are held-out (evaluation); all = the transform refit on every triplet with the "
        "settings and epoch count chosen by the folds (publishing: the student's test-fold figures are then not "
        "held-out, and say so)"
    )
    proxy_n_triplets: int = Field(20000, gt=0, description="taxonomy proxy: number of triplets to make (over all folds, drawn inside each)")
    proxy_mix: dict[ProxyLevel, float] = Field(
        default_factory=lambda: {"global": 0.5, "local": 0.5},
        description="taxonomy proxy: weight of each abstraction level (global, local, class_boundary; see "
        "alignet_core.human.levels) among the proxy triplets",
    )
    proxy_noise: float = Field(0.1, ge=0.0, lt=1.0, description="taxonomy proxy: fraction of responses flipped at random")

    @model_validator(mode="after")
    def _fold_and_mix(self) -> HumanConfig:
        declared = [f for f in ("concepts", "objects") if getattr(self, f)] + (["positional"] if self.positional else [])
        if len(declared) > 1:
            raise ValueError(f"human: {' and '.join('human.' + f for f in declared)} each declare how objects attach "
                             "to images; give one")
        if self.test_fold >= self.folds:
            raise ValueError(f"human.test_fold: {self.test_fold} must be below human.folds ({self.folds})")
        if any(v < 0 for v in self.proxy_mix.values()) or not sum(self.proxy_mix.values()) > 0:
            raise ValueError(f"human.proxy_mix: weights must be non-negative with a positive sum, got {self.proxy_mix}")
        return self


class ViceConfig(ConfigModel):
    """Stage 1: VICE, the variational spike-and-slab embedding of the objects (soft targets)."""

    init_dims: int = Field(100, gt=0, description="initial embedding dimensions before pruning")
    epochs: int = Field(150, gt=0, description="passes over the training triplets")
    batch_size: int = Field(512, gt=0, description="triplets per step")
    lr: float = Field(1e-2, gt=0.0, description="Adam learning rate")
    mc_samples: int = Field(1, gt=0, description="Monte-Carlo samples of the embedding per step (ELBO)")
    spike: float = Field(0.25, gt=0.0, description="std of the narrow prior component")
    slab: float = Field(1.0, gt=0.0, description="std of the wide prior component")
    pi: float = Field(0.5, gt=0.0, lt=1.0, description="prior weight of the spike")
    init_scale: float = Field(0.5, gt=0.0, description="initial posterior means ~ |N(0, init_scale^2)|")
    init_log_sigma: float = Field(-3.0, description="initial posterior log-scales")
    prune: Literal["bh", "threshold"] = Field(
        "bh", description="pruning rule: bh = the reference's (per dimension, Benjamini–Hochberg over objects of "
        "P(weight <= 0) under the posterior at prune_alpha; kept when at least prune_min_objects objects are "
        "significant); threshold = mu/sigma > prune_z and mu > prune_min_value in prune_min_objects objects"
    )
    prune_alpha: float = Field(0.05, gt=0.0, lt=1.0, description="pruning (bh): false discovery rate per dimension")
    prune_min_objects: int = Field(5, ge=1, description="pruning: keep a dim active in at least this many objects")
    prune_z: float = Field(2.0, gt=0.0, description="pruning: an object uses a dim when mu / sigma exceeds this")
    prune_min_value: float = Field(0.1, ge=0.0, description="pruning: ... and its posterior mean exceeds this")
