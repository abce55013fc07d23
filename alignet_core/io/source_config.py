"""The `source` section of the config: where the images (or imported embeddings) come from."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignet_core.records import ConfigModel


class SourceConfig(ConfigModel):
    """Where the images come from."""

    kind: Literal["demo", "folder", "filelist", "tar", "embeddings"] = Field(
        "demo",
        description="demo: the shipped emoji set; folder: class/*.ext tree; filelist: CSV/txt of paths; "
        "tar: webdataset-style tar shards (<key>.<img ext> members, optional <key>.cls/.txt label); "
        "embeddings: an existing (n, p) embedding array imported into the embed stage's store instead of "
        "extracting (docs/your-data.md, 'Starting from embeddings you already have')",
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
