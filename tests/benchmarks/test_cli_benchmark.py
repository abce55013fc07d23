"""`python -m benchmarks.cli` runs every command it times, with the exit codes a user gets."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.cli import main


def test_cli_benchmark_times_every_command(tmp_path: Path) -> None:
    result = main(["--repeats", "1", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "cli.json").read_text())["benchmark"] == "cli"
    codes = {name: result[name]["exit_codes"] for name in result if isinstance(result[name], dict)
             and "exit_codes" in result[name]}
    assert codes == {"python_start": [0], "import_torch_timm": [0], "validate_demo_config": [0],
                     "validate_bad_value": [2], "validate_misspelt_model": [2], "set_without_equals": [2],
                     "datasets_list": [0], "help": [0]}
    assert result["validate_demo_config"]["cpu_s"] > 0
