"""The sampling stage's local Dask cluster serves nothing over HTTP: no dashboard, /metrics or /info
on the scheduler or the workers (a real two-process `LocalCluster` built as the flow builds it)."""

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
