"""Typed, validated configs: one per stage, nested in the pipeline config that loads from YAML.

Every model forbids unknown fields, so a typo fails loudly with the field's name instead of
being silently ignored. `load_config` turns pydantic's errors into one `ConfigError` whose
message names each offending field and what was expected.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from alignet_core.errors import ConfigError
from alignet_core.io.limits import MAX_CONFIG_BYTES, load_yaml, short

Device = Literal["auto", "cpu", "cuda"]
SamplingStrategy = Literal[
    "between_class", "within_class", "class_border", "cluster", "cluster_border"
]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


# why one list of devices must be of one kind, per use
_ONE_KIND_EMBED = "GPUs embed in bf16, the CPU in float32, so one store would hold rows of two precisions"
_ONE_KIND_RANKS = ("all ranks join one process group (NCCL for GPUs, gloo for CPUs) and must compute in one "
                   "precision (GPUs train in bf16, the CPU in float32) to follow one trajectory")


def device_list_problem(devices: list[str], one_kind_because: str = _ONE_KIND_EMBED) -> str | None:
    """What is wrong with a list of device strings ('cpu' or 'cuda' / 'cuda:<i>', one kind), or None.
    `one_kind_because` says, in the message for a mix of cpu and cuda, why one kind is needed."""
    if not devices:
        return "an empty list; give devices such as ['cuda:0', 'cuda:1'] or null"
    bad = [d for d in devices if not isinstance(d, str) or not re.fullmatch(r"cpu|cuda(:[0-9]+)?", d)]
    if bad:
        return f"{bad} are not devices; expected 'cpu', 'cuda' or 'cuda:<index>'"
    if len({d.split(":")[0] for d in devices}) > 1:
        return f"{list(devices)} mixes cpu and cuda; use one kind ({one_kind_because})"
    return None


def rank_devices_problem(devices: list[str]) -> str | None:
    """What is wrong with `distill.devices` as one training rank per entry, or None: `device_list_problem`,
    and a GPU named twice (NCCL runs one rank per GPU; 'cuda' is 'cuda:0'). CPU ranks may repeat 'cpu'."""
    problem = device_list_problem(devices, _ONE_KIND_RANKS)
    if problem:
        return problem
    gpus = ["cuda:0" if d == "cuda" else d for d in devices if d.startswith("cuda")]
    twice = sorted({d for d in gpus if gpus.count(d) > 1})
    if twice:
        return f"{twice} named more than once; NCCL runs one rank per GPU, so give each GPU once"
    return None


def check_micro_batches(batch_triplets: int, grad_accum: int, ranks: int, nodes: int = 1) -> None:
    """`ConfigError` unless ranks·grad_accum micro-batches cut batch_triplets into equal shares; it names
    distill.grad_accum for one rank, distill.devices (and nodes) for several."""
    micro = ranks * grad_accum
    if batch_triplets % micro == 0:
        return
    if ranks == 1:
        raise ConfigError(f"distill.grad_accum: {grad_accum} must divide distill.batch_triplets "
                          f"({batch_triplets}) into equal micro-batches")
    where = f"{ranks} ranks ({nodes} nodes × {ranks // nodes} devices)" if nodes > 1 else f"{ranks} ranks"
    raise ConfigError(
        f"distill.devices: {where} × distill.grad_accum {grad_accum} = {micro} micro-batches must divide "
        f"distill.batch_triplets ({batch_triplets}) into equal shares; use a rank count (or grad_accum) that "
        f"divides it, or a batch_triplets that is a multiple of {micro}"
    )


def _devices_validator(problem_of: Callable[[list[str]], str | None]) -> Any:
    """A validator of a `devices` field: the strings are checked when the config loads (`problem_of`);
    whether the GPUs exist is checked before the stage runs (`hardware.resolve_devices`)."""

    def check(cls: type, v: list[str] | None) -> list[str] | None:
        problem = None if v is None else problem_of(v)
        if problem:
            raise ValueError(problem)
        return v

    return field_validator("devices")(check)


class SourceConfig(_Config):
    """Where the images come from."""

    kind: Literal["demo", "folder", "filelist", "tar", "embeddings"] = Field(
        "demo",
        description="demo: the shipped emoji set; folder: class/*.ext tree; filelist: CSV/txt of paths; "
        "tar: webdataset-style tar shards (<key>.<img ext> members, optional <key>.cls/.txt label); "
        "embeddings: an existing (n, p) embedding array imported into the embed stage's store instead of "
        "extracting (README: 'Starting from embeddings you already have')",
    )
    path: str | None = Field(
        None, description="folder root, file-list path, or tar shard URL/glob (fsspec URL); unused for demo; "
        "embeddings: the array, a local path (.npy memory-mapped, .h5/.hdf5, .zarr array or group, .pt tensor) or "
        "a thingsvision output folder (features.npy/.hdf5/.pt + file_names.txt)"
    )
    format: Literal["auto", "npy", "hdf5", "zarr", "pt", "thingsvision"] = Field(
        "auto", description="embeddings only: the array's format; auto: by extension, a folder holding "
        "file_names.txt is a thingsvision output, another folder a Zarr store"
    )
    dataset: str | None = Field(
        None, description="embeddings only: the array's name inside an HDF5 file, a Zarr group or a .pt dict "
        "(null: 'features' or 'embeddings' when present, else the only 2-d array)"
    )
    ids: str | None = Field(
        None, description="embeddings only: text file of image ids, one per line in row order (required unless "
        "the format carries them: a thingsvision folder's file_names.txt)"
    )
    labels: str | None = Field(
        None, description="embeddings only: optional text file of class labels, one per line in row order (an "
        "empty line: no label); used by the class strategies, cluster agreement and the taxonomy proxy"
    )
    images: "SourceConfig | None" = Field(
        None, description="embeddings only: an image source (kind demo/folder/filelist/tar) whose images are joined "
        "to the rows by id, for the stages that need pixels (distill, student evaluation); null: those are "
        "skipped, saying so"
    )
    label_level: Literal["category", "subcategory"] | None = Field(
        None, description="demo only: which emoji metadata column is the image's class label (null: category)"
    )
    path_column: str = Field("path", description="CSV file list only: the column of image paths (relative to the "
                             "list's folder, or absolute)")
    label_columns: list[str] | None = Field(
        None, description="CSV file list only: one or two label columns, coarse → fine (e.g. [category, "
        "subcategory]); the first is the image's class label (class strategies, cluster agreement), both together "
        "the taxonomy of the proxy and the evaluation levels; null: the 'label' column when there is one"
    )
    id_column: str | None = Field(
        None, description="CSV file list only: the column of stable image ids (null: the path relative to the list's "
        "folder, or the absolute path for a file outside it)"
    )
    limit: int | None = Field(
        None, gt=2, description="use an evenly spaced subset of this many images (quick runs and tests)"
    )

    @model_validator(mode="after")
    def _path_needed(self) -> "SourceConfig":
        if self.kind != "demo" and not self.path:
            raise ValueError(f"source.path is required when source.kind is '{self.kind}'")
        embeddings_only = [f for f, default in (("format", "auto"), ("dataset", None), ("ids", None), ("labels", None),
                                                ("images", None)) if getattr(self, f) != default]
        if embeddings_only and self.kind != "embeddings":
            raise ValueError(f"source.{embeddings_only[0]} applies to source.kind 'embeddings' only, not to "
                             f"'{self.kind}'")
        if self.images is not None and self.images.kind == "embeddings":
            raise ValueError("source.images: expected an image source (kind demo, folder, filelist or tar), "
                             "not 'embeddings'")
        if self.kind == "embeddings" and self.limit is not None:
            raise ValueError("source.limit does not apply to source.kind 'embeddings': every row of the array is "
                             "imported (cut the array, its ids and labels files instead)")
        if self.label_level is not None and self.kind != "demo":
            raise ValueError(f"source.label_level applies to the demo set only, not to source.kind '{self.kind}'; "
                             "for a CSV file list give source.label_columns")
        csv_list = self.kind == "filelist" and str(self.path).lower().endswith(".csv")
        given = [f for f, default in (("path_column", "path"), ("label_columns", None), ("id_column", None))
                 if getattr(self, f) != default]
        if given and not csv_list:
            raise ValueError(f"source.{given[0]} applies to a CSV file list (source.kind 'filelist' with a .csv "
                             f"source.path) only, not to source.kind '{self.kind}' with path {self.path!r}")
        if self.label_columns is not None and not (1 <= len(self.label_columns) <= 2
                                                   and len(set(self.label_columns)) == len(self.label_columns)):
            raise ValueError(f"source.label_columns: expected one or two distinct columns (coarse, fine), got "
                             f"{self.label_columns}")
        return self


class EmbedConfig(_Config):
    """Stage 0: teacher embeddings of every image."""

    model: str = Field("tf_efficientnet_lite2", description="timm model name of the teacher")
    weights: str | None = Field(
        "packaged",
        description="'packaged' (weights shipped by a pip package), a local .safetensors/.pth path, or null for random init",
    )
    batch_size: int = Field(64, gt=0, description="images per forward pass")
    chunk_rows: int = Field(256, gt=0, description="rows per Zarr chunk; the unit of resume")
    store_dtype: Literal["float16", "float32"] = Field("float32", description="dtype of the stored embeddings")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes for decoding")
    layers: list[str] = Field(
        default_factory=list,
        description="extra timm module names captured in the same forward pass (globally average-pooled), "
        "stored as layers/<name>",
    )
    compile: bool = Field(
        False,
        description="torch.compile the forward pass (one fixed batch shape: short batches are zero-padded); pays "
        "on GPUs for long runs. Part of the stage's key: compiled kernels round differently from eager ones",
    )
    devices: list[str] | None = Field(
        None,
        description="several devices, e.g. ['cuda:0', 'cuda:1']: one Dask worker process per device (each with "
        "num_workers loader processes) over its own chunk-aligned rows, into the same store; null: the pipeline's "
        "`device`",
    )
    max_skipped_fraction: float = Field(
        0.01, ge=0, le=1,
        description="the run fails (after the embeddings are kept) when more than this fraction of the images "
        "could not be read or decoded, naming the count and the reasons; 0: any skipped image fails, 1: never. "
        "Not part of the stage's key: raising it and rerunning reuses the embeddings",
    )
    decode: Literal["pil", "torchvision"] = Field(
        "pil",
        description="pil: decode + resize in DataLoader workers; torchvision: workers only read bytes, JPEGs are "
        "decoded in batches on the extraction device (nvjpeg on GPUs) and resized there (other files: PIL)",
    )

    _known_devices = _devices_validator(device_list_problem)


ProxyLevel = Literal["global", "local", "class_boundary"]


class HumanConfig(_Config):
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
        5, ge=3, description="objects are dealt into this many folds (seeded): one test fold, one validation fold "
        "(early stopping, model choice), the rest train; a triplet belongs to a role only when all its objects do"
    )
    test_fold: int = Field(0, ge=0, description="the fold held out for every reported human figure; the next "
                           "fold (mod folds) is the validation fold")
    proxy_n_triplets: int = Field(20000, gt=0, description="taxonomy proxy: number of triplets to make (over all roles)")
    proxy_mix: dict[ProxyLevel, float] = Field(
        default_factory=lambda: {"global": 0.5, "local": 0.5},
        description="taxonomy proxy: weight of each abstraction level (global, local, class_boundary; see "
        "alignet_core.human.levels) among the proxy triplets",
    )
    proxy_noise: float = Field(0.1, ge=0.0, lt=1.0, description="taxonomy proxy: fraction of responses flipped at random")

    @model_validator(mode="after")
    def _fold_and_mix(self) -> "HumanConfig":
        declared = [f for f in ("concepts", "objects") if getattr(self, f)] + (["positional"] if self.positional else [])
        if len(declared) > 1:
            raise ValueError(f"human: {' and '.join('human.' + f for f in declared)} each declare how objects attach "
                             "to images; give one")
        if self.test_fold >= self.folds:
            raise ValueError(f"human.test_fold: {self.test_fold} must be below human.folds ({self.folds})")
        if any(v < 0 for v in self.proxy_mix.values()) or not sum(self.proxy_mix.values()) > 0:
            raise ValueError(f"human.proxy_mix: weights must be non-negative with a positive sum, got {self.proxy_mix}")
        return self

    @property
    def val_fold(self) -> int:
        return (self.test_fold + 1) % self.folds


class TransformConfig(_Config):
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
        0.1, gt=0.0, lt=1.0, description="share of the training triplets held out by triplet (objects seen in the "
        "fit): VICE's early stopping and the secondary, triplet-split figure; reported figures use human.folds"
    )
    chunk_rows: int = Field(4096, gt=0, description="rows per chunk when applying the transform to a store")
    soft_targets: Literal["auto", "vice"] = Field(
        "auto", description="with targets 'soft': auto = human.probabilities (or the demo proxy's) when there are "
        "some, else fit VICE on the training triplets; vice = always VICE's posterior-predictive probabilities"
    )
    search_alphas: list[float] | None = Field(None, description="search: alpha values to try (null: alpha only)")
    search_lams: list[float] | None = Field(None, description="search: lam values to try (null: lam only)")
    search_lrs: list[float] | None = Field(None, description="search: lr values to try (null: lr only)")
    search_folds: int = Field(3, ge=2, description="search: folds of the cross-validation over objects")
    search_min_knn_overlap: float | None = Field(
        None, ge=0.0, le=1.0, description="search: only settings keeping at least this k-NN overlap are chosen"
    )


class ViceConfig(_Config):
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


class ClusterConfig(_Config):
    """Stage 2: superordinate clusters by k-means."""

    k: int = Field(12, gt=1, description="number of clusters")
    niter: int = Field(25, gt=0, description="k-means iterations")
    nredo: int = Field(1, gt=0, description="k-means restarts; the best objective is kept")
    spherical: bool = Field(False, description="cosine k-means (normalized centroids)")
    max_points_per_centroid: int = Field(256, gt=0, description="training subsample size per centroid")
    min_cluster_size: int = Field(
        5, ge=0, description="no cluster ends smaller: a smaller one is dissolved and re-seeded by splitting the "
        "largest (FAISS's min_points_per_centroid idea; 0 or 1: off); reported in the cluster artifact"
    )
    chunk_rows: int = Field(65536, gt=0, description="rows per chunk when assigning the store")
    use_gpu: Literal["auto", "never"] = Field(
        "auto", description="a GPU when there is one: FAISS's own, else torch's CUDA (see hardware.kmeans_backend)"
    )


class SampleConfig(_Config):
    """Stage 3: triplet sampling and teacher responses."""

    strategies: list[SamplingStrategy] = Field(
        default_factory=lambda: ["cluster_border", "between_class"], description="sampling strategies to publish"
    )
    n_train: int = Field(20000, gt=0, description="training triplets per strategy")
    n_valid: int = Field(2000, gt=0, description="validation triplets per strategy")
    shard_size: int = Field(5000, gt=0, description="triplets per shard, the unit of parallelism and resume")
    n_workers: int = Field(2, gt=0, description="local Dask workers (ignored with dask_address)")
    dask_address: str | None = Field(None, description="address of an existing Dask scheduler")


class HarmonizeConfig(_Config):
    """The neural harmonizer beside the AligNet loss (alignet_core/distill/harmonizer.py): align where the
    student looks (its saliency) with importance maps."""

    weight: float = Field(1.0, gt=0.0, description="λ of the pyramidal saliency term (the reference's 1.0)")
    levels: int = Field(5, ge=1, le=8, description="levels of the binomial pyramid the term compares maps on")
    maps: str = Field(
        "proxy", min_length=1,
        description="'proxy' (the demo: each image's blurred alpha silhouette, a proxy for where the object is) or a "
        "folder of <image id>.png / <image id>.npy maps; images without a map do not enter the term",
    )
    labels: Literal["top1"] = Field(
        "top1", description="whose logit's saliency: 'top1' = the backbone classifier's own top-1 class (the only "
        "choice: triplet datasets carry no class indices of the backbone's classifier)",
    )


class DistillConfig(_Config):
    """Stage 4: finetune a student on the published triplets."""

    enabled: bool = Field(True, description="false: stop after publishing the dataset")
    student: str = Field("tf_efficientnet_lite0", description="timm model name of the student")
    weights: str | None = Field("packaged", description="as embed.weights")
    head_dim: int = Field(1024, gt=0, description="output width of the new linear triplet head")
    image_size: int | None = Field(
        None, gt=0, description="square input size overriding the model's pretrained one (null: the model's)"
    )
    strategy: SamplingStrategy = Field("cluster_border", description="which published sampling to train on")
    dataset: str | None = Field(
        None,
        description="a folder of official-format files (train_<sampling>.npz, valid_*.npz) to train on instead of "
        "this pipeline's own dataset, e.g. a downloaded AligNet release; null: the dataset the pipeline publishes",
    )
    sampling: str | None = Field(
        None,
        description="with distill.dataset: the file name's sampling (train_<sampling>.npz, e.g. cluster_border_500); "
        "null: from distill.strategy and cluster.k",
    )
    join: Literal["auto", "indices", "filenames"] = Field(
        "auto",
        description="how triplets find their images: 'indices' = rows of the image source, their filenames checked "
        "against those rows' ids; 'filenames' = the files' filenames matched to the source's image ids or file names; "
        "auto = filenames for distill.dataset (a folder the pipeline did not publish), indices for its own",
    )
    cache_images: bool = Field(
        False, description="decode every training image once and keep it in memory (pools that fit in RAM)"
    )
    compile: bool = Field(
        False, description="torch.compile the student's training forward pass (worth it on a GPU for long runs; "
        "the first steps pay a one-off compile)"
    )
    steps: int = Field(150, gt=0, description="optimizer steps")
    batch_triplets: int = Field(32, gt=0, description="triplets per optimizer step")
    grad_accum: int = Field(1, gt=0, description="micro-batches per step")
    lr: float = Field(1e-4, gt=0.0, description="peak learning rate")
    warmup_steps: int = Field(15, ge=0, description="linear warm-up steps")
    loss: Literal["jsd", "kl", "hard"] = Field("jsd", description="AligNet loss variant")
    tau: float = Field(100.0, gt=0.0, description="temperature of the student's similarities")
    decay_to_init: float = Field(1.0, ge=0.0, description="weight of the decoupled decay toward pretrained weights")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints")
    n_eval: int = Field(1000, gt=0, description="held-out triplets per sampling for evaluation")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (per rank)")
    devices: list[str] | None = Field(
        None,
        description="data-parallel training, one rank per entry: e.g. ['cuda:0', 'cuda:1'] (NCCL) or ['cpu', 'cpu'] "
        "(gloo), started by torchrun; each rank takes its share of every step's batch_triplets, so the run follows "
        "the one-process trajectory; null: one process on the pipeline's `device`",
    )
    nodes: int = Field(
        1, gt=0, description="machines training together, each running `devices`; above 1 the ranks are started "
        "by torchrun on every node (README, 'Scaling out'), not by the stage",
    )

    harmonize: HarmonizeConfig | None = Field(
        None, description="the neural harmonizer's saliency term beside the AligNet loss (one process only); "
        "null: off",
    )

    _rank_devices = _devices_validator(rank_devices_problem)

    @model_validator(mode="after")
    def _harmonize_in_one_process(self) -> "DistillConfig":
        if self.harmonize is None:
            return self
        if (self.devices is not None and len(self.devices) > 1) or self.nodes > 1:
            raise ValueError("distill.harmonize: the harmonizer trains in one process; set distill.devices to one "
                             "device and distill.nodes to 1, or distill.harmonize to null")
        if self.compile:
            raise ValueError("distill.harmonize: the harmonizer's double backward runs uncompiled; set "
                             "distill.compile to false")
        return self


class EvalSetConfig(_Config):
    """An evaluation set of odd-one-out triplets from a file the pipeline did not make."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the set's column name in reports")
    triplets: str = Field(description="THINGS-format file: rows 'i j k' of image rows (0-based, source order), "
                          "k the odd one out")
    probabilities: str | None = Field(None, description=".npy (n, 3) human choice probabilities of the pairs "
                                      "(i,j), (i,k), (j,k) of each row (optional)")


class EvaluateConfig(_Config):
    """The evaluation stage: alignment of the teacher and the student, before and after, at three
    levels of abstraction, on held-out human triplets and on any given set."""

    enabled: bool = Field(True, description="false: no evaluation stage")
    levels: list[ProxyLevel] = Field(
        default_factory=lambda: ["global", "local", "class_boundary"],
        description="abstraction levels to build from the source's two-level taxonomy, over the test fold's images "
        "(alignet_core.human.levels)",
    )
    n_per_level: int = Field(1000, gt=0, description="triplets per level")
    student: str | None = Field(
        None, description="a distillation output folder (student.safetensors, head.safetensors, train_log.json) of "
        "distill.student to evaluate; null: the pipeline's own student (none when distill is disabled)"
    )
    sets: list[EvalSetConfig] = Field(default_factory=list, description="more evaluation sets from files")
    batch_size: int = Field(128, gt=0, description="images per forward pass when the students embed them")
    saliency_maps: str | None = Field(
        None, description="the 'where' metric: 'proxy' (the demo's blurred alpha silhouettes, a proxy) or a folder of "
        "<image id>.png/.npy importance maps; Spearman and top-10% IoU/Dice of the raw and finetuned students' "
        "saliency against them on test-fold images the distillation did not train on; null: off",
    )
    saliency_images: int = Field(256, gt=0, description="at most this many images for the 'where' metric")


class PipelineConfig(_Config):
    """The whole pipeline: where artifacts go, the seed, the hardware and every stage."""

    root: str = Field("alignet-data", description="artifact root (local path or fsspec URL)")
    dataset_name: str = Field(
        "demo",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="name of the published dataset; a plain folder name (letters, digits, '.', '_', '-'), "
        "so the dataset stays under <root>/datasets/",
    )
    keep_versions: int | None = Field(
        None, ge=1, description="published versions of the dataset to keep (oldest deleted first; null: keep all)"
    )
    lock_timeout: float | None = Field(
        None,
        ge=0,
        description="seconds a stage waits for another run writing the same output on this root; "
        "null: as long as it takes (then reuses that output), 0: fail at once",
    )
    seed: int = Field(0, ge=0, description="fixes every random choice")
    device: Device = Field("auto", description="auto: cuda when available, else cpu")
    source: SourceConfig = Field(default_factory=SourceConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    human: HumanConfig = Field(default_factory=HumanConfig)
    transform: TransformConfig = Field(default_factory=TransformConfig)
    vice: ViceConfig = Field(default_factory=ViceConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @field_validator("root")
    @classmethod
    def _local_urls_as_paths(cls, v: str) -> str:
        """`file://` roots are local paths: written as such, every writer (Zarr's included) uses
        the local file system directly."""
        return v.removeprefix("file://") or "/"


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed in the config section that holds the field at `loc`."""
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        info = model.model_fields.get(str(part))
        ann = info.annotation if info is not None else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


MAX_PROBLEMS = 5  # problems one config error lists (a file of thousands of bad fields stays one short line)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _section_fields(tuple(e["loc"]))
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"{where}: unknown field{hint}; expected one of {allowed}")
            continue
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {short(got)})"
        lines.append(f"{where}: {e['msg']}{got_s}")
    more = f"; and {len(lines) - MAX_PROBLEMS} more problem(s)" if len(lines) > MAX_PROBLEMS else ""
    return "; ".join(lines[:MAX_PROBLEMS]) + more


def parse_config(data: dict[str, Any] | None) -> PipelineConfig:
    """Validate a plain dict into a `PipelineConfig`; raise `ConfigError` naming each bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of fields, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid config: {_describe(err)}") from None


def load_config(path: str | Path) -> PipelineConfig:
    """Read a YAML pipeline config; a missing file or bad YAML is a `ConfigError`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(p)!r}: {p.stat().st_size} bytes, more than the {MAX_CONFIG_BYTES} "
                          "a config may have")
    try:
        data = load_yaml(p.read_text(), f"config file {str(p)!r}")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}: {what}") from None
    return parse_config(data)


def with_overrides(cfg: PipelineConfig, overrides: dict[str, Any]) -> PipelineConfig:
    """Apply dotted overrides ({'cluster.k': 20}) and re-validate."""
    data = cfg.model_dump()
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a config section")
            node = node[part]
        node[parts[-1]] = value
    return parse_config(data)
