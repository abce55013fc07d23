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


def _setup_env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "alignet_core")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: --set expects key=value (e.g. cluster.k=20), got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = load_yaml(value, f"--set {key.strip()}")
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key.strip()}: not a YAML value ({str(err).splitlines()[0]})") from None
    return out


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignet", description="AligNet dataset generation and distillation pipeline")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [
        ("demo", "run the whole pipeline on the shipped emoji demo config (no network)"),
        ("run", "run the whole pipeline from a YAML config"),
        ("embed", "stage 0: teacher embeddings"),
        ("transform", "stage 1: human-aligned transform"),
        ("cluster", "stage 2: k-means clusters"),
        ("sample", "stage 3: triplets, published as AligNet .npz"),
        ("distill", "stage 4: finetune the student"),
        ("evaluate", "stage 5: alignment at every level, before and after, with 95% intervals"),
        ("validate", "check a config (and its input paths) without running anything"),
    ]:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", "-c", help="YAML pipeline config (default: the demo config)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set cluster.k=20 (repeatable)")
        sp.add_argument("--root", help="artifact root (overrides the config's root)")
    ds = sub.add_parser("datasets", help="list, show and verify published dataset versions")
    ds.add_argument("action", choices=["list", "show", "verify"])
    ds.add_argument("name", nargs="?", help="dataset name (default: the config's dataset_name)")
    ds.add_argument("--version", default="latest", help="a version id, or 'latest' (default)")
    ds.add_argument("--config", "-c", help="YAML pipeline config whose root and dataset_name to use")
    ds.add_argument("--root", help="artifact root (default: the config's root)")
    ds.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


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
    problems = versions.verify(root, name, args.version)
    for p in problems:
        print(f"FAILED {p}")
    if problems:
        print(f"dataset {name} version {m['version']}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ok: dataset {name} version {m['version']}: {len(m['files'])} files match their checksums")
    return 0


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "distributed", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from alignet_core.errors import AlignetError
    from flows._config import resolve_config

    if args.command == "datasets":
        try:
            return _datasets(args)
        except AlignetError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    if args.command == "demo" and not args.config:
        from alignet_core.io.sources import demo_data_dir

        args.config = str(demo_data_dir() / "demo.yaml")
    try:
        overrides = _parse_overrides(args.set)
        if args.root:
            overrides["root"] = str(Path(args.root).resolve()) if "://" not in args.root else args.root
        resolve_config(args.config, overrides)
        if args.command == "validate":
            print(f"config ok: {args.config or '(demo defaults)'}")
            return 0
        result = _run(args.command, args.config, overrides)
    except AlignetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command in ("demo", "run"):
        s = result.model_dump(mode="json")
        print(json.dumps({k: s[k] for k in ("transform_acc_before", "transform_acc_after", "cluster_nmi",
                                            "cluster_ari", "n_triplets", "student_acc_before",
                                            "student_acc_after", "stage_seconds")}, indent=2))
        print(f"dataset: {result.dataset}")
        print(f"report:  {result.report_dir}/report.md")
        print(f"summary: {result.report_dir}/summary.json")
    else:
        print(f"{result.stage}: {result.artifact}")
    if args.command == "evaluate":
        from alignet_core.pipeline.report import alignment_markdown

        print(alignment_markdown(result))
    return 0


def _run(command: str, config_path: str | None, overrides: dict[str, Any]) -> Any:
    from flows.alignet import alignet
    from flows.distill import distill_flow
    from flows.evaluate import evaluate_flow
    from flows.sample import sample_flow
    from flows.stages import cluster_flow, embed_flow, transform_flow

    flows = {"demo": alignet, "run": alignet, "embed": embed_flow, "transform": transform_flow,
             "cluster": cluster_flow, "sample": sample_flow, "distill": distill_flow, "evaluate": evaluate_flow}
    return flows[command](config_path=config_path, overrides=overrides or None)


if __name__ == "__main__":
    sys.exit(main())
