"""How the sample stage shows its results: the `dataset-files` table and where the dataset is."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from alignet_core.io import store
from alignet_core.sample.stage import SampleOutput


def dataset_location(url: str) -> tuple[str, str]:
    """(link, text) naming where a dataset is: for a local folder a `file://` URI of its absolute path and
    `host:/absolute/path` (a relative path opens nowhere, and a bare path does not say which machine);
    another fsspec URL as it is."""
    if "://" in url and not url.startswith("file://"):
        return url, url
    path = Path(url.removeprefix("file://")).resolve()
    return path.as_uri(), f"{socket.gethostname()}:{path}"


def dataset_rows(out: SampleOutput) -> list[dict[str, Any]]:
    """The `dataset-files` table: one row per published file, with the sha256 of the file (what `alignet
    datasets verify` checks) and of its arrays, and its location (last: the UI cuts long cells)."""
    rows = []
    for name, info in out.metrics.files.items():
        row = {"file": name, **info.model_dump(exclude={"path"})}
        row["location"] = dataset_location(store.join(out.metrics.publish_url, info.path))[1]
        rows.append(row)
    return rows
