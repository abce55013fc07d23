"""Flow: triplet sampling shards fanned out on Dask, then the official dataset published."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import flow
from prefect.settings import get_current_settings

from alignet_core.cluster.stage import ClusterOutput
from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.sample.stage import SampleOutput, publish_complete, sample_published
from alignet_core.transform.stage import TransformOutput
from tasks.sample import dataset_artifacts, follow_shards, plan_sampling, promote, publish, submit_shards

if TYPE_CHECKING:
    from distributed.security import Security
    from prefect_dask import DaskTaskRunner

# Dask is imported where a cluster is made: a cached rerun (nothing to sample) never loads it.


def _worker_env() -> dict[str, str]:
    """The API the local workers must report to: the configured one, or this process's
    temporary server (without it each worker process would start a private one)."""
    from prefect.server.api.server import SubprocessASGIServer

    url = get_current_settings().api.url
    if not url:
        server = SubprocessASGIServer()
        url = server.api_url if server.running else None
    return {"PREFECT_API_URL": str(url)} if url else {}


def dask_runner(cfg: PipelineConfig) -> DaskTaskRunner:
    """A local cluster of `sample.n_workers` single-threaded processes, or an existing cluster (over mutual TLS)."""
    from prefect_dask import DaskTaskRunner

    from flows.dask_workers import WORKER_CONFIG, SamplingWorkerSetup, quiet_local_cluster

    if cfg.sample.dask_address:
        return DaskTaskRunner(address=cfg.sample.dask_address, client_kwargs={"security": outside_security(cfg)})
    return DaskTaskRunner(
        cluster_class=quiet_local_cluster,
        cluster_kwargs={"n_workers": cfg.sample.n_workers, "threads_per_worker": 1, "processes": True,
                        "env": _worker_env(), "plugins": (SamplingWorkerSetup(),),
                        "config": WORKER_CONFIG},
    )


def outside_security(cfg: PipelineConfig) -> Security:
    """Mutual TLS to the scheduler at `sample.dask_address`, with the configured files (checked in preflight)."""
    from distributed.security import Security

    s = cfg.sample
    return Security(tls_ca_file=s.dask_tls_ca_file, tls_client_cert=s.dask_tls_cert, tls_client_key=s.dask_tls_key,
                    require_encryption=True)


@flow(name="sample-triplets")
def sample_triplets(ctx: RunContext, tfm: TransformOutput, clu: ClusterOutput) -> SampleOutput:
    """Plan shards, sample them in parallel, publish train/valid `.npz` files atomically as a
    dataset version and make it `latest`."""
    sp = plan_sampling(ctx, tfm, clu)
    shards = [] if publish_complete(sp) else submit_shards(sp)  # a published version needs no shard
    if shards:
        follow_shards(sp, shards)
    return promote(ctx.cfg, publish(ctx, sp, wait_for=shards), sp)


def sample_on_dask(ctx: RunContext, tfm: TransformOutput, clu: ClusterOutput) -> SampleOutput:
    """Run `sample_triplets` on the configured Dask cluster. An existing cluster gets the
    `SamplingWorkerSetup` plugin first (the scheduler keeps it for workers that join later). When the
    version is already published (a cached rerun) no cluster is started or contacted: nothing runs on it."""
    cfg = ctx.cfg
    if sample_published(ctx, tfm, clu):
        ds = sample_triplets(ctx, tfm, clu)
    else:
        if cfg.sample.dask_address:
            from distributed import Client

            from flows.dask_workers import SamplingWorkerSetup

            with Client(cfg.sample.dask_address, timeout=30, security=outside_security(cfg)) as client:
                client.register_plugin(SamplingWorkerSetup())
        ds = sample_triplets.with_options(task_runner=dask_runner(cfg))(ctx, tfm, clu)
    dataset_artifacts(cfg, ds)
    return ds
