"""The `embed` section of the config (stage 0)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignet_core.config.base import device_list_problem, devices_validator
from alignet_core.records import NOT_IN_KEY, ConfigModel


class EmbedConfig(ConfigModel):
    """Stage 0: teacher embeddings of every image."""

    model: str = Field("tf_efficientnet_lite2", description="timm model name of the teacher")
    weights: str | None = Field(
        "packaged",
        description="'packaged' (weights shipped by a pip package), a local .safetensors/.pth path, or null for random init",
    )
    image_size: int | None = Field(
        None, gt=0,
        description="square input size in pixels instead of the model's pretrained one (same interpolation, crop "
        "fraction, mean and std); compute grows with its square. null: the model's own (Lite2: 260)",
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
        None, json_schema_extra=NOT_IN_KEY,
        description="several devices, e.g. ['cuda:0', 'cuda:1']: one Dask worker process per device (each with "
        "num_workers loader processes) over its own chunk-aligned rows, into the same store; null: the pipeline's "
        "`device`",
    )
    max_skipped_fraction: float = Field(
        0.01, ge=0, le=1, json_schema_extra=NOT_IN_KEY,
        description="the run fails (after the embeddings are kept) when more than this fraction of the images "
        "could not be read or decoded, naming the count and the reasons; 0: any skipped image fails, 1: never. "
        "Not part of the stage's key: raising it and rerunning reuses the embeddings",
    )
    decode: Literal["pil", "torchvision"] = Field(
        "pil",
        description="pil: decode + resize in DataLoader workers; torchvision: workers only read bytes, JPEGs are "
        "decoded in batches on the extraction device (nvjpeg on GPUs) and resized there (other files: PIL)",
    )

    _known_devices = devices_validator(device_list_problem)
