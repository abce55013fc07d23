"""The `alignet` CLI: user mistakes print one line naming the field, exit 2, no traceback."""

import subprocess
import sys

import pytest

from flows.cli import main


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
