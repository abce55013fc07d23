"""Screenshots of a finished `alignet` flow run in the Prefect UI, taken with headless Chromium.

    python scripts/screenshot_ui.py [--api-url http://127.0.0.1:4200/api] [--out docs] [--run ID]

Needs a running Prefect server (e.g. `make serve`) with a completed run of the `alignet` flow
(e.g. `prefect deployment run 'alignet/regenerate-dataset' --watch`), its API auth string (from
`$PREFECT_API_AUTH_STRING`, else `$PREFECT_HOME/api-auth-string`, else `.prefect/api-auth-string`: what
`make serve` generates; the API calls carry it with a CSRF token, and the browser gets it as the UI's
sign-in would store it), Chromium (Debian: `apt-get install
chromium`) and Playwright's Python driver (`pip install -e '.[docs]'`; it drives the system
Chromium, no browser download). Writes `ui-flow-run.png` (the run's page, Artifacts tab open) and
`ui-artifact-<key>.png` for the run's report, student, cluster, transform and dataset artifacts,
then prints the paths. Exits non-zero, naming what is missing, when there is no server, no
completed run or no Chromium.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import httpx

ARTIFACT_KEYS = ("alignet-report", "student-accuracy", "cluster-sizes", "transform-accuracy", "dataset-files")


def auth_string() -> str | None:
    """The API auth string: `$PREFECT_API_AUTH_STRING`, else the file `make serve` keeps, else None (an open
    server)."""
    if os.environ.get("PREFECT_API_AUTH_STRING"):
        return os.environ["PREFECT_API_AUTH_STRING"]
    home = Path(os.environ.get("PREFECT_HOME") or Path(__file__).resolve().parents[1] / ".prefect")
    path = home / "api-auth-string"
    return path.read_text().strip() if path.is_file() else None


def api_client(api: str, auth: str | None) -> httpx.Client:
    """A client of `api` as the UI is one: the auth string (HTTP Basic) and a CSRF token, where the server
    asks for them."""
    client = httpx.Client(base_url=api, timeout=30)
    if auth:
        client.headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    cid = str(uuid.uuid4())
    r = client.get("/csrf-token", params={"client": cid})
    if r.status_code == 401:
        raise SystemExit(f"error: {api} refused the auth string (401); set PREFECT_API_AUTH_STRING or PREFECT_HOME")
    if r.status_code == 200:  # 422 where CSRF protection is off
        client.headers.update({"Prefect-Csrf-Token": r.json()["token"], "Prefect-Csrf-Client": cid})
    return client


def _post(api: httpx.Client, path: str, body: dict) -> list[dict]:
    r = api.post(path, json=body)
    r.raise_for_status()
    return r.json()


def latest_completed_run(api: httpx.Client, flow_name: str = "alignet") -> dict:
    flows = [f for f in _post(api, "/flows/filter", {}) if f["name"] == flow_name]
    if not flows:
        raise SystemExit(f"error: no flow named {flow_name!r} on {api.base_url}; run the demo deployment first")
    runs = _post(api, "/flow_runs/filter", {
        "flows": {"id": {"any_": [flows[0]["id"]]}},
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
        "sort": "START_TIME_DESC", "limit": 1})
    if not runs:
        raise SystemExit(f"error: no completed {flow_name!r} run on {api.base_url}; run the demo deployment first")
    return runs[0]


def run_artifacts(api: httpx.Client, run_id: str) -> dict[str, dict]:
    """The newest artifact of each key created by the run or its subflow runs."""
    subflows = _post(api, "/flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [run_id]}}})
    ids = [run_id, *[r["id"] for r in subflows]]
    arts = _post(api, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": ids}}, "sort": "CREATED_DESC"})
    out: dict[str, dict] = {}
    for a in arts:
        if a.get("key") and a["key"] not in out:
            out[a["key"]] = a
    return out


def screenshot(page, url: str, path: Path, tab: str | None = None) -> None:  # noqa: ANN001 (playwright Page)
    """Open `url`, optionally click a tab by its name, wait for the page to settle, save a PNG."""
    page.goto(url, wait_until="networkidle", timeout=120_000)
    if tab:
        page.get_by_text(tab, exact=True).first.click()
        page.wait_for_load_state("networkidle")
    page.wait_for_timeout(2_000)  # charts and markdown render after the data arrives
    page.screenshot(path=str(path), full_page=True)
    if not path.exists() or path.stat().st_size < 10_000:
        raise SystemExit(f"error: Chromium wrote no usable screenshot of {url}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--api-url", default=os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api"))
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs"))
    p.add_argument("--run", help="flow run id (default: the newest completed `alignet` run)")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = p.parse_args()
    if not args.chromium:
        raise SystemExit("error: no Chromium found (Debian: apt-get install chromium); or pass --chromium PATH")
    api = args.api_url.rstrip("/")
    try:
        httpx.get(f"{api}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as err:
        raise SystemExit(f"error: no Prefect server at {api} ({err}); start one with `make serve`") from None
    ui = api.removesuffix("/api")
    auth = auth_string()
    client = api_client(api, auth)
    run_id = args.run or latest_completed_run(client)["id"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    arts = run_artifacts(client, run_id)
    shots = [(f"{ui}/runs/flow-run/{run_id}", out / "ui-flow-run.png", "Artifacts")]
    shots += [(f"{ui}/artifacts/artifact/{arts[k]['id']}", out / f"ui-artifact-{k}.png", None)
              for k in ARTIFACT_KEYS if k in arts]
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        if auth:  # what the UI's sign-in page stores
            page.add_init_script(f"localStorage.setItem('prefect-password', btoa({json.dumps(auth)}))")
        for url, path, tab in shots:
            screenshot(page, url, path, tab)
            print(path)
        browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
