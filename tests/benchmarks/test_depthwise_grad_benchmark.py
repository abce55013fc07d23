"""benchmarks/depthwise_grad.py quick end to end: every depthwise layer of the demo's student timed both ways,
the two gradients agreeing (no timing asserted)."""

from __future__ import annotations

from benchmarks.depthwise_grad import main


def test_quick_run_times_every_layer_and_both_steps() -> None:
    r = main(["--quick", "--repeats", "1", "--no-write"])
    assert len(r["layers"]) == 16  # Lite0's depthwise convolutions
    assert {row["used"] for row in r["layers"]} == {"batched", "torch"}
    # the difference is reported; tests/models/test_depthwise.py bounds both gradients by their rounding
    assert all(0 <= row["max_relative_difference"] < float("inf") for row in r["layers"])
    assert set(r["step_seconds"]) == {"torch", "batched"} and all(v > 0 for v in r["step_seconds"].values())
