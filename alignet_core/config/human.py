"""The `human` and `vice` sections of the config: the human data, its folds, the proxy and VICE."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignet_core.records import ConfigModel

ProxyLevel = Literal["category_boundary", "sibling_boundary", "class_boundary"]  # alignet_core.human.levels.LEVELS
#: the level names before issue 30 → what they are now (the old ones invited a comparison with the AligNet paper's
#: human-judged Levels figures; these are taxonomy-answer triplets, ceiling 100%)
RENAMED_LEVELS = {"global": "category_boundary", "local": "sibling_boundary"}


def renamed_level_message(field: str, names: object) -> str | None:
    """The error for a config naming a level by its old name (`RENAMED_LEVELS`), or None when it names none."""
    old = [n for n in (names if isinstance(names, (list, tuple, dict)) else []) if n in RENAMED_LEVELS]
    if not old:
        return None
    fix = ", ".join(f"{o} → {RENAMED_LEVELS[o]}" for o in old)
    return (f"{field}: the levels were renamed for what they are (taxonomy answer, ceiling 100%; not the AligNet "
            f"paper's human-judged Levels): {fix}; the names are {list(ProxyLevel.__args__)}")


class DensifyConfig(ConfigModel):
    """Dense soft-labelled triplets over the objects that have images, drawn from VICE fitted on every trial
    of the triplet file (`alignet_core.human.densify`): how many, per fit."""

    n_triplets: int = Field(
        20000, gt=0, description="triplets drawn over the training objects of each fit (every fold's, and the "
        "refit's over all objects), labelled with the choice probabilities of that fit's VICE (fitted on every trial "
        "that names no held-out object)"
    )
    n_test: int = Field(
        5000, gt=0, description="test triplets drawn inside each fold's objects, labelled with the choice "
        "probabilities of VICE fitted on every trial (the model of the people the held-out figures are scored "
        "against: expected accuracy, with its own ceiling)"
    )


class HumanConfig(ConfigModel):
    """Human odd-one-out triplets (THINGS format) or the taxonomy-derived proxy, and how the
    objects are split so that held-out figures never involve an object a fit has seen."""

    triplets: str | None = Field(
        None, description="THINGS-format triplet file (rows 'i j k', k the odd one); null: the taxonomy proxy from the source's "
        "labels (demo, class folders, CSV label_columns), named a proxy in every report"
    )
    shipped: Literal["things"] | None = Field(
        None, description="things: the THINGS odd-one-out trials shipped with the project (alignet_core/data/things: "
        "115,313 trials of Hebart et al. 2020, CC-BY-4.0) over the demo emoji through the shipped emoji map (one "
        "THINGS concept per emoji); needs source.kind demo and human.densify (238 trials name three mapped emoji); "
        "replaces human.triplets, human.concepts and human.objects"
    )
    densify: DensifyConfig | None = Field(
        None, description="fit VICE (the vice section) on every trial of the triplet file over all its objects, then "
        "fit the transform on dense triplets over the objects with images, soft-labelled with VICE's posterior-"
        "predictive choice probabilities (the AligNet paper's uncertainty distillation); each fold's VICE never sees "
        "a trial naming an object of that fold. null: fit on the file's triplets whose three objects have images"
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
        "images in a folder named after it (object_images/<concept>/...); which of them stand for the object: "
        "human.stimulus"
    )
    stimulus: Literal["triplet_image", "average"] = Field(
        "triplet_image", description="with human.concepts, the image(s) of a concept's object: triplet_image = the one "
        "image participants saw in the triplet task (as gLocal embeds it): the file human.stimuli names, else the "
        "image named after the concept in its folder (<concept>/<concept>.jpg, any image extension); average = the "
        "mean over every image of the concept's folder"
    )
    stimuli: str | None = Field(
        None, description="with human.concepts and stimulus triplet_image: CSV/TSV with columns 'concept' and 'image' "
        "naming each concept's triplet-task image (a file name in the concept's folder, or a source image id)"
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
        default_factory=lambda: {"category_boundary": 0.5, "sibling_boundary": 0.5},
        description="taxonomy proxy: weight of each taxonomy level (category_boundary, sibling_boundary, "
        "class_boundary: taxonomy answer, ceiling 100%; see alignet_core.human.levels) among the proxy triplets",
    )
    proxy_noise: float = Field(0.1, ge=0.0, lt=1.0, description="taxonomy proxy: fraction of responses flipped at random")

    @field_validator("proxy_mix", mode="before")
    @classmethod
    def _renamed_levels(cls, v: object) -> object:
        if isinstance(v, dict) and (msg := renamed_level_message("human.proxy_mix", list(v))):
            raise ValueError(msg)
        return v

    @model_validator(mode="after")
    def _fold_and_mix(self) -> HumanConfig:
        declared = [f for f in ("concepts", "objects") if getattr(self, f)] + (["positional"] if self.positional else [])
        if self.shipped is not None:
            given = [f for f in ("triplets", "probabilities", *declared) if getattr(self, f)]
            if given:
                raise ValueError(f"human.shipped: {self.shipped!r} brings its own triplets and emoji map; remove "
                                 f"{', '.join('human.' + f for f in given)}")
            if self.densify is None:
                raise ValueError("human.shipped: the shipped THINGS trials need human.densify (only 238 of the "
                                 "115,313 trials name three mapped emoji), e.g. densify: {n_triplets: 20000}")
        if self.densify is not None and self.shipped is None and self.triplets is None:
            raise ValueError("human.densify: needs the trials to fit VICE on: human.triplets (or human.shipped)")
        if self.densify is not None and self.probabilities is not None:
            raise ValueError("human.densify: the dense triplets' probabilities are VICE's; remove human.probabilities")
        if len(declared) > 1:
            raise ValueError(f"human: {' and '.join('human.' + f for f in declared)} each declare how objects attach "
                             "to images; give one")
        if self.test_fold >= self.folds:
            raise ValueError(f"human.test_fold: {self.test_fold} must be below human.folds ({self.folds})")
        if any(v < 0 for v in self.proxy_mix.values()) or not sum(self.proxy_mix.values()) > 0:
            raise ValueError(f"human.proxy_mix: weights must be non-negative with a positive sum, got {self.proxy_mix}")
        return self

    @model_validator(mode="after")
    def _stimulus_needs_concepts(self) -> HumanConfig:
        if self.stimuli is not None and (self.concepts is None or self.stimulus != "triplet_image"):
            raise ValueError("human.stimuli: names each concept's triplet-task image, so it needs human.concepts and "
                             f"human.stimulus: triplet_image (got concepts={self.concepts!r}, stimulus={self.stimulus!r})")
        return self


class ViceConfig(ConfigModel):
    """Stage 1: VICE, the variational spike-and-slab embedding of the objects (soft targets).

    Defaults are the reference implementation's (github.com/LukasMut/VICE, main_optimization.py):
    Adam at 1e-3 on batches of 128, at most 2,000 epochs, no stop in the first 500, then a stop
    once the pruned dimensionality has not changed for 500 epochs. On THINGS (1,854 objects,
    115k triplets) that is hours on a CPU (measured: ~12 s of CPU per epoch, 900 steps that each
    update all 185k posterior means and scales, so 3-7 hours for 1,000-2,000 epochs); the fast setting (`ViceConfig.fast()`, docs/method.md)
    is full-batch steps at lr 0.1 for a 400-epoch burn-in, then decaying to 0.01 over the 200-epoch
    window, checked every 10 epochs (benchmarks/results/vice.json has its time on THINGS)."""

    init_dims: int = Field(100, gt=0, description="initial embedding dimensions before pruning (reference 100)")
    epochs: int = Field(2000, gt=0, description="maximum passes over the training triplets (reference 2,000); the fit "
                        "usually stops earlier by the stability rule (burnin, stability_window)")
    burnin: int = Field(500, ge=0, description="epochs before the stability rule may stop the fit (reference 500)")
    stability_window: int = Field(
        500, gt=0, description="stop once the number of kept (pruned) dimensions has been the same, and not 0, at every "
        "check over this many epochs (reference ws = 500)"
    )
    check_every: int = Field(
        1, gt=0, description="count the kept dimensions (and score val triplets) every this many epochs (reference: "
        "every epoch); a larger value makes the checks cheaper, the window is still measured in epochs"
    )
    batch_size: int | None = Field(
        128, gt=0, description="triplets per step (reference 128); null: all training triplets in one step (full "
        "batch, computed through the object Gram matrix: one step costs about m^2 * init_dims, whatever the count)"
    )
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate (reference 1e-3)")
    final_lr: float | None = Field(
        None, gt=0.0, description="null: lr throughout (the reference); else after the burn-in the learning rate "
        "decays geometrically from lr to final_lr over stability_window epochs and stays there (full-batch Adam at a "
        "large lr keeps the posterior jittering, so a borderline dimension flips in and out and the window never fills)"
    )
    threads: int | None = Field(
        None, gt=0, description="torch CPU threads for the fit (null: torch's setting); on a shared, loaded machine 1 "
        "is fastest (measured on 2 busy cores: a full-batch THINGS step 0.38 s on 1 thread, 0.73 s on 2)"
    )
    mc_samples: int = Field(1, gt=0, description="Monte-Carlo samples of the embedding per step in the ELBO "
                            "(reference 1 in training; predictions use 25)")
    spike: float = Field(0.25, gt=0.0, description="std of the narrow prior component (reference 0.25)")
    slab: float = Field(1.0, gt=0.0, description="std of the wide prior component (reference 1.0)")
    pi: float = Field(0.5, gt=0.0, lt=1.0, description="prior weight of the spike (reference 0.5)")
    init_scale: float | None = Field(
        None, gt=0.0, description="initial posterior means ~ N(0, init_scale^2); null: the reference's Kaiming normal, "
        "std sqrt(2 / init_dims)"
    )
    init_log_sigma: float | None = Field(
        None, description="initial posterior log-scales; null: the reference's -1 / std(initial means)"
    )
    prune: Literal["bh", "threshold"] = Field(
        "bh", description="pruning rule: bh = the reference's (per dimension, Benjamini–Hochberg over the objects that "
        "have training triplets of P(weight <= 0) under the posterior at prune_alpha; kept when more than "
        "prune_min_objects objects are significant); threshold = mu/sigma > prune_z and mu > prune_min_value in more "
        "than prune_min_objects objects"
    )
    prune_alpha: float = Field(0.05, gt=0.0, lt=1.0, description="pruning (bh): false discovery rate per dimension")
    prune_min_objects: int = Field(5, ge=0, description="pruning: keep a dim used by more than this many objects "
                                   "(reference k = 5)")
    prune_z: float = Field(2.0, gt=0.0, description="pruning (threshold): an object uses a dim when mu / sigma "
                           "exceeds this")
    prune_min_value: float = Field(0.1, ge=0.0, description="pruning (threshold): ... and its posterior mean exceeds "
                                   "this")

    @classmethod
    def fast(cls, **overrides: object) -> "ViceConfig":
        """The documented fast setting (`FAST_VICE`: full-batch steps, a decaying learning rate after the burn-in)."""
        return cls(**{**FAST_VICE, **overrides})


#: `vice:` fields of the fast setting (docs/method.md; measured in benchmarks/vice.py)
FAST_VICE: dict[str, object] = {"batch_size": None, "lr": 0.1, "final_lr": 0.01, "burnin": 400,
                                "stability_window": 200, "check_every": 10, "threads": 1}
