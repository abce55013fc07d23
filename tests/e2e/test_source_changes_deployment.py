"""Issue 35 through deployment runs (`scripts/serve.sh`: a real server, the process pool, a worker): a folder
embedded by the `teacher-embeddings` deployment, then grown by one image; a later stage's deployment
(`kmeans-clusters`, which needs the transform, which needs the embeddings) completes on the grown folder.

Why no mismatch error here: a deployment run is one flow run, which lists the source once
(`flows._config.resolve_context`) and computes every stage the target needs from that one listing
(`flows.stages.compute`): the embed step's key covers the listing, so the grown folder is a new embed key,
embedded incrementally in the same run (one image added, the rest reused), and the transform and k-means
read that store. A stage can meet a store of another listing only through its inputs, and every input of
a deployment's run comes from the same run; the one-line refusal (`sources.check_same_images`) stays the
guard for a store that does not match, tested in tests/embed/test_source_changes.py.

Slow (a server, a worker and flow runs in subprocesses): behind the `slow` marker, run by CI.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import numpy as np
import PIL.Image
import pytest
import zarr

from tests.e2e._service import BIN, REPO, SMALL_SLICE, Service, api, free_port
from tests.e2e._service import client as _client
from tests.generated_images import jpeg_bytes, picture, write_jpeg_folder


@pytest.fixture()
def service(tmp_path):
    """`scripts/serve.sh` on a free port with a private Prefect home; stopped, and no process of it left."""
    svc = Service(tmp_path / "prefect-home", free_port(), tmp_path / "serve.log")
    try:
        yield svc
    finally:
        left = svc.stop()
    assert left == [], left


def _deployment_run(svc: Service, name: str, overrides: dict) -> dict:
    """`prefect deployment run NAME --watch` with `overrides`; the flow run as the API returns it."""
    res = subprocess.run([str(BIN / "prefect"), "deployment", "run", name, "--param",
                          f"overrides={json.dumps(overrides)}", "--watch", "--watch-timeout", "600"], cwd=REPO,
                         env=svc.env, capture_output=True, text=True, timeout=660)
    run_id = next(line.split("UUID:")[1].strip() for line in res.stdout.splitlines() if "UUID:" in line)
    return api(_client(svc.env), "GET", f"/flow_runs/{run_id}")


def _logs(c: httpx.Client, run_id: str) -> str:
    logs = api(c, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in logs)


@pytest.mark.slow
def test_a_later_stage_deployment_after_the_folder_grew_embeds_the_new_image(service: Service, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    ids = write_jpeg_folder(folder, 24, size=(64, 96))
    overrides = {"root": str(tmp_path / "data"), **SMALL_SLICE, "device": "cpu", "source.kind": "folder",
                 "source.path": str(folder), "source.label_level": None, "embed.model": "test_resnet",
                 "embed.weights": None, "embed.batch_size": 8, "embed.chunk_rows": 8, "human.proxy_n_triplets": 1000,
                 "transform.epochs": 2, "cluster.k": 2}
    first = _deployment_run(service, "embed/teacher-embeddings", overrides)
    log = service.log.read_text()[-3000:]
    assert first["state"]["type"] == "COMPLETED", (first["state"], log)

    rng = np.random.default_rng(7)  # the folder grows by one image
    (folder / "class1" / "new.jpg").write_bytes(jpeg_bytes(PIL.Image.fromarray(picture(rng, 80, 70))))
    later = _deployment_run(service, "cluster/kmeans-clusters", overrides)
    c = _client(service.env)
    lines = _logs(c, later["id"])
    assert later["state"]["type"] == "COMPLETED", (later["state"], lines[-3000:])
    assert "Traceback" not in lines, lines[-3000:]
    assert "1 added, 0 changed, 0 removed; 24 reused" in lines, lines[-3000:]

    arts = api(c, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [later["id"]]}}})
    (changes,) = [json.loads(a["data"]) for a in arts if a.get("key") == "embed-changes"]
    table = {r["change"]: r for r in changes}
    assert (table["added"]["images"], table["changed"]["images"], table["removed"]["images"],
            table["reused"]["images"]) == (1, 0, 0, 24)
    assert table["added"]["examples"] == "class1/new.jpg"

    # two embed stores: the first (24 rows) and the grown one (25, the new image in source order)
    stores = [d / "embeddings.zarr" for d in (tmp_path / "data" / "stages" / "embed").iterdir()
              if (d / "manifest.json").exists()]
    held = sorted([str(i) for i in np.asarray(zarr.open_group(str(s), mode="r")["ids"][:]).tolist()] for s in stores)
    assert sorted(map(len, held)) == [24, 25]
    assert sorted(ids) in held and sorted([*ids, "class1/new.jpg"]) == sorted(max(held, key=len))
    assert (tmp_path / "data" / "stages" / "cluster").is_dir()
