"""Small files that would cost gigabytes are refused in bounded memory with a one-line error.

Each case runs in a child process under `RLIMIT_AS` (so an unbounded read fails as a MemoryError
instead of swapping the machine) and reports its peak resident memory: `VmHWM` of the child's own
image, read as it exits. Not `ru_maxrss` (from `wait4` or `getrusage`): Linux carries the high-water
mark across exec, and a child forked from a pytest process that has grown to gigabytes would report
the parent's size, hiding the case's own peak. The assertions are on that peak and on the one line
the reader prints."""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

REPO = Path(__file__).resolve().parents[2]
AS_LIMIT = 3 << 30  # address space of a reader child: the unbounded reads needed 1.5 to 2.2 GB of data more
CLI_AS_LIMIT = 12 << 30  # the CLI imports torch, which reserves several GB of address space it never touches
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


PEAK = """
import atexit as _atexit, os as _os
def _hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024
_atexit.register(lambda: open(_os.environ["ALIGNET_TEST_PEAK_FILE"], "w").write(str(_hwm())))
"""


def _child(code: str, *args: str, as_limit: int = AS_LIMIT) -> tuple[int, str, int]:
    """(exit status, stderr+stdout, peak RSS in MiB of the child's own image) of `python -c code args`
    under `as_limit`. `code` may call `_hwm()` for the peak so far."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        p = subprocess.Popen([sys.executable, "-c", PEAK + textwrap.dedent(code), *args], cwd=REPO,
                             env={**ENV, "ALIGNET_TEST_PEAK_FILE": str(peak_file)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=limit)
        out = p.stdout.read().decode(errors="replace")
        p.wait()
        assert peak_file.exists(), f"the child did not report its peak (exit {p.returncode}):\n{out[-3000:]}"
        return p.returncode, out, int(peak_file.read_text())


READ = """
import resource, sys
from alignet_core.errors import AlignetError
from alignet_core.io import formats, images, sources, tar_shards
before = _hwm()
try:
    {call}
except AlignetError as err:
    print(f"error: {{err}}")
    print(f"before={{before}}")
    sys.exit(2)
print("accepted")
"""


def _read(call: str, path: Path) -> tuple[int, str, int, int]:
    code, out, peak = _child(READ.format(call=call), str(path))
    lines = out.strip().splitlines()
    before = int(lines[-1].split("=")[1]) if lines and lines[-1].startswith("before=") else 0
    return code, "\n".join(lines[:-1]), peak, before


def _cli(*args: str) -> tuple[int, str, int]:
    return _child("import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))", *args,
                  as_limit=CLI_AS_LIMIT)


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
seed: *i
"""


CLI_CASES = """
import contextlib, io, json, sys
from flows.cli import main
out = {}
for case, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
        try:
            code = main(args)
        except BaseException as e:  # a traceback is a failure the test reports
            code, _ = 1, err.write(f"{type(e).__name__}: {str(e)[:500]}")
    out[case] = [code, err.getvalue()[-3000:]]
print(json.dumps(out))
"""


def test_config_bombs_are_one_line_errors_in_bounded_memory(tmp_path):
    """The 471-byte alias bomb gave a 522-million-character message; 20,000 `[` a RecursionError
    traceback; a flat list filling the 1 MiB cost 10 s and 776 MB before its one-line error (issue 34). Now
    each is exit 2 and one short line naming the problem, all in one small peak (one child process runs the
    CLI on every case)."""
    import json

    files = {"alias-bomb": BOMB, "deep-nesting": "seed: " + "[" * 20000 + "]" * 20000 + "\n",
             "deep-override": "seed: 1\n", "huge-file": "# padding\n" * 200_000 + "seed: 1\n",
             "flat-list": "[" + ",".join(["0"] * ((1 << 20) // 2 - 2)) + "]"}
    assert len(BOMB) < 500
    cases = {}
    for case, text in files.items():
        (tmp_path / f"{case}.yaml").write_text(text)
        cases[case] = ["validate", "-c", str(tmp_path / f"{case}.yaml")]
    cases["deep-override"] += ["--set", "seed=" + "[" * 20000]
    t0 = time.monotonic()
    code, out, peak = _child(CLI_CASES, json.dumps(cases), as_limit=CLI_AS_LIMIT)
    took = time.monotonic() - t0
    assert code == 0, out[-3000:]
    results = json.loads(out.strip().splitlines()[-1])
    expected = {"alias-bomb": "seed", "deep-nesting": "nested deeper than 64", "deep-override": "--set seed",
                "huge-file": "more than the 1048576", "flat-list": "more than 20000 values"}
    for case, (status, text) in results.items():
        lines = text.strip().splitlines()
        assert status == 2, (case, text)
        assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 1500, (case, text[:2000])
        assert expected[case] in lines[0], (case, lines[0])
    assert peak < 300, peak  # the CLI imports neither torch nor Prefect here (~60 MB); the bomb's message alone was 1.5 GB
    assert took < 60, took  # the flat list alone took 10 s (41 s on a loaded 2-core machine); all cases now ~3 s


def _npz_claiming(path: Path, rows: int, suffix: str = ".npy") -> None:
    """A real AligNet .npz whose 'indices' header claims `rows` rows (the data holds 4); its entries are
    named `<key><suffix>` (numpy reads `indices` and `indices.npy` alike)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((4, 3), np.int64))
    header = buf.getvalue().replace(b"(4, 3)", f"({rows}, 3)".encode())
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"indices{suffix}", header)
        for key, arr in (("filenames", np.array([["a", "b", "c"]] * 4)), ("similarities", np.zeros((4, 3), np.float32))):
            b = io.BytesIO()
            np.lib.format.write_array(b, arr)
            zf.writestr(f"{key}{suffix}", b.getvalue())


def test_npz_header_claiming_2_to_40_rows_is_refused(tmp_path):
    f = tmp_path / "liar.npz"
    _npz_claiming(f, 2**40)
    assert f.stat().st_size < 1500
    code, out, peak, before = _read("formats.read_alignet_npz(sys.argv[1])", f)
    assert code == 2 and "declares" in out and "(1099511627776, 3)" in out and "MemoryError" not in out, out
    assert len(out.splitlines()) == 1 and peak - before < 100, (peak, before)


def test_npz_entries_without_the_npy_suffix_are_checked_too(tmp_path):
    """Issue 34: entries named `indices` (no `.npy`) skipped the checks, and numpy reads them as the arrays:
    a 2^40-row header was a MemoryError traceback (exit 1). Now the same one-line refusal as with the suffix."""
    f = tmp_path / "liar.npz"
    _npz_claiming(f, 2**40, suffix="")
    code, out, peak, before = _read("formats.read_alignet_npz(sys.argv[1])", f)
    assert code == 2 and "declares" in out and "(1099511627776, 3)" in out and "MemoryError" not in out, out
    assert len(out.splitlines()) == 1 and peak - before < 100, (peak, before)


def test_npz_entry_claiming_bytes_past_the_end_is_refused(tmp_path):
    """A zip directory may claim any sizes: an entry whose compressed bytes would run past the end of the
    file (so that its inflated size passes the ratio check against a made-up compressed size) is refused."""
    f = tmp_path / "claims.npz"
    _npz_claiming(f, 4)
    data = bytearray(f.read_bytes())
    end = data.rindex(b"PK\x05\x06")  # the central directory's first entry is 'indices.npy'
    cd = int.from_bytes(data[end + 16:end + 20], "little")
    data[cd + 20:cd + 24] = (1 << 31).to_bytes(4, "little")  # its compressed size: 2 GiB
    f.write_bytes(bytes(data))
    code, out, _, _ = _read("formats.read_alignet_npz(sys.argv[1])", f)
    assert code == 2 and "past the end of the file" in out, out


def test_npy_header_claiming_more_than_the_file_is_refused(tmp_path):
    f = tmp_path / "triplets.npy"
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros((4, 3), np.int64))
    f.write_bytes(buf.getvalue().replace(b"(4, 3)", b"(1099511627776, 3)"))
    code, out, peak, before = _read("formats.read_things_triplets(sys.argv[1])", f)
    assert code == 2 and "declares an array of shape (1099511627776, 3)" in out and peak - before < 100, out


def _deflate_bomb(f: Path, suffix: str = ".npy") -> None:
    """1.5 MB that inflates to 1.5 GB of float32 similarities (an honest header), entries `<key><suffix>`."""
    n = (1536 << 20) // 12
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in (("indices", np.zeros((4, 3), np.int64)), ("filenames", np.array([["a", "b", "c"]] * 4))):
            b = io.BytesIO()
            np.lib.format.write_array(b, arr)
            zf.writestr(f"{key}{suffix}", b.getvalue())
        with zf.open(f"similarities{suffix}", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": (n, 3)})
            zeros = bytes(1 << 24)
            for _ in range((n * 12) // len(zeros)):
                member.write(zeros)
            member.write(bytes(n * 12 - ((n * 12) // len(zeros)) * len(zeros)))
    assert f.stat().st_size < 3 << 20


@pytest.mark.parametrize("suffix", [".npy", ""], ids=["npy-entries", "entries-without-suffix"])
def test_deflate_bomb_is_refused_before_inflating(tmp_path, suffix):
    """Refused from the zip directory, not misreported as 'holds Python objects'. Issue 34: named without
    `.npy` the bomb was read whole (2.57 GB through `alignet distill`)."""
    f = tmp_path / "bomb.npz"
    _deflate_bomb(f, suffix)
    code, out, peak, before = _read("formats.read_alignet_npz(sys.argv[1])", f)
    assert code == 2 and "compression bomb" in out and "Python objects" not in out, out
    assert peak - before < 100, (peak, before)


def _sparse(path: Path, size: int, head: bytes = b"") -> None:
    with open(path, "wb") as fh:
        fh.write(head)
        fh.truncate(size)  # the rest is a hole: no disk used


def test_oversized_tar_member_and_image_file_are_refused_before_reading(tmp_path):
    big = (256 << 20) + 1
    shard = tmp_path / "shard.tar"
    info = tarfile.TarInfo("0001.png")
    info.size = big
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    _sparse(shard, len(header) + ((big + 511) // 512) * 512 + 1024, header)  # zero blocks end the archive
    code, out, peak, before = _read("images.load_image(tar_shards.tar_member_url(sys.argv[1], '0001.png'))", shard)
    assert code == 2 and "image file too large (268435457 bytes" in out and peak - before < 100, (out, peak, before)
    png = tmp_path / "huge.png"
    _sparse(png, big, b"\x89PNG\r\n\x1a\n")
    code, out, peak, before = _read("images.load_image(sys.argv[1])", png)
    assert code == 2 and "image file too large" in out and peak - before < 100, (out, peak, before)


def _shard_with(path: Path, name: str, size: int, kind: bytes = tarfile.REGTYPE) -> None:
    """A plain tar shard: a real 8×8 PNG `0001.png`, then a member `name` of type `kind` claiming `size` bytes
    of zeros (a hole: no disk used, and the zeros a gzip would shrink 1000×)."""
    buf = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buf, format="PNG")
    png = tarfile.TarInfo("0001.png")
    png.size = len(buf.getvalue())
    head = png.tobuf(format=tarfile.GNU_FORMAT) + buf.getvalue().ljust((png.size + 511) // 512 * 512, b"\0")
    big = tarfile.TarInfo(name)
    big.size, big.type = size, kind
    head += big.tobuf(format=tarfile.GNU_FORMAT)
    _sparse(path, len(head) + (size + 511) // 512 * 512 + 1024, head)


def test_tar_label_and_header_members_are_bounded(tmp_path):
    """Issue 34: a 1 GiB `.cls` label member was read whole (`alignet validate` said "config ok" at 2.16 GB).
    Now a label member over 64 KiB, a pax header over 1 MiB (tarfile reads those whole before any member),
    and a shard of more members than the index may hold are refused before reading, naming the shard."""
    cls = tmp_path / "labels.tar"
    _shard_with(cls, "0001.cls", 1 << 30)
    code, out, peak, before = _read("sources.tar_source(sys.argv[1])", cls)
    assert code == 2 and "label member '0001.cls' of 1073741824 bytes" in out, out
    assert len(out.splitlines()) == 1 and peak - before < 100, (peak, before)

    pax = tmp_path / "pax.tar"
    _shard_with(pax, "././@PaxHeader", 1 << 30, tarfile.XHDTYPE)
    code, out, peak, before = _read("sources.tar_source(sys.argv[1])", pax)
    assert code == 2 and "a header member of 1073741824 bytes" in out and str(pax) in out, out
    assert peak - before < 100, (peak, before)

    many = tmp_path / "many.tar"
    with tarfile.open(many, "w") as tf:
        for i in range(5):
            tf.addfile(tarfile.TarInfo(f"{i:04d}.txt"), io.BytesIO(b""))
    code, out, _, _ = _read("setattr(sources.limits, 'MAX_TAR_MEMBERS', 4); sources.tar_source(sys.argv[1])", many)
    assert code == 2 and "more than 4 members" in out, out

    # through the CLI, as the issue ran it: the config check reads the labels
    cfg = tmp_path / "tar.yaml"
    cfg.write_text(f"source:\n  kind: tar\n  path: {cls}\n")
    code, out, peak = _cli("validate", "-c", str(cfg))
    assert code == 2 and "label member" in out and "config ok" not in out, out
    assert peak < 1000, peak


def test_16_bit_png_decodes_without_a_float64_image(tmp_path):
    """36 Mpx of 16-bit grey: the pixels are round(v / 257), and the peak stays under what a float64 copy
    (288 MB on its own) would add to the integer path."""
    h = w = 6000
    a = (np.arange(w, dtype=np.uint32) * 65535 // (w - 1)).astype(np.uint16)[None, :].repeat(h, 0)
    path = tmp_path / "deep.png"
    PIL.Image.fromarray(a).save(path)
    assert path.stat().st_size < 2 << 20
    code, out, peak = _child("""
        import resource, sys
        import numpy as np
        from alignet_core.io import images
        before = _hwm()
        img = np.asarray(images.load_image(sys.argv[1]))
        row = img[0, :, 0]
        ok = img.shape == (6000, 6000, 3) and bool((row == (np.arange(6000) * 65535 // 5999 + 128) // 257).all())
        print(before, ok)
    """, str(path))
    before, ok = out.split()[-2:]
    assert code == 0 and ok == "True", out
    # 16-bit image 72 + its copy 72 + uint8 36 + RGB 108 = 288 MB, measured ~345 with the decoder's buffers;
    # one float64 copy would add 288 MB more (the old path peaked at 2.2 GB)
    assert peak - int(before) < 400, (peak, before)
