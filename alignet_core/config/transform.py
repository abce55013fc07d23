"""The `transform` section of the config (stage 1)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignet_core.records import ConfigModel


class TransformConfig(ConfigModel):
    """Stage 1: the human-aligned affine transform (gLocal / uncertainty distillation)."""

    enabled: bool = Field(True, description="false: publish the untransformed teacher's triplets")
    targets: Literal["soft", "hard"] = Field(
        "soft", description="soft: KL to response probabilities (uncertainty distillation); hard: one-hot CE (gLocal)"
    )
    alpha: float = Field(0.25, ge=0.0, le=1.0, description="weight of the local term")
    lam: float = Field(1.0, ge=0.0, description="weight of ||W - mean(diag W) I||_F^2")
    lr: float = Field(3e-3, gt=0.0, description="learning rate (reference code: 1e-3)")
    optimizer: Literal["adam", "sgd"] = Field("adam", description="optimizer")
    epochs: int = Field(8, gt=0, description="maximum passes over the training triplets")
    batch_size: int = Field(1024, gt=0, description="triplets per step")
    local_batch: int = Field(512, gt=0, description="pool embeddings per local-term batch (reference: 1024)")
    tau: float = Field(0.1, gt=0.0, description="temperature of the local term")
    temperature: float = Field(1.0, gt=0.0, description="temperature T of the global term")
    patience: int = Field(3, gt=0, description="early stopping: epochs without held-out improvement")
    val_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="share of each fold's training triplets held out by triplet (their objects "
        "are fitted): early stopping, any search's choice, VICE's early stopping and the secondary triplet-split "
        "figure; never the held-out fold (at most val_max_triplets rows)"
    )
    val_max_triplets: int = Field(
        20000, gt=0, description="cap on the early-stopping split's rows (a THINGS file's 2.4M training triplets per "
        "fold need no 10% to stop on: 20,000 give a loss to about ±0.4%)"
    )
    chunk_rows: int = Field(4096, gt=0, description="rows per chunk when applying the transform to a store")
    soft_targets: Literal["auto", "vice"] = Field(
        "auto", description="with targets 'soft': auto = human.probabilities (or the demo proxy's) when there are "
        "some, else fit VICE on each fold's training triplets; vice = always VICE's posterior-predictive probabilities"
    )
    search_alphas: list[float] | None = Field(None, description="search: alpha values to try (null: alpha only)")
    search_lams: list[float] | None = Field(None, description="search: lam values to try (null: lam only)")
    search_lrs: list[float] | None = Field(None, description="search: lr values to try (null: lr only)")
    search_folds: int = Field(3, ge=2, description="search: folds of the cross-validation over each fold's training "
                              "objects (and over all objects for the refit on every triplet)")
    search_min_knn_overlap: float | None = Field(
        None, ge=0.0, le=1.0, description="search: only settings keeping at least this k-NN overlap are chosen"
    )
