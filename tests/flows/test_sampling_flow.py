"""Sampling on real Dask clusters of different sizes gives byte-identical published files.

The fast test drives `dataset.run_shard` through a plain `distributed.Client` on LocalClusters
of 1, 2 and 4 workers and publishes with `assemble_dataset`; the slow one runs the Prefect
pipeline (DaskTaskRunner with `sample.n_workers` = 1, 2, 4 worker processes) on fresh roots.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from alignet_core.io import embedding_store
from alignet_core.sample.publish import assemble_dataset
from alignet_core.sample.shards import plan_shards, run_shard

NAMES = {"cluster_border": "cluster_border_6", "between_class": "between_class"}


def _digest(folder: str | Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob("*.npz"))}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dask-pool")
    rng = np.random.default_rng(5)
    n, p = 500, 16
    ids = np.array([f"img/{i:04d}.jpg" for i in range(n)])
    url = str(root / "emb.zarr")
    g = embedding_store.create_embedding_store(url, n, p, ids, "float16", 64, {})
    g["embeddings"][:] = rng.normal(size=(n, p)).astype(np.float16)
    g["valid"][:] = rng.random(n) > 0.05
    np.save(root / "clusters.npy", rng.integers(0, 6, n))
    np.save(root / "classes.npy", rng.integers(0, 20, n))
    return {"store": url, "ids": ids,
            "groups": {"cluster_border": str(root / "clusters.npy"), "between_class": str(root / "classes.npy")}}


def _publish_on_dask(pool: dict, root: Path, n_workers: int) -> dict[str, str]:
    from distributed import Client, LocalCluster

    specs = plan_shards(list(NAMES), 3000, 600, 500, seed=11)
    out = str(root / "work")
    # in-process workers keep the test fast; the slow test below uses worker processes
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        futures = [client.submit(run_shard, s, pool["groups"][s.strategy], pool["store"], out, pure=False)
                   for s in reversed(specs)]  # submission order must not matter either
        client.gather(futures)
    assemble_dataset(out, specs, pool["ids"], str(root / "published"), NAMES)
    return _digest(root / "published")


def test_byte_identical_npz_on_1_2_and_4_dask_workers(pool: dict, tmp_path: Path) -> None:
    digests = {w: _publish_on_dask(pool, tmp_path / f"w{w}", w) for w in (1, 2, 4)}
    assert len(digests[1]) == 4
    assert digests[1] == digests[2] == digests[4]


def test_sample_flow_workers_start_with_the_buffer_reuse_plugin(tmp_path: Path) -> None:
    """The flow's local cluster passes `SamplingWorkerSetup` to every worker process (the teacher's C kernel
    is loaded there before any task, or torch where it cannot be built), and the glibc call it makes is
    accepted on this machine."""
    from distributed import Client, LocalCluster

    from alignet_core.config import PipelineConfig
    from alignet_core.sample import native
    from flows.dask_workers import SamplingWorkerSetup, reuse_freed_buffers
    from flows.sample import dask_runner

    def kernel_and_torch() -> tuple[bool, bool]:  # in the worker (defined here: pickled by value)
        import sys

        from alignet_core.sample import native

        return native.library.cache_info().currsize == 1, "torch" in sys.modules

    kwargs = dask_runner(PipelineConfig(root=str(tmp_path))).cluster_kwargs
    assert any(isinstance(p, SamplingWorkerSetup) for p in kwargs["plugins"])
    kwargs = {**kwargs, "n_workers": 1, "env": {}}
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        seen = client.run(lambda dask_worker: sorted(dask_worker.plugins))
        profiling = client.run(lambda dask_worker: "profile" in dask_worker.periodic_callbacks)
        where = client.run(kernel_and_torch)
    assert [SamplingWorkerSetup.name in names for names in seen.values()] == [True]
    (looked_up, torch_loaded), = where.values()
    assert looked_up  # the kernel was built or loaded at start-up
    assert torch_loaded == (native.library() is None)
    assert list(profiling.values()) == [False]
    assert reuse_freed_buffers() is True


@pytest.mark.slow
def test_prefect_dask_runner_byte_identical_on_1_2_and_4_worker_processes(tmp_path: Path) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.alignet import alignet

    def run(root: Path, workers: int) -> dict[str, str]:
        overrides = {"root": str(root), "source.limit": 120, "human.proxy_n_triplets": 3000,
                     "transform.epochs": 4, "cluster.k": 5, "sample.n_train": 1200, "sample.n_valid": 300,
                     "sample.shard_size": 200, "sample.n_workers": workers, "distill.enabled": False}
        state = alignet(overrides=overrides, return_state=True)
        assert state.is_completed(), state
        return _digest(state.result().dataset)

    with prefect_test_harness(server_startup_timeout=120):
        digests = {w: run(tmp_path / f"w{w}", w) for w in (1, 2, 4)}
    assert len(digests[1]) == 4
    assert digests[1] == digests[2] == digests[4]


@pytest.mark.slow
def test_pipeline_on_an_existing_dask_cluster_by_address(tmp_path: Path) -> None:
    """`sample.dask_address`: the shards run on a cluster started outside the pipeline (its
    workers, not local ones, make them), reached over mutual TLS with the configured files, which also
    gets the worker set-up plugin; the published files equal those of the default local cluster."""
    from distributed import Client, LocalCluster
    from distributed.security import Security
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.alignet import alignet
    from flows.dask_workers import SamplingWorkerSetup

    overrides = {"source.limit": 120, "human.proxy_n_triplets": 3000, "transform.epochs": 4, "cluster.k": 5,
                 "sample.n_train": 1200, "sample.n_valid": 300, "sample.shard_size": 200, "distill.enabled": False}

    def run(root: Path, **extra: object) -> dict[str, str]:
        state = alignet(overrides={**overrides, "root": str(root), **extra}, return_state=True)
        assert state.is_completed(), state
        return _digest(state.result().dataset)

    sec = Security.temporary()  # the outside cluster's own credentials; the pipeline gets them as files
    tls = {}
    for field, pem in (("ca_file", sec.tls_ca_file), ("cert", sec.tls_client_cert), ("key", sec.tls_client_key)):
        (tmp_path / f"{field}.pem").write_text(pem)
        tls[f"sample.dask_tls_{field}"] = str(tmp_path / f"{field}.pem")
    with prefect_test_harness(server_startup_timeout=120):
        env = {"PREFECT_API_URL": str(get_current_settings().api.url)}
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, env=env,
                          security=sec, protocol="tls://") as cluster, Client(cluster) as client:
            assert cluster.scheduler_address.startswith("tls://")
            remote = run(tmp_path / "remote", **{"sample.dask_address": cluster.scheduler_address, **tls})
            done = client.run(lambda dask_worker: (sorted(dask_worker.plugins), len(dask_worker.state.tasks)
                                                   + dask_worker.state.transition_counter))
        local = run(tmp_path / "local")
    assert len(remote) == 4 and remote == local
    assert all(SamplingWorkerSetup.name in names and work > 0 for names, work in done.values())


def test_a_failed_shard_raises_its_own_error_not_a_later_one() -> None:
    """A shard that fails (after its retries) stops the sampling flow with the shard's own error; before, the
    flow went on to publish and promote and failed there with `AttributeError: 'NoneType' object has no
    attribute 'key'`. A real flow on Prefect's test harness; the shard a real task that raises."""
    from types import SimpleNamespace

    from prefect import flow, task
    from prefect.testing.utilities import prefect_test_harness

    from alignet_core.errors import InputError
    from tasks.sample import follow_shards

    @task
    def shard(i: int) -> str:
        if i == 1:
            raise InputError("sample: between_class needs images of at least two classes in the pool")
        return f"shard-{i}"

    @flow
    def sampling() -> str:
        follow_shards(SimpleNamespace(specs=[{"n": 10}, {"n": 10}]), [shard.submit(0), shard.submit(1)])
        return "published"

    with prefect_test_harness(server_startup_timeout=120):
        with pytest.raises(InputError, match="at least two classes"):
            sampling()
