"""The stage cache cannot lie: its key holds where the root really is, a hit passes the manifest check
a reuse does, and a record planted in Prefect's result storage is never unpickled (real Prefect test
server, real `StageCache`, a one-file stage written through the project's runner)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.serializers import PickleSerializer
from prefect.settings import get_current_settings
from prefect.testing.utilities import prefect_test_harness

from alignet_core.errors import StoreError
from alignet_core.io import store
from alignet_core.runtime.runner import StageMetrics, StageOutput, StagePlan, finish, once, plan_stage
from tasks._cache import RESULT_SERIALIZER, StageCache, stage_output, trusted

CALLS: list[str] = []


class NoteOutput(StageOutput):
    metrics: StageMetrics


def plan_note(root: str) -> StagePlan:
    return plan_stage(root, "note", {"text": "hello"}, [], "alignet_core.io.store")


class NoteContext:
    """What a stage task's first parameter gives `stage_output`: the config (here the root) and the run's
    plan of a stage (`RunContext.plan`)."""

    def __init__(self, root: str) -> None:
        self.cfg = root

    def plan(self, planner, *inputs):
        return planner(self.cfg, *inputs)


@task(name="note", cache_policy=StageCache(locate=stage_output(plan_note, NoteOutput)), persist_result=True,
      result_serializer=RESULT_SERIALIZER)
def note(ctx: NoteContext) -> NoteOutput:
    root = ctx.cfg
    plan = ctx.plan(plan_note)

    def work() -> NoteOutput:
        CALLS.append(root)
        url = store.join(plan.dir, "note.txt")
        store.write_bytes_atomic(url, b"hello")
        return finish(plan, NoteOutput, url, StageMetrics(seconds=0.0), {"text": "hello"}, [])

    return once(plan, NoteOutput, work, lock_timeout=None)


@flow
def note_flow(root: str):
    return note(NoteContext(root), return_state=True)


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def _records() -> dict[str, float]:
    storage = Path(get_current_settings().results.local_storage_path)
    return {p.name: p.stat().st_mtime for p in storage.glob("*")} if storage.exists() else {}


def _run(root: Path) -> tuple[str, NoteOutput]:
    state = note_flow(str(root))
    assert state.is_completed(), state
    return state.name, state.result()


def test_a_rerun_hits_and_the_record_is_json(harness, tmp_path):
    CALLS.clear()
    before = _records()
    name, out = _run(tmp_path / "a")
    assert name == "Completed" and CALLS == [str(tmp_path / "a")]
    new = [k for k in _records() if k not in before and k.startswith(plan_note(str(tmp_path / "a")).key)]
    assert len(new) == 1
    record = (Path(get_current_settings().results.local_storage_path) / new[0]).read_bytes()
    assert json.loads(record)["metadata"]["serializer"]["type"] == "json"
    assert trusted(record, out)
    name, out2 = _run(tmp_path / "a")
    assert name == "Cached" and out2 == out and len(CALLS) == 1


def test_a_moved_root_is_not_served_the_old_paths(harness, tmp_path):
    """After `mv a b` the run on b is no cache hit on a's record: it reuses b's manifest (no recompute)
    and hands on b's files."""
    CALLS.clear()
    _run(tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    name, out = _run(tmp_path / "b")
    assert name == "Completed" and CALLS == [str(tmp_path / "a")]  # reused, not recomputed
    assert out.artifact.startswith(str(tmp_path / "b")) and Path(out.artifact).read_bytes() == b"hello"
    assert _run(tmp_path / "b")[0] == "Cached"


def test_a_stage_file_that_changed_size_is_no_cache_hit(harness, tmp_path):
    """A cache hit passes the reuse's size check too (issue 34): after a stage file grew, the rerun fails with
    the reuse's one-line error instead of being handed the cached result; the cache's own generation file,
    rewritten by it, is not one of the recorded files."""
    CALLS.clear()
    root = tmp_path / "a"
    _run(root)
    plan = plan_note(str(root))
    assert list(json.loads((Path(plan.dir) / store.MANIFEST).read_text())["stage_files"]) == ["note.txt"]
    (Path(plan.dir) / "note.txt").write_bytes(b"hello!")
    with pytest.raises(StoreError, match=r"note stage .* changed since it finished: note.txt: 6 bytes, the "
                                         r"manifest recorded 5\. Delete"):
        note_flow(str(root))
    assert len(CALLS) == 1  # never recomputed over the changed file


class _Canary:
    """Unpickling this creates the marker file: the proof that a record was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(key: str, payload: bytes) -> None:
    (Path(get_current_settings().results.local_storage_path) / key).write_bytes(payload)


@pytest.mark.slow
def test_a_planted_pickle_record_is_never_executed(harness, tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "r"
    CALLS.clear()
    before = _records()
    _run(root)
    (key,) = [k for k in _records() if k not in before and k.startswith(plan_note(str(root)).key)]
    pickled = PickleSerializer(picklelib="cloudpickle").dumps(_Canary(marker)).decode()
    record = {"metadata": {"storage_key": key, "expiration": None, "serializer": {"type": "pickle",
              "picklelib": "cloudpickle", "picklelib_version": None}, "prefect_version": "3.8.0",
              "storage_block_id": None}, "result": pickled}
    _plant(key, json.dumps(record).encode())
    name, out = _run(root)
    assert not marker.exists(), "the planted pickle was executed"
    assert name == "Completed" and len(CALLS) == 1 and Path(out.artifact).read_bytes() == b"hello"
    # the same value under the JSON serializer but naming another class, or an edited path: refused too
    for bad in ({"__class__": "subprocess.Popen", "data": ["touch", str(marker)]},
                {**json.loads(json.dumps(out.model_dump(mode="json"))), "artifact": "/etc/hostname"}):
        (key,) = [k for k, t in _records().items() if k.startswith(plan_note(str(root)).key)
                  and t == max(t2 for k2, t2 in _records().items() if k2.startswith(plan_note(str(root)).key))]
        doc = json.loads((Path(get_current_settings().results.local_storage_path) / key).read_bytes())
        doc["result"] = json.dumps(bad)
        _plant(key, json.dumps(doc).encode())
        name, again = _run(root)
        assert name == "Completed" and again == out and not marker.exists()
    assert _run(root)[0] == "Cached"


def test_trusted_refuses_what_is_not_the_expected_json():
    out = NoteOutput(stage="note", key="k", dir="/r/stages/note/k", artifact="/r/stages/note/k/note.txt",
                     metrics=StageMetrics(seconds=0.0))
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer

    good = ResultRecord(metadata=ResultRecordMetadata(storage_key="k", serializer=JSONSerializer()),
                        result=out).serialize()
    assert trusted(good, out)
    assert not trusted(good, None) and not trusted(b"\x80\x04garbage", out)
    assert not trusted(good, out.model_copy(update={"artifact": "/elsewhere/note.txt"}))
    doc = json.loads(good)
    doc["metadata"]["serializer"]["object_decoder"] = "builtins.eval"
    assert not trusted(json.dumps(doc).encode(), out)


class _Records(logging.Handler):
    """Every record of Prefect's task-run logger while attached."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_user_error_in_a_stage_task_fails_it_once_without_a_retry(harness, tmp_path):
    """The real embed flow on six generated images, then one of its stage files truncated: the rerun's embed
    task (`retries=1`, 5 s apart) fails on its first try with the reuse's one-line `StoreError`; no retry, and
    no "Error encountered when computing cache key" traceback before it (the cache key's reuse check met the
    error first). Before, the task ran twice and the error was logged three times."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.stages import FLOWS
    from tests.generated_images import write_jpeg_folder

    folder = tmp_path / "images"
    write_jpeg_folder(folder, 6, size=(40, 60))
    overrides = {"root": str(tmp_path / "root"), "device": "cpu", "source.kind": "folder", "source.path": str(folder),
                 "embed.model": "test_resnet", "embed.weights": None, "embed.chunk_rows": 4, "embed.batch_size": 4,
                 "cluster.k": 2}
    first = FLOWS["embed"](overrides=overrides)
    files = json.loads((Path(first.dir) / store.MANIFEST).read_text())["stage_files"]
    victim = Path(first.dir) / max(files, key=lambda rel: files[rel]["size"])  # the largest
    victim.write_bytes(victim.read_bytes()[:-1])

    seen = _Records()
    logging.getLogger("prefect.task_runs").addHandler(seen)
    try:
        state = FLOWS["embed"](overrides=overrides, return_state=True)
    finally:
        logging.getLogger("prefect.task_runs").removeHandler(seen)
    assert state.is_failed()
    with pytest.raises(StoreError) as err:
        state.result()
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"embed stage {first.dir!r} changed since it finished: ")
    with get_client(sync_client=True) as client:
        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        runs = client.read_task_runs(flow_run_filter=this_run)
        (embed,) = [r for r in runs if r.name.startswith("embed-")]
        states = [s.type.value for s in client.read_task_run_states(embed.id)]
    assert embed.run_count == 1 and states.count("RUNNING") == 1 and states[-1] == "FAILED", states
    messages = [r.getMessage() for r in seen.records]
    assert not [m for m in messages if "cache key" in m or "Retry" in m], messages
