"""`alignet` command line: the demo, a run from a YAML config, each stage, and config validation.

Errors the user can fix (bad config, bad input) print one line naming what is wrong and exit 2,
without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from alignet_core.errors import ConfigError
from alignet_core.io.limits import load_yaml
from alignet_core.pipeline import registry
from alignet_core.runtime.malloc import STAGE_PROCESS, child_environment, set_malloc_thresholds


def _setup_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "alignet_core")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


class UsageError(ValueError):
    """A command line that cannot be run as written (exit 2, one line)."""


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UsageError(f"--set expects KEY=VALUE (e.g. --set cluster.k=20), got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = load_yaml(value, f"--set {key.strip()}")
        except yaml.YAMLError as err:
            raise UsageError(f"--set {key.strip()}: the value {value[:80]!r} is not YAML "
                             f"({str(err).splitlines()[0]})") from None
    return out


_EXAMPLES = {
    "demo": "alignet demo --root alignet-data",
    "run": "alignet run -c my.yaml --set cluster.k=20 --set sample.n_train=100000",
    "validate": "alignet validate -c my.yaml   # checks fields, paths, model names, human data; runs nothing",
}
_STAGE_NOTE = ("Each stage reuses the finished stages before it (same config, same code) and computes "
               "the missing ones.")


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignet", description="AligNet dataset generation and distillation pipeline",
                                epilog="examples:\n  alignet demo\n  alignet validate -c my.yaml\n"
                                       "  alignet run -c my.yaml\n  alignet datasets list\n  alignet verify --stages",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log lines: -v every library line, -vv also Prefect's and Dask's")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = [("demo", "run the whole pipeline on the shipped emoji demo config (no network)", _EXAMPLES["demo"]),
                ("run", "run the whole pipeline from a YAML config", _EXAMPLES["run"]),
                *((s.name, f"stage {registry.number(s.name)}: {s.summary}", f"alignet {s.name} -c my.yaml {s.example}")
                  for s in registry.STAGES),
                ("validate", "check a config (and its input paths) without running anything", _EXAMPLES["validate"])]
    for name, help_, example in commands:
        note = f"\n\n{_STAGE_NOTE}" if name in registry.names() else ""
        sp = sub.add_parser(name, help=help_.replace("%", "%%"), description=help_[0].upper() + help_[1:] + "." + note,
                            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--config", "-c", help="YAML pipeline config (default: the demo config)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set cluster.k=20 (repeatable)")
        sp.add_argument("--root", help="artifact root (overrides the config's root)")
    ds = sub.add_parser("datasets", help="list, show and verify published dataset versions",
                        description="List, show and verify published dataset versions (read-only).",
                        epilog="examples:\n  alignet datasets list --root alignet-data\n"
                               "  alignet datasets show demo --version latest\n"
                               "  alignet datasets verify demo   # re-hashes every file against its manifest",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ds.add_argument("action", choices=["list", "show", "verify"])
    ds.add_argument("name", nargs="?", help="dataset name (default: the config's dataset_name)")
    ds.add_argument("--version", default="latest", help="a version id, or 'latest' (default)")
    ds.add_argument("--config", "-c", help="YAML pipeline config whose root and dataset_name to use")
    ds.add_argument("--root", help="artifact root (default: the config's root)")
    ds.add_argument("--json", action="store_true", help="print machine-readable JSON")
    v = sub.add_parser("verify", help="re-hash every finished stage's files and every published dataset version",
                       description="Re-hash the files of every finished stage directory (<root>/stages/<stage>/<key>, "
                       "every stage and key) against the sha256 its manifest recorded, and every file of every "
                       "published dataset version against its version manifest; one line per problem. Exit 1 when "
                       "there is one, 0 otherwise. A rerun checks only the sizes when it reuses a stage (one listing "
                       "of its directory): a byte changed in place is found here, which reads every byte (about 1 GB/s "
                       "from the page cache; benchmarks/stage_integrity.py).",
                       epilog="examples:\n  alignet verify --stages -c my.yaml   # the stage directories only\n"
                              "  alignet verify --root alignet-data   # stages and published datasets",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("--stages", action="store_true", help="check the stage directories (default: both)")
    v.add_argument("--datasets", action="store_true", help="check the published dataset versions (default: both)")
    v.add_argument("--config", "-c", help="YAML pipeline config whose root to use")
    v.add_argument("--root", help="artifact root (default: the config's root)")
    w = sub.add_parser("watch", help="follow a flow run on the Prefect server: its log lines, then how it ended and why",
                       description="Follow a flow run (and its subflows) on the Prefect server at PREFECT_API_URL: its "
                       "log lines as they arrive, then its final state with the reason (the state's message and "
                       "those of failed task runs). Exit 0 when it completed, 1 otherwise.",
                       epilog="example:\n  prefect deployment run 'alignet/regenerate-dataset'   # prints the flow run's UUID\n"
                              "  alignet watch 0b7e...-...-...   # logs, then e.g. 'FAILED: ...' and exit 1",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    w.add_argument("flow_run_id", help="the flow run's UUID")
    w.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 124)")
    return p


def _watch(args: argparse.Namespace) -> int:
    """`alignet watch RUN_ID`: the run's log lines, then its outcome; exit 0 when it completed."""
    from prefect.settings import get_current_settings

    from flows.watch import Outcome, follow

    if not get_current_settings().api.url:
        print("error: set PREFECT_API_URL to the server the run is on (e.g. http://127.0.0.1:4200/api), and "
              "PREFECT_API_AUTH_STRING for `make serve`'s locked-down server", file=sys.stderr)
        return 2
    try:
        for item in follow(args.flow_run_id, timeout_s=args.timeout):
            if isinstance(item, Outcome):
                print(f"flow run {item.name}: {item.state}")
                for reason in item.reasons:
                    print(f"  {reason}")
                return 0 if item.ok else 1
            print(item, flush=True)
    except TimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 124
    return 1


_OWN = ("alignet_core", "flows", "tasks")  # the pipeline's own loggers


class _OwnLinesOnly(logging.Filter):
    """The console without -vv: every line of the pipeline's own loggers, others' warnings and errors only
    (Prefect and Dask set their loggers' levels when they load, so levels alone do not hold them), and not
    the nanny's "still alive after 4.0 seconds, killing": the sampling cluster's workers are killed at
    close, after every shard is written, by design."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in _OWN:
            return True
        if record.name == "distributed.nanny" and "still alive after" in record.getMessage():
            return False
        return record.levelno >= logging.WARNING


class _UserErrorsInOneLine(logging.Filter):
    """Without -vv, Prefect's run loggers report a user error (an `AlignetError`: a bad input, config or store,
    whose message names it) in one line, without its traceback: the command prints it once more as its
    `error:` line, and two tracebacks of ~40 lines each buried it (issue 34)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from alignet_core.errors import AlignetError

        if record.exc_info and isinstance(record.exc_info[1], AlignetError):
            record.exc_info, record.exc_text = None, None
        return True


def _setup_logging(verbose: int) -> None:
    """INFO lines of the pipeline's own loggers; -v adds DEBUG, -vv Prefect's and Dask's INFO lines."""
    logging.basicConfig(level=logging.INFO if verbose >= 2 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_OwnLinesOnly())
    for name in _OWN:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose < 2:
        for run_logger in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(run_logger).addFilter(_UserErrorsInOneLine())
        for noisy in ("httpx", "distributed", "faiss.loader", "prefect"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Prefect and Dask set their loggers' levels when they load (later, lazily): their consoles are
        # quieted where they read it. The runs' logs in the UI keep every INFO line.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")


def _datasets(args: argparse.Namespace) -> int:
    """`alignet datasets list|show|verify`: read-only views of `<root>/datasets/`."""
    from alignet_core.config import load_config, parse_config
    from alignet_core.sample import versions

    cfg = load_config(args.config) if args.config else parse_config({})
    root = args.root or cfg.root
    name = args.name or cfg.dataset_name
    if args.action == "list":
        rows = [{"dataset": n, **r} for n in versions.list_datasets(root) for r in versions.list_versions(root, n)]
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no published datasets under {versions.datasets_dir(root)}")
        for r in [] if args.json else rows:
            mark = "  (latest)" if r["latest"] else ""
            print(f"{r['dataset']}  {r['version']}  {r['published_at']}  {r['n_triplets']} triplets in "
                  f"{r['files']} files{mark}")
        return 0
    m = versions.manifest(root, name, args.version)
    if args.action == "show":
        if args.json:
            print(json.dumps(m, indent=2))
            return 0
        print(f"dataset {name}, version {m['version']}, published {m.get('published_at', '?')}")
        print(f"path: {m['path']}")
        print(f"inputs: {m.get('inputs')}  code: {m.get('code_version')}")
        for fname, info in sorted(m["files"].items()):
            print(f"  {info.get('path', fname)}  {info['n_triplets']} triplets  sha256 {info['sha256'][:16]}…")
        return 0
    problems = versions.verify(root, name, m["version"])  # the version shown: `latest` may move meanwhile
    for p in problems:
        print(f"FAILED {p}")
    if problems:
        print(f"dataset {name} version {m['version']}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ok: dataset {name} version {m['version']}: {len(m['files'])} files match their checksums")
    return 0


def _verify(args: argparse.Namespace) -> int:
    """`alignet verify [--stages] [--datasets]`: re-hash stage directories and published versions; exit 1 on
    any problem."""
    from alignet_core.config import load_config, parse_config
    from alignet_core.errors import InputError
    from alignet_core.io import store
    from alignet_core.runtime.runner import verify_stages
    from alignet_core.sample import versions

    root = args.root or (load_config(args.config) if args.config else parse_config({})).root
    both = not (args.stages or args.datasets)
    problems = 0
    if args.stages or both:
        checks = verify_stages(root)
        for c in checks:
            for p in c.problems:
                print(f"FAILED {c.dir}: {p}")
            if c.files is None and not c.problems:
                print(f"unchecked {c.dir}: its manifest records no files (written before they were recorded)")
        n_bad = sum(len(c.problems) for c in checks)
        problems += n_bad
        print(f"stages: {len(checks)} finished stage directories under {store.join(root, 'stages')}, "
              f"{sum(c.files or 0 for c in checks)} files checked, {n_bad} problem(s)")
    if args.datasets or both:
        n_versions = n_bad = 0
        for name in versions.list_datasets(root):
            for r in versions.list_versions(root, name):
                try:
                    found = versions.verify(root, name, r["version"])
                except InputError:  # removed by retention since it was listed
                    continue
                n_versions += 1
                n_bad += len(found)
                for p in found:
                    print(f"FAILED dataset {name} version {r['version']}: {p}")
        problems += n_bad
        print(f"datasets: {n_versions} published versions under {versions.datasets_dir(root)}, {n_bad} problem(s)")
    if problems:
        print(f"{problems} problem(s): delete a changed stage directory, or dataset version, and rerun the "
              "pipeline to make it again", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    set_malloc_thresholds(STAGE_PROCESS)  # the stages run in this process
    for key, value in child_environment(STAGE_PROCESS).items():  # and the processes it starts
        os.environ.setdefault(key, value)
    args = _build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        overrides = _parse_overrides(getattr(args, "set", []))
    except (UsageError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from alignet_core.errors import AlignetError
    from flows._config import parsed_config, resolve_context

    if args.command in ("datasets", "verify", "watch"):
        try:
            return {"datasets": _datasets, "verify": _verify, "watch": _watch}[args.command](args)
        except AlignetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    if args.command == "demo" and not args.config:
        from alignet_core.io.sources import demo_data_dir

        args.config = str(demo_data_dir() / "demo.yaml")
    if args.root:
        overrides["root"] = str(Path(args.root).resolve()) if "://" not in args.root else args.root
    if args.command == "validate":
        try:
            ctx = resolve_context(args.config, overrides)
        except AlignetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for line in _human_summary(ctx):
            print(line)
        print(f"config ok: {args.config or '(demo defaults)'}")
        return 0
    try:
        cfg = parsed_config(args.config, overrides)  # a bad field is named before any process starts
    except AlignetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from alignet_core.runtime.lifeline import start_watchdog
    from flows.temporary_server import TemporaryServer

    start_watchdog()  # Prefect's temporary server, Dask and loader workers never outlive this process
    server = TemporaryServer.start()  # it starts while the config is checked and the stages load
    return _run_and_print(args, overrides, cfg, server)


def _run_and_print(args: argparse.Namespace, overrides: dict[str, Any], cfg: Any, server: Any) -> int:
    """Preflight `cfg` (its inputs, before the flow starts: the run context, which the flow then takes as it
    is), run the command's flow (on `server`, a `TemporaryServer`, when given), print what it made."""
    from alignet_core.errors import AlignetError
    from alignet_core.pipeline.preflight import preflight
    from flows._config import prepared

    try:
        ctx = preflight(cfg)
        run = _flow(args.command)
        params = {"config_path": args.config, "overrides": overrides or None}
        with prepared(ctx, **params):
            if server is None:
                result = run(**params)
            else:
                server.wait_ready()
                with server.in_use():
                    result = run(**params)
    except AlignetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command in ("demo", "run"):
        s = result.model_dump(mode="json")
        print(json.dumps({k: s[k] for k in ("transform_acc_before", "transform_acc_after", "cluster_nmi",
                                            "cluster_ari", "n_triplets", "student_acc_before",
                                            "student_acc_after", "stage_seconds")}, indent=2))
        if result.people is not None:
            p = result.people
            print(f"against the people (test fold, {p.n_objects} objects; expected accuracy vs VICE on every trial, "
                  f"ceiling {100 * (p.ceiling or float('nan')):.1f}%):")
            for model, e in p.expected.items():
                print(f"  {model}: {e.text()}")
            for side, d in p.changes.items():
                print(f"  {side} aligned − raw: {d.text()}")
        print(f"dataset: {result.dataset}")
        print(f"report:  {result.report_dir}/report.md")
        print(f"summary: {result.report_dir}/summary.json")
    else:
        print(f"{result.stage}: {result.artifact}")
    if args.command == "embed" and result.metrics.changes is not None:
        from alignet_core.embed.render import change_line

        print(change_line(result.metrics.changes))
    if args.command == "evaluate":
        from alignet_core.evaluate.render import alignment_markdown

        print(alignment_markdown(result))
    return 0


def _human_summary(ctx: Any) -> list[str]:
    """What `validate` shows of the human data (the run context's): the object ↔ image mapping of a triplet
    file (objects with images, triplets kept, unknown ids), or that the taxonomy proxy stands in for it."""
    from alignet_core.human.data import PROXY_NAME, proxy_taxonomy, trial_file

    if trial_file(ctx.cfg.human) is None:
        labels = proxy_taxonomy(ctx.cfg, ctx.source)
        if labels is None:
            return ["human data: none (the source has unlabelled images)"]
        return [f"human data: the {PROXY_NAME}, drawn from the source's labels: {len(set(labels[0]))} coarse "
                f"categories, {len(set(labels[1]))} classes"]
    data = ctx.human
    lines = data.mapping.lines() if data is not None and data.mapping is not None else []
    if data is not None and data.dense:
        d = ctx.cfg.human.densify
        lines.append(f"human.densify: VICE on all {len(data.trials)} trials over {data.n_declared} objects; "
                     f"{d.n_triplets} dense triplets per fit over the {data.n_objects} objects with images, "
                     f"{d.n_test} test triplets per fold ({ctx.cfg.human.folds} folds); {len(data.triplets)} trials "
                     f"name three objects with images, {len(data.split.test)} of them all in the test fold")
    return lines


def _flow(command: str) -> Any:
    """The flow a command runs (imported here: `datasets`, `watch` and `validate` need none)."""
    if command in ("demo", "run"):
        from flows.alignet import alignet

        return alignet
    from flows.stages import FLOWS

    return FLOWS[command]


if __name__ == "__main__":
    sys.exit(main())
