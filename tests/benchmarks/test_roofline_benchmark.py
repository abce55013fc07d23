"""The roofline benchmark: its work formulas (known answers for small parameters), its bounds (each phase's
bound the largest of its limits, a stage's the sum of its phases', ratio = time / bound) and its quick run
end to end (a row per stage of the times file, positive rates)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from alignet_core.config.transform import TransformConfig
from benchmarks import roofline
from benchmarks.roofline import Phase

RATES = {"gemm_gflops": 100.0, "sha256_gbps": 1.0, "memory_read_gbps": 10.0,
         "random_rows": {"float32": {"gbps": 5.0}}, "disk": {"write_gbps": 2.0, "read_gbps": 1.0}}


def test_expected_distinct_known_answers() -> None:
    assert roofline.expected_distinct(2, 1) == pytest.approx(1.0)
    assert roofline.expected_distinct(4, 2) == pytest.approx(4 * (1 - 0.75**2))  # 1.75
    assert roofline.expected_distinct(100, 10_000) == pytest.approx(100.0)


def test_transform_fits_single_and_rotation() -> None:
    tcfg = TransformConfig(val_fraction=0.1, val_max_triplets=20_000, epochs=8)
    single = roofline.transform_fits(100, 1000, 5, tcfg, "single")
    # 3 of 5 folds train: 1000 · 0.6³ = 216 triplets, 22 of them (10%) stop early → 194 fitted, 60 objects
    assert len(single) == 1
    assert single[0]["triplets"] == pytest.approx(194) and single[0]["objects"] == pytest.approx(60)
    rot = roofline.transform_fits(100, 1000, 5, tcfg, "rotation")
    assert [f["fit"] for f in rot] == ["fold 0", "fold 1", "fold 2", "fold 3", "fold 4", "refit"]
    assert rot[0]["triplets"] == pytest.approx(512 - 51) and rot[0]["objects"] == pytest.approx(80)
    assert rot[-1] == {"fit": "refit", "objects": 100, "triplets": 1000, "epochs": 8}
    with pytest.raises(ValueError, match="single"):
        roofline.transform_fits(100, 1000, 5, tcfg, "other")
    # the epochs each fit ran, when the scale result records them; a record of another fold count is ignored
    ran = roofline.transform_fits(100, 1000, 5, tcfg, "rotation", {"folds": [8, 7, 8, 8, 7], "refit": 5})
    assert [f["epochs"] for f in ran] == [8, 7, 8, 8, 7, 5]
    other = roofline.transform_fits(100, 1000, 5, tcfg, "rotation", {"folds": [8, 7], "refit": 5})
    assert [f["epochs"] for f in other] == [8] * 6


def test_transform_fit_flops_known_answer() -> None:
    tcfg = TransformConfig(batch_size=5, local_batch=3, alpha=0.25)
    p, m = 4, 10
    phase, params = roofline.transform_fit_phase(p, m, [{"fit": "x", "objects": m, "triplets": 5, "epochs": 2}], tcfg,
                                                 pool_rows=3, knn_rows=2)
    u = m * (1 - 0.9**15)  # distinct objects among 3 · 5 draws
    step = 4 * u * p * p + 4 * 3 * p * p + 8 * 3 * 3 * p
    steps = 2  # ceil(5 / 5) steps per epoch × 2 epochs
    expected = steps * step + 2 * 2 * m * p * p + 4 * 2 * 2 * p + 2 * 2 * p * p
    assert phase.flops == pytest.approx(expected)
    assert phase.seq_bytes == steps * 7 * 4 * p * p
    assert params["fits"][0]["steps"] == steps and params["fits"][0]["distinct_objects_per_step"] == round(u, 1)
    # no local term without alpha
    no_local, _ = roofline.transform_fit_phase(p, m, [{"fit": "x", "objects": m, "triplets": 5, "epochs": 2}],
                                               TransformConfig(batch_size=5, local_batch=3, alpha=0.0), 3, 2)
    assert no_local.flops == pytest.approx(steps * 4 * u * p * p + 2 * 2 * m * p * p + 4 * 2 * 2 * p + 2 * 2 * p * p)


def test_stage_work_known_answers() -> None:
    n, p = 1000, 8
    work = roofline.stage_work(n, p, {"sample": 111, "publish": 222, "report": 3})
    embed = work["embed"]["phases"][0]
    assert (embed.seq_bytes, embed.disk_write_bytes) == (n * p * 2, n * p * 4)  # float16 in, float32 store out
    cluster = {ph.name: ph for ph in work["cluster"]["phases"]}
    s, k, trials = 1000, 500, 2 + int(math.log(500))  # the sample is every row (k · 256 > n); 8 trials
    assert work["cluster"]["params"]["train_rows"] == s and trials == 8
    assert cluster["k-means++ init"].flops == (k - 1) * 2 * trials * s * p
    assert cluster["k-means++ init"].seq_bytes == (k - 1) * s * p * 4
    assert cluster["lloyd"].flops == 25 * 1 * 2 * s * k * p
    assert cluster["assign"].flops == 2 * n * k * p and cluster["assign"].seq_bytes == n * p * 4
    t = 2 * (5_000_000 + 10_000)
    sample = {ph.name: ph for ph in work["sample"]["phases"]}
    assert sample["gather + dots"].random_bytes == t * 3 * p * 4 and sample["gather + dots"].flops == t * 6 * p
    assert sample["write shards"].disk_write_bytes == 111
    publish = {ph.name: ph for ph in work["publish"]["phases"]}
    assert publish["hash"].hash_bytes == t * 3 * (8 + 4 + 4 * 11) + t * 3 * 12  # ids 'img_0000000': 11 chars
    assert publish["write"].disk_write_bytes == 222
    assert work["verify"]["phases"][0].hash_bytes == 222
    apply = work["transform"]["phases"][1]
    assert apply.flops == 2 * n * p * p and apply.disk_write_bytes == n * p * 4


def test_phase_bound_is_the_largest_limit() -> None:
    cpu = roofline.phase_bound(Phase("a", flops=1e12, hash_bytes=1e9, seq_bytes=1e9), RATES)
    assert cpu["cpu_s"] == pytest.approx(10 + 1) and cpu["memory_s"] == pytest.approx(0.1)
    assert cpu["bound_s"] == pytest.approx(11) and cpu["limited_by"] == "cpu"
    mem = roofline.phase_bound(Phase("b", seq_bytes=10e9, random_bytes=5e9, disk_write_bytes=2e9), RATES)
    assert mem["memory_s"] == pytest.approx(1 + 1) and mem["disk_s"] == pytest.approx(1)
    assert mem["bound_s"] == pytest.approx(2) and mem["limited_by"] == "memory"
    disk = roofline.phase_bound(Phase("c", disk_write_bytes=4e9, disk_read_bytes=1e9), RATES)
    assert disk["disk_s"] == pytest.approx(2 + 1) and disk["bound_s"] == pytest.approx(3)


def test_stage_rows_sum_phases_and_divide() -> None:
    stages = {name: {"seconds": 10.0, "bytes_on_disk": 1000} for name in
              ("embed", "transform", "cluster", "sample", "publish", "report", "verify", "something_new")}
    rows = roofline.stage_rows({"n": 2000, "dim": 16, "stages": stages}, RATES)
    assert [r["stage"] for r in rows] == list(stages)  # every stage of the times file gets a row
    for r in rows:
        if r["stage"] == "something_new":  # a stage the work model does not know: no bound, no ratio
            assert r["bound_s"] is None and r["ratio"] is None
            continue
        assert r["bound_s"] == pytest.approx(sum(ph["bound_s"] for ph in r["phases"]), abs=1e-4)
        for ph in r["phases"]:
            assert ph["bound_s"] == pytest.approx(max(ph["cpu_s"], ph["memory_s"], ph["disk_s"]), abs=1e-4)
        if r["stage"] == "report":  # no bulk data: a fixed cost, no ratio
            assert r["ratio"] is None and r["limited_by"].startswith("fixed cost")
        elif r["bound_s"] > 0:
            assert r["ratio"] == round(10.0 / r["bound_s"], 3)
        assert r["achieved_gflops"] == round(r["flops"] / 10.0 / 1e9, 2)


def test_quick_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "roofline_quick.json"
    roofline.main(["--quick", "--out", str(out), "--disk-dir", str(tmp_path)])
    result = json.loads(out.read_text())
    times = json.loads(roofline.DEFAULT_TIMES.read_text())
    run = max(times["runs"], key=lambda r: r["n"])
    assert [r["stage"] for r in result["stages"]] == list(run["stages"])
    rates = result["rates"]
    assert rates["gemm_gflops"] == max(rates["gemm_gflops_by_shape"].values()) > 0
    assert rates["faiss_gflops"] > 0 and rates["memory_read_gbps"] > 0 and rates["sha256_gbps"] > 0
    assert all(v["gbps"] > 0 and v["rows_per_s"] > 0 for v in rates["random_rows"].values())
    assert rates["disk"]["write_gbps"] > 0 and rates["disk"]["read_gbps"] > 0
    assert not list(tmp_path.glob("roofline-*.bin"))  # the disk test's files are removed
    for r in result["stages"]:
        assert r["seconds"] == run["stages"][r["stage"]]["seconds"]
        if r["ratio"] is not None:
            assert r["ratio"] == round(r["seconds"] / r["bound_s"], 3)
    assert result["stage_times"]["file"].endswith("scale_1m_c_kernel.json")
    assert result["stage_times"]["transform_fit_model"] == "rotation"
    assert result["beat_the_bound"]["stages"] == [r["stage"] for r in result["stages"]
                                                  if r["ratio"] is not None and r["ratio"] < 1]
    assert result["transform_other_model"]["flops"] < result["stages"][1]["flops"]  # the single fit did less
    assert len(result["rates_measured_under_load"]["load_avg_before"]) == 3
