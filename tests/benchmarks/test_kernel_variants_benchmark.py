"""benchmarks/kernel_variants.py quick end to end: every variant timed, the same answers (no timing asserted)."""

from __future__ import annotations

from benchmarks.kernel_variants import main


def test_quick_run_times_every_variant_with_the_same_answers() -> None:
    r = main(["--quick", "--repeats", "1", "--no-write"])
    assert r["knn"]["same_neighbours"] and r["shard_dots"]["group_order_equal"]
    assert r["shard_dots"]["bmm_max_relative_difference"] < 1e-5  # float32 sums of 64 float16 products
    assert set(r["knn"]["seconds"]) == {"full_sort", "partial_sort"}
    assert set(r["shard_dots"]["seconds"]) == {"sampled_order", "group_order", "bmm_gram"}
    assert all(v > 0 for v in [*r["knn"]["seconds"].values(), *r["shard_dots"]["seconds"].values()])
