"""Progress lines: count, share, rate of this process's work, and the time left."""

from alignet_core.pipeline.progress import duration, progress_line


def test_progress_line_counts_rate_and_time_left() -> None:
    assert progress_line("embed", "images", 1024, 1906, 1000, 24.3) == \
        "embed: 1,024/1,906 images (53.7%), 41.2 images/s, 0:21 left"
    # a resumed run: 900 rows were there before, 100 done here in 10 s → 10/s, 906 left
    assert progress_line("embed", "images", 1000, 1906, 100, 10.0).endswith("10 images/s, 1:31 left")
    assert progress_line("distill", "steps", 0, 500, 0, 0.0) == "distill: 0/500 steps (0.0%)"
    assert progress_line("sample", "shards", 3, 0, 3, 1.0) == "sample: 3/0 shards, 3 shards/s, ? left"


def test_duration() -> None:
    assert [duration(s) for s in (0, 59.6, 61, 3725, -3)] == ["0:00", "1:00", "1:01", "1:02:05", "0:00"]
