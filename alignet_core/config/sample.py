"""The `sample` section of the config (stage 3)."""

from __future__ import annotations

from pydantic import Field

from alignet_core.config.base import SamplingStrategy
from alignet_core.records import NOT_IN_KEY, ConfigModel


class SampleConfig(ConfigModel):
    """Stage 3: triplet sampling and teacher responses."""

    strategies: list[SamplingStrategy] = Field(
        default_factory=lambda: ["cluster_border", "between_class"], description="sampling strategies to publish"
    )
    n_train: int = Field(20000, gt=0, description="training triplets per strategy")
    n_valid: int = Field(2000, gt=0, description="validation triplets per strategy")
    shard_size: int = Field(5000, gt=0, description="triplets per shard, the unit of parallelism and resume")
    n_workers: int = Field(2, gt=0, json_schema_extra=NOT_IN_KEY,
                           description="local Dask workers (ignored with dask_address); also the threads that "
                           "publish that many strategies at once")
    dask_address: str | None = Field(None, json_schema_extra=NOT_IN_KEY,
                                     description="address of an existing Dask scheduler, tls:// only (its replies are "
                                     "unpickled in this process): give the three sample.dask_tls_* files with it")
    dask_tls_ca_file: str | None = Field(None, json_schema_extra=NOT_IN_KEY,
                                         description="with dask_address: the CA certificate (PEM) the scheduler's "
                                         "certificate must be signed by")
    dask_tls_cert: str | None = Field(None, json_schema_extra=NOT_IN_KEY,
                                      description="with dask_address: this client's certificate (PEM)")
    dask_tls_key: str | None = Field(None, json_schema_extra=NOT_IN_KEY,
                                     description="with dask_address: this client's private key (PEM)")
