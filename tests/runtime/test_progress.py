"""Progress lines: count, share, rate of this process's work, and the time left."""

from alignet_core.runtime.progress import duration, progress_line


def test_progress_line_counts_rate_and_time_left() -> None:
    assert progress_line("embed", "images", 1024, 1906, 1000, 24.3) == \
        "embed: 1,024/1,906 images (53.7%), 41.2 images/s, 0:21 left"
    # a resumed run: 900 rows were there before, 100 done here in 10 s → 10/s, 906 left
    assert progress_line("embed", "images", 1000, 1906, 100, 10.0).endswith("10 images/s, 1:31 left")
    assert progress_line("distill", "steps", 0, 500, 0, 0.0) == "distill: 0/500 steps (0.0%)"
    assert progress_line("sample", "shards", 3, 0, 3, 1.0) == "sample: 3/0 shards, 3 shards/s, ? left"


def test_duration() -> None:
    assert [duration(s) for s in (0, 59.6, 61, 3725, -3)] == ["0:00", "1:00", "1:01", "1:02:05", "0:00"]


def test_progress_log_is_throttled_and_carries_its_numbers(caplog) -> None:
    import logging

    from alignet_core.runtime.progress import LOGGER, ProgressLog, ProgressRecord

    caplog.set_level(logging.INFO, logger=LOGGER)
    lines = ProgressLog("k-means assign", "rows", 300, every_s=3600)
    for done in (0, 100, 200, 300):
        lines.update(done)
    records = [r for r in caplog.records if r.name == LOGGER]
    # the first and the last line only: the others fall inside the interval
    assert [r.progress.done for r in records] == [0, 300]
    assert all(isinstance(r.progress, ProgressRecord) and r.progress.what == "k-means assign" for r in records)
    assert records[0].getMessage() == "k-means assign: 0/300 rows (0.0%)"
    assert records[-1].getMessage().startswith("k-means assign: 300/300 rows (100.0%), ")
    assert records[-1].getMessage().endswith(" left")


def test_progress_log_appends_extra_and_counts_only_work_done_here(caplog) -> None:
    import logging

    from alignet_core.runtime.progress import LOGGER, ProgressLog

    caplog.set_level(logging.INFO, logger=LOGGER)
    lines = ProgressLog("transform apply", "rows", 1000, every_s=0)
    lines.update(900, " (resumed)")  # 900 rows were there before: no rate yet
    lines.update(1000)
    msgs = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert msgs[0] == "transform apply: 900/1,000 rows (90.0%) (resumed)"
    assert "/s, 0:00 left" in msgs[1]
