"""benchmarks/kernel_variants.py quick end to end: every variant timed, the same answers (no timing asserted)."""

from __future__ import annotations

from benchmarks.kernel_variants import main


def test_quick_run_times_every_variant_with_the_same_answers() -> None:
    r = main(["--quick", "--repeats", "1", "--no-write"])
    dots = r["shard_dots"]
    assert r["knn"]["same_neighbours"] and dots["group_order_equal"] and dots["numpy_fixed_order_equal"]
    # float32 sums of 64 float16 products in other orders: a few float32 roundings of the largest
    assert dots["bmm_max_relative_difference"] < 1e-5 and dots["einsum_max_relative_difference"] < 1e-5
    assert set(r["knn"]["seconds"]) == {"full_sort", "partial_sort"}
    c = {"c_kernel", "c_kernel_group_order"} if dots["c_kernel_built"] else set()
    assert set(dots["seconds"]) == {"numpy_fixed_order", "einsum_passes", "bmm_gram"} | c
    assert all(v > 0 for v in [*r["knn"]["seconds"].values(), *r["shard_dots"]["seconds"].values()])
