"""The teacher's dot-product kernel in C (`pair_dots.c`), built on first use with the machine's C compiler.

The shards' teacher similarities gather three random rows of the transformed store per triplet and take
their three dot products. numpy and torch can only do that in passes (gather the rows into a buffer,
convert float16 → float32, then one product pass per pair): each pass writes and rereads the rows. The C
kernel reads each row once and keeps the sums in registers: ~3× faster per shard
(`benchmarks/results/kernel_variants.json`). Its additions run in an order the source fixes (no fused
multiply-add), which `teacher.pair_dots` repeats in numpy where no compiler is found: both give the same
bits, so the dataset's bytes do not depend on which one ran, nor on the CPU.

The shared library is built once per compiler, CPU and source into a cache folder
(`ALIGNET_NATIVE_CACHE`, else `$XDG_CACHE_HOME/alignet-pipeline/native`, else `~/.cache/...`) by writing a
temporary file and renaming it, so processes that build at once (Dask workers) never load a partial file.
`ALIGNET_NATIVE=0` turns it off (numpy then runs, with the same bits).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("pair_dots.c")
#: no fused multiply-add, no reassociation: the source's order of additions is the result's
EXACT_FLAGS = ("-O3", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC")
#: tried first: the CPU's vector units (F16C, AVX); without them the same order runs in scalar code
TUNED_FLAGS = ("-march=native",)


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so a cache folder shared by other machines keys their builds apart."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def cache_dir() -> Path:
    """Where built libraries are kept (created on first build)."""
    if os.environ.get("ALIGNET_NATIVE_CACHE"):
        return Path(os.environ["ALIGNET_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "alignet-pipeline" / "native"


def _build(cc: str, flags: tuple[str, ...], target: Path) -> bool:
    """Compile the source into `target` through a temporary file and an atomic rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120,
                             check=False)
        if res.returncode != 0:
            log.debug("building %s with %s failed: %s", SOURCE.name, " ".join(flags), res.stderr[-2000:])
            return False
        os.replace(tmp, target)
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    for fn in (lib.pair_dots_f16, lib.pair_dots_f32):
        fn.argtypes, fn.restype = args, None
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (no compiler, a failed build, or ALIGNET_NATIVE=0): callers then run the
    same sums in numpy. Built at most once per process; the file is reused across processes."""
    if os.environ.get("ALIGNET_NATIVE", "1") == "0":
        return None
    cc = _compiler()
    if cc is None:
        log.info("no C compiler found: the teacher's dot products run in numpy (same bits, ~3x slower)")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.info("the C compiler %s does not run (%s): the teacher's dot products run in numpy", cc, e)
        return None
    for flags in (EXACT_FLAGS + TUNED_FLAGS, EXACT_FLAGS):
        digest = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *flags, platform.machine(),
                                           _cpu_flags()]).encode()).hexdigest()[:20]
        target = cache_dir() / f"pair_dots-{digest}.so"
        try:
            if target.exists() or _build(cc, flags, target):
                return _load(target)
        except OSError as e:
            log.info("the native kernel could not be built or loaded in %s (%s)", target.parent, e)
            return None
    log.info("building %s failed with %s: the teacher's dot products run in numpy", SOURCE.name, cc)
    return None


def pair_dots(lib: ctypes.CDLL, e: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(m, 3) float32 [a·b, a·c, b·c] of e's rows named by t's rows, by `lib`.

    e: C-contiguous (n, p) float16 or float32; t: C-contiguous (m, 3) int64 whose entries lie in [0, n)
    (the kernel reads whatever row it is given: the caller checks)."""
    out = np.empty((len(t), 3), dtype=np.float32)
    fn = lib.pair_dots_f16 if e.dtype == np.float16 else lib.pair_dots_f32
    fn(e.ctypes.data, e.shape[1], t.ctypes.data, len(t), out.ctypes.data)
    return out
