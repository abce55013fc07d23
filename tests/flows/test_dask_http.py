"""The sampling stage's local Dask cluster is the pipeline's alone: it serves nothing over HTTP (no
dashboard, /metrics or /info on the scheduler or the workers), and its scheduler, workers and nannies refuse
any client but the pipeline's (issue 34: as another local user, a port scan and a plain `Client` ran
`os.system` in a worker of the service's run). Real two-process `LocalCluster`s built as the flow builds
them."""

from __future__ import annotations

import urllib.error
import urllib.request

from distributed import Client

from flows.dask_workers import WORKER_CONFIG, quiet_local_cluster


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code


def test_scheduler_and_workers_answer_no_http_route():
    with quiet_local_cluster(n_workers=2, threads_per_worker=1, processes=True, config=WORKER_CONFIG) as cluster, \
            Client(cluster) as client:
        sched = cluster.scheduler.http_server.port
        workers = client.run(lambda dask_worker: dask_worker.http_server.port)
        assert client.submit(lambda x: x + 1, 1).result() == 2  # the cluster works
        for port in (sched, *workers.values()):
            for path in ("/metrics", "/info/main/workers.html", "/status", "/health", "/json/counts.json"):
                assert _status(f"http://127.0.0.1:{port}{path}") == 404, (port, path)
        assert sched != 8787


def _foreign_clients(address: str) -> dict[str, str]:
    """What each client another local user could make gets from `address` (a `tls://` endpoint of the
    cluster): 'CONNECTED' or the error that refused it."""
    import asyncio
    import ssl

    from distributed.comm import connect
    from distributed.security import Security

    no_check = ssl.create_default_context()
    no_check.check_hostname, no_check.verify_mode = False, ssl.CERT_NONE
    attempts = {
        "plain TCP": (address.replace("tls://", "tcp://"), {}),
        "TLS, no certificate": (address, {"ssl_context": no_check}),
        "TLS, a certificate of its own": (address, Security.temporary().get_connection_args("client")),
    }
    out = {}
    for what, (addr, args) in attempts.items():
        async def attempt(addr: str = addr, args: dict = args) -> str:
            comm = await connect(addr, timeout=5, **args)
            try:  # the handshake is only done once the peer answers: ask for something
                await comm.write({"op": "identity"})
                reply = await comm.read()
                return f"CONNECTED: {str(reply)[:80]}"
            finally:
                comm.abort()
        try:
            out[what] = asyncio.run(asyncio.wait_for(attempt(), 20))
        except Exception as err:  # noqa: BLE001 - any refusal will do
            out[what] = f"refused: {type(err).__name__}"
    return out


def test_the_local_cluster_refuses_every_client_but_the_pipelines(tmp_path):
    """The cluster as `sample` starts it (flows.sample.dask_runner: Prefect's DaskTaskRunner with
    `quiet_local_cluster`) speaks TLS only, with credentials made for it; Prefect's client has them and runs
    a task; a plain TCP client, a TLS client without a certificate and one with a certificate of its own are
    refused by the scheduler, every worker and every nanny."""
    from alignet_core.config import PipelineConfig
    from flows.sample import dask_runner

    runner = dask_runner(PipelineConfig(root=str(tmp_path)))
    runner.cluster_kwargs = {**runner.cluster_kwargs, "n_workers": 2, "env": {}, "plugins": ()}
    with runner:
        client = runner.client
        assert client.submit(lambda x: x + 1, 1).result() == 2  # the pipeline's own client works
        cluster = runner._cluster
        workers = list(client.scheduler_info()["workers"])
        nannies = [w.address for w in cluster.workers.values()]
        endpoints = [cluster.scheduler_address, *workers, *nannies]
        seen = {a: _foreign_clients(a) for a in endpoints}
    assert all(not r.startswith("CONNECTED") for results in seen.values() for r in results.values()), seen
    assert len(endpoints) == 5 and all(a.startswith("tls://127.0.0.1:") for a in endpoints), endpoints


def test_importing_the_flows_turns_prefect_analytics_off():
    """A script that imports a flow directly (not through the CLI, Makefile or serve.sh) runs with
    Prefect's client and server analytics off."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("DO_NOT_TRACK", "PREFECT_SERVER_ANALYTICS_ENABLED")}
    code = ("import flows.alignet, os; from prefect._internal.analytics.enabled import is_telemetry_enabled; "
            "from prefect.settings import get_current_settings as s; "
            "print(os.environ['DO_NOT_TRACK'], is_telemetry_enabled(), s().server.analytics_enabled)")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-3:] == ["1", "False", "False"], out.stderr[-2000:]


def test_the_cluster_leaves_this_process_environment_as_it_was(monkeypatch):
    """Each nanny writes OMP_NUM_THREADS=1 (and MKL_/OPENBLAS_/MALLOC_TRIM_) into the parent's environment
    before it spawns its worker; left there, every process the pipeline starts afterwards (the distill
    ranks) ran single-threaded. The workers keep their single thread; this process gets its values back."""
    import os

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    with quiet_local_cluster(n_workers=1, threads_per_worker=1, processes=True, config=WORKER_CONFIG) as cluster, \
            Client(cluster) as client:
        worker_env = next(iter(client.run(lambda: os.environ.get("OMP_NUM_THREADS")).values()))
        assert "OMP_NUM_THREADS" not in os.environ
        assert os.environ["MKL_NUM_THREADS"] == "3"
    assert worker_env == "1"
