"""The teacher's C dot-product kernel (`sample/pair_dots.c`, `sample/native.py`): the same bits as numpy's path,
under any build of it, a known answer, refusals before the kernel reads a row, the fallback without a compiler,
and builds racing into one cache folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignet_core.errors import InputError
from alignet_core.sample import native
from alignet_core.sample.teacher import _numpy_pair_dots, pair_dots

REPO = Path(__file__).resolve().parents[2]
needs_compiler = pytest.mark.skipif(native.library() is None, reason="no C compiler on this machine")


def _rows(p: int, dtype: str, n: int = 300, m: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    e = (rng.standard_normal((n, p)) * 4).astype(dtype)
    return e, rng.integers(0, n, (m, 3)).astype(np.int64)


@needs_compiler
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("p", [1, 15, 16, 17, 40, 768])  # no full lane group, exact groups, groups and a tail
def test_the_kernel_and_numpy_give_the_same_bits(p: int, dtype: str) -> None:
    e, t = _rows(p, dtype)
    c = native.pair_dots(native.library(), e, t)
    for block in (1, 7, 256, 5000):  # numpy's reused block buffers, the short last block included
        np.testing.assert_array_equal(_numpy_pair_dots(e, t, block), c)
    np.testing.assert_array_equal(pair_dots(e, t), c)


@needs_compiler
def test_every_build_of_the_kernel_gives_the_same_bits(tmp_path: Path) -> None:
    """Unoptimised scalar code, optimised code without the CPU's vector units, and the tuned build: the source
    fixes the order of the additions and the build forbids fused multiply-adds, so all agree bit for bit."""
    cc = native._compiler()
    assert cc is not None
    builds = {"O0": ("-O0", "-ffp-contract=off", "-shared", "-fPIC"), "exact": native.EXACT_FLAGS,
              "tuned": native.EXACT_FLAGS + native.TUNED_FLAGS}
    for dtype in ("float16", "float32"):
        e, t = _rows(101, dtype, seed=1)
        outs = {}
        for name, flags in builds.items():
            target = tmp_path / f"{name}.so"
            assert native._build(cc, flags, target), name
            outs[name] = native.pair_dots(native._load(target), e, t)
        for name, out in outs.items():
            np.testing.assert_array_equal(out, outs["O0"], err_msg=f"{name} ({dtype})")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_known_answer(dtype: str) -> None:
    """Small integers: every product and partial sum is exact in float32, so the dots are the exact integers."""
    rng = np.random.default_rng(2)
    e = rng.integers(-8, 9, (50, 37)).astype(dtype)
    t = rng.integers(0, 50, (200, 3))
    x = e.astype(np.int64)
    exact = np.stack([(x[t[:, 0]] * x[t[:, 1]]).sum(1), (x[t[:, 0]] * x[t[:, 2]]).sum(1),
                      (x[t[:, 1]] * x[t[:, 2]]).sum(1)], axis=1)
    got = pair_dots(e, t)
    assert got.dtype == np.float32 and got.shape == (200, 3)
    np.testing.assert_array_equal(got, exact.astype(np.float32))


def test_rows_outside_the_store_are_refused_before_the_kernel_reads_them() -> None:
    e = np.ones((10, 16), np.float32)
    for bad in ([[0, 1, 10]], [[-1, 2, 3]]):
        with pytest.raises(InputError, match=r"row indices must lie in \[0, 10\)"):
            pair_dots(e, np.array(bad))
    with pytest.raises(InputError, match="expected shape"):
        pair_dots(e, np.array([0, 1, 2]))
    assert pair_dots(e, np.zeros((0, 3), np.int64)).shape == (0, 3)


def test_without_a_compiler_numpy_runs_the_same_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler on the path (and CC unset), or the kernel turned off: `library()` is None, and `pair_dots`
    gives the bits the kernel would have."""
    e, t = _rows(48, "float16", seed=3)
    expected = _numpy_pair_dots(e, t, 256)
    try:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", "")
        native.library.cache_clear()
        assert native._compiler() is None and native.library() is None
        np.testing.assert_array_equal(pair_dots(e, t), expected)
        monkeypatch.undo()
        monkeypatch.setenv("ALIGNET_NATIVE", "0")
        native.library.cache_clear()
        assert native.library() is None
    finally:
        monkeypatch.undo()
        native.library.cache_clear()
    if native.library() is not None:
        np.testing.assert_array_equal(pair_dots(e, t), expected)


_CHILD = """
import numpy as np
from alignet_core.sample import native
lib = native.library()
rng = np.random.default_rng(5)
e = rng.standard_normal((64, 33)).astype(np.float16)
print(lib is not None, native.pair_dots(lib, e, rng.integers(0, 64, (20, 3))).sum() if lib else 0)
"""


@needs_compiler
def test_processes_building_at_once_share_one_complete_library(tmp_path: Path) -> None:
    """Two processes with an empty cache folder build at the same time (as a cluster's workers do): both load
    a working kernel, and the folder ends with one library and no partial build."""
    env = {**os.environ, "ALIGNET_NATIVE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    lines = {out.strip() for out, _ in outs}
    assert len(lines) == 1 and next(iter(lines)).startswith("True"), lines
    assert [f.name.startswith("pair_dots-") and f.suffix == ".so" for f in (tmp_path / "cache").iterdir()] == [True]
