"""Flow: triplet sampling shards fanned out on Dask, then the official dataset published."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prefect import flow
from prefect.settings import get_current_settings

from alignet_core.cluster.stage import ClusterOutput
from alignet_core.config import PipelineConfig
from alignet_core.context import RunContext
from alignet_core.sample.stage import SampleOutput, SamplingPlan, publish_complete
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
def sample_triplets(sp: SamplingPlan) -> None:
    """Sample every shard of `sp` in parallel on the flow's task runner (Dask); the first failed shard
    (after its retries) fails the flow with its own error.

    Its one parameter is the plan (paths and shard specs, a few KB): Prefect sends the flow's parameters
    with every task it submits and Dask tokenizes them, so the run context (the source's listing, the
    human data: hundreds of MB at a million images) stays in the calling flow."""
    follow_shards(sp, submit_shards(sp))


def sample_on_dask(ctx: RunContext, tfm: TransformOutput, clu: ClusterOutput) -> SampleOutput:
    """Plan the shards, sample the missing ones in the `sample-triplets` subflow on the configured Dask
    cluster, publish train/valid `.npz` files atomically as a dataset version and make it `latest`. An
    existing cluster gets the `SamplingWorkerSetup` plugin first (the scheduler keeps it for workers that
    join later). When the version is already published (a cached rerun) no cluster is started or
    contacted: nothing runs on it."""
    cfg = ctx.cfg
    sp = plan_sampling(ctx, tfm, clu)
    if not publish_complete(sp):  # a published version needs no shard
        if cfg.sample.dask_address:
            from distributed import Client

            from flows.dask_workers import SamplingWorkerSetup

            with Client(cfg.sample.dask_address, timeout=30, security=outside_security(cfg)) as client:
                client.register_plugin(SamplingWorkerSetup())
        sample_triplets.with_options(task_runner=dask_runner(cfg))(sp)
    ds = promote(cfg, publish(ctx, sp), sp)
    dataset_artifacts(cfg, ds)
    return ds
