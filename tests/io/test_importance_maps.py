"""Human importance maps as data: the TFRecord/Example reader on records written here in the ClickMe
layout (one corrupt), the reference's blur, folders of PNG/NPY maps joined by id, the demo's proxy."""

import io
import struct

import numpy as np
import PIL.Image
import pytest
import torch

from alignet_core.errors import InputError
from alignet_core.io import importance_maps as M
from alignet_core.io import tfrecord as R
from alignet_core.io.sources import ImageRecord, ImageSource


def _jpeg(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(a).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_crc32c_known_values():
    # RFC 3720 test vectors: 32 zero bytes and the digits "123456789"
    assert R.crc32c(b"123456789") == 0xE3069283
    assert R.crc32c(bytes(32)) == 0x8A9136AA


def test_example_round_trip_and_protobuf_wire_format():
    ex = R.encode_example({"image": b"\x00\xffabc", "label": 7, "neg": -3, "f": [0.5, 2.0], "two": [b"a", b"bc"]})
    got = R.parse_example(ex)
    assert got == {"image": [b"\x00\xffabc"], "label": [7], "neg": [-3], "f": [0.5, 2.0], "two": [b"a", b"bc"]}
    # the bytes of a hand-built Example{features{feature{key:"l" value{int64_list{value:[5]}}}}}:
    # Int64List 0a 01 05 → Feature 1a 03 … → entry 0a 01 'l' 12 05 … → Features 0a 0a … → Example 0a 0c …
    assert R.encode_example({"l": 5}) == bytes.fromhex("0a0c0a0a0a016c12051a030a0105")
    assert R.parse_example(bytes.fromhex("0a0c0a0a0a016c12051a030a0105")) == {"l": [5]}
    with pytest.raises(ValueError):
        R.parse_example(b"\x0a\x10\x0a")


def _clickme_shard(path, n: int, corrupt: int | None = None, bad: dict[int, str] | None = None) -> list[int]:
    rng = np.random.default_rng(0)
    labels = []
    bad = bad or {}
    with open(path, "wb") as f:
        for i in range(n):
            img = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
            hm = np.zeros((256, 256), np.uint8)
            hm[64:128, 32:96] = 255
            feats = {"image": _jpeg(img), "heatmap": _jpeg(hm), "label": i + 10}
            if bad.get(i) == "small":
                feats["heatmap"] = _jpeg(hm[:128])
            elif bad.get(i) == "garbage":
                feats["image"] = b"not a jpeg"
            elif bad.get(i) == "no_heatmap":
                del feats["heatmap"]
            rec = R.frame_record(R.encode_example(feats))
            if i == corrupt:
                rec = rec[:40] + bytes([rec[40] ^ 0xFF]) + rec[41:]  # a flipped byte in the data
            f.write(rec)
            labels.append(i + 10)
    return labels


def test_read_records_counts_a_corrupt_record_and_goes_on(tmp_path):
    path = tmp_path / "a.tfrecords"
    _clickme_shard(path, 3, corrupt=1)
    with open(path, "rb") as f:
        recs = list(R.read_records(f))
    assert [isinstance(r, R.CorruptRecord) for r in recs] == [False, True, False]


def test_read_records_stops_at_a_torn_frame(tmp_path):
    path = tmp_path / "a.tfrecords"
    path.write_bytes(R.frame_record(b"hello") + R.frame_record(b"world")[:-3])
    with open(path, "rb") as f:
        it = R.read_records(f, what="a.tfrecords")
        assert next(it) == b"hello"
        with pytest.raises(InputError, match="a.tfrecords: record 1: torn"):
            next(it)
    bad_len = bytearray(R.frame_record(b"hello"))
    bad_len[0] ^= 1
    with pytest.raises(InputError, match="length's CRC"):
        list(R.read_records(io.BytesIO(bytes(bad_len))))


def test_read_clickme_skips_and_counts_bad_records(tmp_path):
    a, b = tmp_path / "train-0.tfrecords", tmp_path / "train-1.tfrecords"
    _clickme_shard(a, 4, corrupt=2)
    _clickme_shard(b, 4, bad={0: "small", 1: "garbage", 3: "no_heatmap"})
    got = M.read_clickme([str(a), str(b)], size=32)
    assert got.report.read == 4
    assert dict(got.report.skipped) == {"record CRC mismatch": 1, "heatmap not a 256×256×1 JPEG": 1,
                                        "image not a 256×256×3 JPEG": 1, "missing image or heatmap": 1}
    assert got.images.shape == (4, 3, 32, 32) and got.heatmaps.shape == (4, 32, 32)
    assert got.labels.tolist() == [10, 11, 13, 12]
    # the blurred heatmap peaks inside the clicked rectangle (rows 64:128, cols 32:96 of 256 → 8:16, 4:12 of 32)
    peak = np.unravel_index(int(got.heatmaps[0].argmax()), (32, 32))
    assert 6 <= peak[0] <= 17 and 2 <= peak[1] <= 13
    with pytest.raises(InputError, match="does not exist"):
        M.read_clickme([str(tmp_path / "missing.tfrecords")])


def test_gaussian_kernel_is_the_reference_grid():
    k = M.gaussian_kernel(10, 10.0).double()
    xs = np.arange(-5, 5)
    ys = np.arange(4, -6, -1)
    want = np.exp(-(xs[None, :] ** 2 + ys[:, None] ** 2) / 200.0)
    np.testing.assert_allclose(k.numpy(), want / want.sum(), rtol=1e-6)


def test_gaussian_blur_same_padding_by_hand():
    # a delta at (4, 4) of a 10×10 map: 'SAME' pads 4 before and 5 after, so out[i, j] = k[8 - i, 8 - j]
    k = M.gaussian_kernel(10, 10.0)
    x = torch.zeros(1, 10, 10)
    x[0, 4, 4] = 1.0
    out = M.gaussian_blur(x, k)[0]
    assert out[4, 4].item() == pytest.approx(k[4, 4].item())
    assert out[0, 0].item() == pytest.approx(k[8, 8].item())
    assert out[8, 8].item() == pytest.approx(k[0, 0].item())
    assert out[9, 9].item() == 0.0  # the kernel's window no longer reaches the delta


def _source(tmp_path, n=3, alpha=True):
    recs = []
    for i in range(n):
        a = np.zeros((40, 40, 4 if alpha else 3), np.uint8)
        a[..., :3] = 200
        if alpha:
            a[10:30, 5 + i: 20 + i, 3] = 255
        p = tmp_path / f"im{i}.png"
        PIL.Image.fromarray(a).save(p)
        recs.append(ImageRecord(id=f"im{i}", path=str(p)))
    return ImageSource(tuple(recs), "test images")


def _geometry_transform(size):
    import torchvision.transforms as T

    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


def test_proxy_maps_are_blurred_alpha_silhouettes(tmp_path):
    src = _source(tmp_path)
    maps, tokens, rep = M.source_maps(src, "proxy", _geometry_transform(20))
    assert maps.shape == (3, 20, 20) and tokens.tolist() == [1.0, 1.0, 1.0] and rep.read == 3
    # inside the silhouette is brighter than outside; the blur leaves soft edges (values between 0 and
    # the top); the reference's 10-pixel kernel (at 64×64) does not reach far corners
    assert maps[0, 10, 6] > maps[0, 2, 18]
    assert maps[0].min() == 0 and maps[0].max() <= 1
    assert ((maps[0] > 0.05) & (maps[0] < 0.95 * maps[0].max())).sum() > 10
    (tmp_path / "plain").mkdir()
    plain = _source(tmp_path / "plain", alpha=False)
    with pytest.raises(InputError, match="distill.harmonize.maps: none of the 3 images"):
        M.source_maps(plain, "proxy", _geometry_transform(20))


def test_folder_maps_joined_by_id(tmp_path):
    src = _source(tmp_path)
    folder = tmp_path / "maps"
    folder.mkdir()
    m = np.zeros((80, 80), np.float32)
    m[:40] = 1.0
    np.save(folder / "im0.npy", m)
    PIL.Image.fromarray((m * 255).astype(np.uint8)).save(folder / "im1.png")
    (folder / "im2.png").write_bytes(b"broken")
    maps, tokens, rep = M.source_maps(src, str(folder), _geometry_transform(16), blur=False)
    assert tokens.tolist() == [1.0, 1.0, 0.0]
    assert dict(rep.skipped) == {"undecodable PNG": 1}
    assert torch.allclose(maps[0], maps[1] / 255.0, atol=1e-5)
    assert maps[0, 2].mean() > 0.99 and maps[0, -2].mean() < 0.01
    assert maps[2].abs().sum() == 0
    with pytest.raises(InputError, match="distill.harmonize.maps"):
        M.source_maps(src, str(tmp_path / "nowhere"), _geometry_transform(16))


def test_a_map_whose_header_claims_more_than_it_holds_is_skipped_before_numpy_allocates(tmp_path):
    """A 100-byte .npy declaring a (100000, 100000) float64 map (80 GB): counted as bad, never allocated."""
    src = _source(tmp_path, n=2)
    folder = tmp_path / "maps"
    folder.mkdir()
    np.save(folder / "im0.npy", np.ones((8, 8), np.float32))
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 1)))
    header["shape"] = (100_000, 100_000)
    with open(folder / "im1.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 100)
    maps, tokens, rep = M.source_maps(src, str(folder), _geometry_transform(16), blur=False)
    assert tokens.tolist() == [1.0, 0.0]
    assert dict(rep.skipped) == {"a .npy whose header's size is not what it holds": 1}


def test_unpacked_int64_list_reads():
    # Int64List{value: 5} unpacked (08 05) inside Feature{int64_list} (1a 02) in the map entry and Example
    feature = bytes.fromhex("1a020805")
    entry = b"\x0a\x01l" + b"\x12" + bytes([len(feature)]) + feature
    feats = b"\x0a" + bytes([len(entry)]) + entry
    ex = b"\x0a" + bytes([len(feats)]) + feats
    assert R.parse_example(ex) == {"l": [5]}
    assert struct.calcsize("<Q") == 8
