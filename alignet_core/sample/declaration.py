"""The sample stage's declaration for the registry (data: no stage code is imported here). In a flow its
work is split into shards sampled in parallel on Dask; `run` is the same work in one process."""

from __future__ import annotations

from alignet_core.runtime.declaration import Stage

STAGE = Stage(
    name="sample", summary="triplets sampled on Dask, published as AligNet .npz", section="sample",
    inputs=("transform", "cluster"), run="alignet_core.sample.stage:run_sample",
    output="alignet_core.sample.stage:SampleOutput", deployment="publish-triplets",
    check="alignet_core.sample.checks:check",
    example="--set sample.n_train=1000000",
)
