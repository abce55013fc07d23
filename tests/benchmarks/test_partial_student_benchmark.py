"""benchmarks/partial_student.py quick end to end: the whole student's step and each partial one timed (no
timing asserted), fewer parameters training as fewer blocks do."""

from __future__ import annotations

from benchmarks.partial_student import BLOCKS, main


def test_quick_run_times_the_whole_and_every_partial_step() -> None:
    r = main(["--quick", "--repeats", "1", "--no-write"])
    names = ["whole", *(f"last_{n}" for n in BLOCKS), "last_4_torch_batchnorm"]
    assert list(r["step_seconds"]) == names and all(v > 0 for v in r["step_seconds"].values())
    counts = [r["trained_parameters"][k] for k in names[:-1]]
    assert counts[1:] == sorted(counts[1:]) and counts[0] > max(counts[1:])  # blocks (0, 2, ...) ascending
    assert r["trained_parameters"]["last_4_torch_batchnorm"] == r["trained_parameters"]["last_4"]
    assert set(r["front_seconds_per_image"]) == set(names[1:])
