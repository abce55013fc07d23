"""The `distill` section of the config (stage 4), and the arithmetic of its ranks and micro-batches."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignet_core.config.base import SamplingStrategy, device_list_problem, devices_validator
from alignet_core.records import NOT_IN_KEY, ConfigModel

_ONE_KIND_RANKS = ("all ranks join one process group (NCCL for GPUs, gloo for CPUs) and must compute in one "
                   "precision (GPUs train in bf16, the CPU in float32) to follow one trajectory")


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


class HarmonizeConfig(ConfigModel):
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


class DistillConfig(ConfigModel):
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
    train_blocks: int | None = Field(
        None, ge=0,
        description="train only the last N of the student's blocks (timm's EfficientNet-class models: EfficientNet, -Lite, MobileNet V2, MixNet), its "
        "head layers and the triplet head; the frozen front runs once per training image, so a step costs only the "
        "trained part (0: the head layers and triplet head alone); null: the whole student, as the AligNet reference",
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
        None, json_schema_extra=NOT_IN_KEY,
        description="data-parallel training, one rank per entry: e.g. ['cuda:0', 'cuda:1'] (NCCL) or ['cpu', 'cpu'] "
        "(gloo), started by torchrun; each rank takes its share of every step's batch_triplets, so the run follows "
        "the one-process trajectory; null: one process on the pipeline's `device`",
    )
    nodes: int = Field(
        1, gt=0, json_schema_extra=NOT_IN_KEY, description="machines training together, each running `devices`; above 1 the ranks are started "
        "by torchrun on every node (docs/scaling.md), not by the stage",
    )

    harmonize: HarmonizeConfig | None = Field(
        None, description="the neural harmonizer's saliency term beside the AligNet loss (one process only); "
        "null: off",
    )

    _rank_devices = devices_validator(rank_devices_problem)

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
        if self.train_blocks is not None:
            raise ValueError("distill.harmonize: the harmonizer needs the gradient of the whole student with "
                             "respect to its input; set distill.train_blocks to null, or distill.harmonize to null")
        return self
