"""The `alignet` CLI: user mistakes print one line naming the field, exit 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--set", "cluster.k=-1"], "cluster.k"),
        (["--set", "cluster.k=5000"], "cluster.k"),
        (["--set", "embed.model=not_a_model"], "embed.model"),
        (["--set", "human.triplets=/nope/triplets.txt"], "human.triplets"),
        (["--set", "sample.strategies=[random]"], "sample.strategies"),
        (["--set", "distill.strategy=within_class"], "distill.strategy"),
        (["--set", "embed.weights=/nope/w.safetensors"], "/nope/w.safetensors"),
        (["--set", "source.kind=folder", "--set", "source.path=/nope/images"], "/nope/images"),
        (["--config", "/nope/config.yaml"], "/nope/config.yaml"),
        (["--set", "sample.dask_address=tcp://10.0.0.9:8786"], "is not a tls:// address"),
        (["--set", "sample.dask_address=tls://10.0.0.9:8786"], "sample.dask_tls_ca_file: required"),
        (["--set", "sample.dask_address=tls://10.0.0.9:8786", "--set", "sample.dask_tls_ca_file=/nope/ca.pem",
          "--set", "sample.dask_tls_cert=/nope/c.pem", "--set", "sample.dask_tls_key=/nope/k.pem"], "/nope/ca.pem"),
        (["--set", "sample.dask_tls_cert=/nope/c.pem"], "applies with sample.dask_address only"),
    ],
)
def test_validate_reports_bad_config_in_one_line(args, needle, capsys):
    assert main(["validate", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_validate_accepts_the_demo_config(capsys):
    assert main(["validate"]) == 0
    assert "config ok" in capsys.readouterr().out


def test_entry_point_exits_2_without_traceback():
    res = subprocess.run([sys.executable, "-m", "flows.cli", "validate", "--set", "cluster.k=-1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "cluster.k" in res.stderr


def test_set_without_equals_is_a_usage_error(capsys):
    assert main(["run", "--set", "cluster.k"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --set expects KEY=VALUE (e.g. --set cluster.k=20), got 'cluster.k'\n"


def test_misspelt_model_names_get_close_matches(capsys):
    assert main(["validate", "--set", "embed.model=resnt50"]) == 2
    err = capsys.readouterr().err
    assert "embed.model: unknown timm model 'resnt50'; did you mean 'resnet50'" in err and err.count("\n") == 1
    assert main(["validate", "--set", "distill.student=tf_efficientnet_lite00"]) == 2
    assert "did you mean 'tf_efficientnet_lite0'" in capsys.readouterr().err


def test_model_names_are_cached_per_timm_version(tmp_path, monkeypatch):
    """The first check lists timm's names (importing it) into the cache; later checks read only the file,
    and a tag (`.augreg_in21k`) or a deprecated alias is accepted as timm.is_model accepts it."""
    import timm

    from alignet_core.models import refs as model_refs

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model_refs.check_model_name("vit_base_patch16_224.augreg_in21k", "embed.model")
    (cached,) = (tmp_path / "alignet").glob(f"timm-{timm.__version__}-models.json")
    assert "vit_base_patch16_224" in cached.read_text()
    for name in ("convnext_tiny_in22ft1k", "resnet18", "tf_efficientnet_lite0"):
        assert timm.is_model(name)
        model_refs.check_model_name(name, "embed.model")
    cached.write_text('["only_this_model"]')  # the cache, not timm, answers from now on
    model_refs.check_model_name("only_this_model", "embed.model")


def test_validate_and_errors_do_not_import_torch():
    """`alignet validate` of a CPU config, an error, `datasets list` and `verify` answer without importing torch or
    timm (seconds of imports); their latency is recorded by `python -m benchmarks.cli`."""
    probe = ("import sys; from flows.cli import main; rc = main({args!r}); "
             "print(rc, sorted(m for m in ('torch', 'timm', 'torchvision', 'prefect', 'dask', 'zarr') if m in sys.modules))")
    for args, rc in ((["validate"], 0), (["validate", "--set", "cluster.k=-1"], 2),
                     (["validate", "--set", "embed.model=resnt50"], 2), (["run", "--set", "cluster.k"], 2),
                     (["datasets", "list", "--root", "/nonexistent-root"], 0),
                     (["verify", "--root", "/nonexistent-root"], 0)):
        res = subprocess.run([sys.executable, "-c", probe.format(args=args)], capture_output=True, text=True, timeout=300)
        assert res.stdout.strip().splitlines()[-1] == f"{rc} []", (args, res.stdout, res.stderr)


def test_the_flows_load_no_compute_library():
    """What a fully cached rerun imports: the flows and every stage's planning, without torch, timm, scipy,
    matplotlib, FAISS or Dask (seconds of imports each, which a cached rerun must not pay). The stages import
    them where they compute, and `benchmarks.scale` records the cached rerun's time."""
    probe = ("import sys, flows.cli, flows.alignet, flows.stages, flows.sample, "
             "alignet_core.pipeline.report; print(sorted(m for m in ('torch', 'timm', 'torchvision', 'scipy', "
             "'matplotlib', 'faiss', 'dask', 'distributed', 'prefect_dask', 'prefect.server.api.server') "
             "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip().splitlines()[-1] == "[]", (res.stdout, res.stderr[-2000:])


@pytest.mark.parametrize("command", ["run", "embed", "transform", "cluster", "sample", "distill", "evaluate",
                                     "validate", "datasets", "verify", "watch"])
def test_every_subcommand_help_has_a_description_and_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"alignet {command}" in out.split("example", 1)[1]


def test_the_console_keeps_the_pipelines_lines_and_others_warnings_only():
    import logging

    from flows.cli import _OwnLinesOnly

    def record(name: str, level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    keep = _OwnLinesOnly().filter
    assert keep(record("alignet_core.progress", logging.INFO, "embed: 1/2 images"))
    assert keep(record("tasks.sample", logging.DEBUG, "detail"))
    assert not keep(record("prefect.task_runs", logging.INFO, "Finished in state Completed()"))
    assert not keep(record("prefect.task_runner.dask", logging.INFO, "The Dask dashboard is available at ..."))
    assert keep(record("prefect.flow_runs", logging.ERROR, "Encountered exception"))
    assert not keep(record("distributed.nanny", logging.WARNING, "Worker process still alive after 4.0 seconds, killing"))
    assert keep(record("distributed.nanny", logging.WARNING, "Restarting worker"))


_STAGE_ERROR_RUN = """
import sys
from flows.cli import _setup_logging
_setup_logging(int(sys.argv[1]))
from prefect import flow, task
from alignet_core.errors import InputError

@task
def read_dataset():
    raise InputError("distill.dataset: 'train.npz': an entry claims bytes past the end of the file")

@flow
def stage():
    return read_dataset()

try:
    stage()
except InputError as err:
    print(f"error: {err}", file=sys.stderr)
"""


def test_a_user_error_inside_a_stage_prints_no_traceback(tmp_path):
    """A bad input found inside a stage's task (a real flow on Prefect's temporary server, the CLI's console
    set up as `alignet` sets it): Prefect's run loggers say it in one line each, no traceback, then the
    `error:` line (issue 34: ~98 lines with two tracebacks before)."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    quiet = subprocess.run([sys.executable, "-c", _STAGE_ERROR_RUN, "0"], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=300)
    lines = [line for line in quiet.stdout.splitlines() + quiet.stderr.splitlines() if line.strip()]
    assert "Traceback" not in quiet.stderr + quiet.stdout, quiet.stderr
    assert lines[-1] == "error: distill.dataset: 'train.npz': an entry claims bytes past the end of the file"
    assert len(lines) <= 6, lines


def _help_examples() -> list[str]:
    """Every `alignet ...` example line of the top-level and every subcommand's help."""
    from flows.cli import _build_parser

    parser = _build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    texts = [parser.epilog or ""] + [p.epilog or "" for p in sub.choices.values()]
    lines = [line.strip().split("   #")[0].strip() for t in texts for line in t.splitlines()]
    return [line for line in lines if line.startswith("alignet ")]


def test_every_help_example_parses_and_its_overrides_name_real_fields():
    """Each example of `alignet --help` and `alignet <cmd> --help` is parsed as the CLI parses it, and its
    `--set` overrides are applied to the demo config (a field that does not exist, or a wrong type, fails)."""
    import shlex

    from flows._config import parsed_config
    from flows.cli import _build_parser, _parse_overrides

    examples = _help_examples()
    assert len(examples) >= 12 and any("--set" in e for e in examples)
    for example in examples:
        args = _build_parser().parse_args(shlex.split(example)[1:])
        overrides = _parse_overrides(getattr(args, "set", []))
        parsed_config(None, overrides)  # raises ConfigError naming a bad field


def test_the_example_check_catches_a_field_that_does_not_exist():
    from alignet_core.errors import ConfigError
    from flows._config import parsed_config
    from flows.cli import _parse_overrides

    with pytest.raises(ConfigError, match="n_triplets"):
        parsed_config(None, _parse_overrides(["sample.n_triplets=1000000"]))
