"""docs/reproducibility.md, the promise that needs no Prefect: from the transformed embeddings and the groups
on, sampling and publication give the same bytes whatever CPU kernels and thread counts run them.

Why it holds: a shard draws its triplets with numpy's seeded generator (integers only), converts float16 →
float32 (exact), and sums each dot product's float32 products in one order its source fixes, with no fused
multiply-add (`teacher.pair_dots`: the C kernel `sample/pair_dots.c`, or numpy's elementwise ops in the same
order where no compiler is found); de-duplication and publication are integer work. No BLAS, no thread-split
reduction. So the variants that change the dataset upstream (ATEN_CPU_CAPABILITY, thread counts,
OPENBLAS_CORETYPE; measured by `benchmarks/reproducibility.py`), numpy's own dispatch
(NPY_DISABLE_CPU_FEATURES) and the kernel turned off (ALIGNET_NATIVE=0) leave these bytes alone.
The same-machine promise (a whole Prefect run twice → identical bytes) is in tests/flows/test_reproducibility.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignet_core.io import embedding_store
from alignet_core.sample import native
from alignet_core.sample.publish import assemble_dataset
from alignet_core.sample.shards import plan_shards, run_shard

REPO = Path(__file__).resolve().parents[2]
NAMES = {"cluster_border": "cluster_border_5", "between_class": "between_class"}
KNOBS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ATEN_CPU_CAPABILITY", "OPENBLAS_CORETYPE",
         "NPY_DISABLE_CPU_FEATURES", "ALIGNET_NATIVE")


def _numpy_dispatched() -> str:
    """The CPU features numpy dispatches to on this machine (e.g. 'X86_V3'): disabling them runs numpy's baseline."""
    m = np._core._multiarray_umath
    return " ".join(f for f in m.__cpu_dispatch__ if m.__cpu_features__.get(f))


#: two child processes, each changing several knobs at once (each knob alone would change nothing either)
VARIANTS = {
    "aten_default_one_thread": {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                                "OPENBLAS_NUM_THREADS": "1"},
    "openblas_sandybridge_numpy_baseline_no_c_kernel": {"OPENBLAS_CORETYPE": "Sandybridge",
                                                        "NPY_DISABLE_CPU_FEATURES": _numpy_dispatched(),
                                                        "ALIGNET_NATIVE": "0"},
}

_CHILD = """
import json, sys
import numpy as np, torch
from alignet_core.sample import native
from tests.sample.test_reproducibility import publish
spec = json.loads(sys.argv[1])
m = np._core._multiarray_umath
print(json.dumps({"digests": publish(spec["pool"], spec["out"]), "aten": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads(), "c_kernel": native.library() is not None,
                  "numpy_features": sorted(f for f in m.__cpu_dispatch__ if m.__cpu_features__.get(f))}))
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A float32 store of 400 rows of width 256 (dot products are sums of 256 products: their order shows),
    class labels and cluster ids."""
    root = tmp_path_factory.mktemp("repro-pool")
    rng = np.random.default_rng(3)
    n, p = 400, 256
    ids = np.array([f"img/{i:04d}.jpg" for i in range(n)])
    url = str(root / "emb.zarr")
    g = embedding_store.create_embedding_store(url, n, p, ids, "float32", 64, {})
    g["embeddings"][:] = rng.normal(size=(n, p)).astype(np.float32)
    g["valid"][:] = True
    np.save(root / "clusters.npy", rng.integers(0, 5, n))
    np.save(root / "classes.npy", rng.integers(0, 12, n))
    return {"store": url, "ids": ids.tolist(),
            "groups": {"cluster_border": str(root / "clusters.npy"), "between_class": str(root / "classes.npy")}}


def publish(pool: dict, out: str) -> dict[str, str]:
    """Sample every shard (one after another) and publish; sha256 of each published .npz."""
    specs = plan_shards(list(NAMES), 2000, 500, 600, seed=7)
    for s in specs:
        run_shard(s, pool["groups"][s.strategy], pool["store"], str(Path(out) / "work"))
    assemble_dataset(str(Path(out) / "work"), specs, np.array(pool["ids"]), str(Path(out) / "published"), NAMES)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((Path(out) / "published").glob("*.npz"))}


@pytest.mark.numerics
def test_sampling_publishes_the_same_bytes_under_every_kernel_and_thread_count(pool: dict, tmp_path: Path) -> None:
    here = publish(pool, str(tmp_path / "here"))
    assert len(here) == 4
    base_env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    base_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    for name, env in VARIANTS.items():
        spec = {"pool": pool, "out": str(tmp_path / name)}
        out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], env={**base_env, **env}, cwd=REPO,
                             capture_output=True, text=True, timeout=300, check=False)
        assert out.returncode == 0, out.stderr[-3000:]
        child = json.loads(out.stdout.strip().splitlines()[-1])
        if "ATEN_CPU_CAPABILITY" in env:  # the variant took effect in the child
            assert child["aten"] == "DEFAULT" and child["threads"] == 1
        if "NPY_DISABLE_CPU_FEATURES" in env:
            assert child["numpy_features"] == []
        assert child["c_kernel"] == ("ALIGNET_NATIVE" not in env and native.library() is not None)
        assert child["digests"] == here, name
