"""benchmarks/vice_gram.py quick end to end: both formulations timed, their gradients agreeing (no timing asserted)."""

from __future__ import annotations

from benchmarks.vice_gram import main


def test_quick_run_times_both_formulations() -> None:
    r = main(["--quick", "--no-write"])
    assert set(r["seconds"]) == {"advanced_index_transposed_add", "index_select_symmetric_scatter"}
    assert all(v > 0 for v in r["seconds"].values())
    # each gradient entry sums the same float32 terms in two orders; tests/human/test_vice.py checks the
    # formulation against gathered rows and by gradcheck
    assert 0 <= r["max_relative_difference"] < float("inf")
