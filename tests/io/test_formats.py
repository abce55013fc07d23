"""THINGS triplet files and the official AligNet .npz format: round trips, ordering, validation."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alignet_core.errors import InputError
from alignet_core.io import formats

CHECKER = Path(__file__).resolve().parents[3] / "shared" / "tools" / "check_alignet_npz.py"


def _sims(x, t):
    e = x[t]
    return np.stack([(e[:, 0] * e[:, 1]).sum(1), (e[:, 0] * e[:, 2]).sum(1), (e[:, 1] * e[:, 2]).sum(1)], 1)


def test_things_round_trip_text_and_npy(tmp_path):
    t = np.array([[0, 1, 2], [5, 3, 4], [9, 8, 7]])
    formats.write_things_triplets(str(tmp_path / "t.txt"), t)
    assert np.array_equal(formats.read_things_triplets(str(tmp_path / "t.txt"), 10), t)
    np.save(tmp_path / "t.npy", t)
    assert np.array_equal(formats.read_things_triplets(str(tmp_path / "t.npy"), 10), t)
    (tmp_path / "c.csv").write_text("# comment\n0,1,2\n3,4,5\n")
    assert formats.read_things_triplets(str(tmp_path / "c.csv")).tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    "content, message",
    [
        ("0 1 2\n3 4\n", "line 2 has 2 fields"),
        ("0 1 x\n", "integers"),
        ("0 1 1\n", "appears twice"),
        ("0 1 12\n", "out of range"),
        ("0 -1 2\n", "negative"),
    ],
)
def test_bad_triplet_files(tmp_path, content, message):
    f = tmp_path / "t.txt"
    f.write_text(content)
    with pytest.raises(InputError, match=message):
        formats.read_things_triplets(str(f), n_objects=10)


def test_the_fast_parse_reads_what_the_line_parse_reads(tmp_path):
    """A file without comments is parsed by numpy in one pass; the rows are those of the line-by-line parse
    (commas, blank lines, spaces), and an error found after it still names the file's line."""
    g = np.random.default_rng(0)
    t = np.stack([g.choice(50, 3, replace=False) for _ in range(500)])
    text = "\n".join((f"{a},{b},{c}" if r % 3 else f" {a}  {b} {c} ") + ("\n" if r % 7 == 0 else "")
                     for r, (a, b, c) in enumerate(t.tolist())) + "\n"
    assert formats._well_formed_triplets(text) is not None
    (tmp_path / "t.txt").write_text(text)
    (tmp_path / "c.txt").write_text("# the same rows\n" + text)  # a comment: the line-by-line parse
    fast = formats.read_things_triplets(str(tmp_path / "t.txt"), 50)
    assert np.array_equal(fast, t) and np.array_equal(formats.read_things_triplets(str(tmp_path / "c.txt"), 50), t)
    (tmp_path / "bad.txt").write_text("0 1 2\n\n3 4 99\n")
    with pytest.raises(InputError, match=r"out of range \[0, 50\) in line 3"):
        formats.read_things_triplets(str(tmp_path / "bad.txt"), 50)


def test_missing_triplet_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        formats.read_things_triplets(str(tmp_path / "none.txt"))


def test_probabilities_validated(tmp_path):
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    formats.write_probabilities(str(tmp_path / "p.npy"), p)
    assert np.allclose(formats.read_probabilities(str(tmp_path / "p.npy"), 2), p, atol=1e-6)
    with pytest.raises(InputError, match=r"shape \(3, 3\)"):
        formats.read_probabilities(str(tmp_path / "p.npy"), 3)
    np.save(tmp_path / "bad.npy", np.array([[0.9, 0.9, 0.1]]))
    with pytest.raises(InputError, match="sum to 1"):
        formats.read_probabilities(str(tmp_path / "bad.npy"), 1)


def test_order_by_similarity_puts_odd_one_last():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    t = np.array([rng.choice(50, 3, replace=False) for _ in range(200)])
    idx, s, perm = formats.order_by_similarity(t, _sims(x, t))
    assert np.allclose(s, _sims(x, idx), atol=1e-6)
    assert ((s[:, 0] > s[:, 1]) & (s[:, 0] > s[:, 2])).all()
    assert np.array_equal(np.sort(idx, 1), np.sort(t, 1))


def test_alignet_npz_round_trip_passes_official_checker(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    t = np.array([rng.choice(30, 3, replace=False) for _ in range(100)])
    idx, s, _ = formats.order_by_similarity(t, _sims(x, t))
    names = np.array([f"img_{i}.png" for i in range(30)])
    path = tmp_path / "train_cluster_border_12.npz"
    formats.write_alignet_npz(str(path), idx, names[idx], s)
    if CHECKER.exists():
        out = subprocess.run([sys.executable, str(CHECKER), str(path)], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout
    back = formats.read_alignet_npz(str(path), n_images=30)
    assert np.array_equal(back.indices, idx) and np.array_equal(back.filenames, names[idx])
    assert np.allclose(back.similarities, s) and back.n_reordered == 0


def test_reader_reorders_foreign_rows_and_counts_them(tmp_path):
    idx = np.array([[0, 1, 2], [3, 4, 5]])
    sims = np.array([[0.1, 0.9, 0.2], [0.9, 0.1, 0.2]], dtype=np.float32)  # row 0: pair (0,2) most similar
    np.savez(tmp_path / "f.npz", indices=idx, filenames=idx.astype(str), similarities=sims)
    back = formats.read_alignet_npz(str(tmp_path / "f.npz"))
    assert back.n_reordered == 1
    assert back.indices[0].tolist() == [0, 2, 1] and back.filenames[0].tolist() == ["0", "2", "1"]
    assert np.allclose(back.similarities[0], [0.9, 0.1, 0.2])


def test_writer_refuses_unordered_rows(tmp_path):
    with pytest.raises(InputError, match="strict maximum"):
        formats.write_alignet_npz(str(tmp_path / "x.npz"), [[0, 1, 2]], [["a", "b", "c"]], [[0.5, 0.5, 0.1]])


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"indices": np.zeros((2, 3), int), "similarities": np.zeros((2, 3))}, "missing array"),
        ({"indices": np.zeros((2, 2), int), "filenames": np.zeros((2, 2), str), "similarities": np.zeros((2, 2))},
         "shape"),
        ({"indices": np.zeros((1, 3)), "filenames": np.array([["a", "b", "c"]]), "similarities": np.ones((1, 3))},
         "integers"),
        ({"indices": np.array([[0, 1, 2]]), "filenames": np.array([["a", "b", "c"]]),
          "similarities": np.array([[np.nan, 0, 0]])}, "finite"),
        ({"indices": np.array([[0, 1, 1]]), "filenames": np.array([["a", "b", "b"]]),
          "similarities": np.array([[1.0, 0, 0]])}, "twice"),
    ],
)
def test_reader_rejects_malformed_files(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(InputError, match=message):
        formats.read_alignet_npz(str(tmp_path / "bad.npz"))


def test_reader_refuses_pickles(tmp_path):
    obj = np.empty((1, 3), dtype=object)
    obj[0] = ["a", "b", "c"]
    np.savez(tmp_path / "p.npz", indices=np.array([[0, 1, 2]]), filenames=obj, similarities=np.array([[1.0, 0, 0]]))
    with pytest.raises(InputError, match="Python objects"):
        formats.read_alignet_npz(str(tmp_path / "p.npz"))
