"""glm-export serve / triton through the command group: registered, their mistakes one line and exit 2."""
from __future__ import annotations

from click.testing import CliRunner

from exporter.cli import main


def test_serve_and_triton_are_registered():
    assert {"serve", "triton"} <= set(main.commands)
    r = CliRunner().invoke(main, ["serve", "--help"])
    assert r.exit_code == 0 and "--max-batch" in r.output and "--api-key" in r.output and "--no-truncate" in r.output


def test_serve_missing_bundle_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "nope"), "--port", "0"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "does not exist" in r.output


def test_triton_missing_bundle_leaves_nothing(tmp_path):
    out = tmp_path / "repo"
    r = CliRunner().invoke(main, ["triton", "--model", str(tmp_path / "nope"), "--out", str(out)])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output
    assert not out.exists() and list(tmp_path.iterdir()) == []
