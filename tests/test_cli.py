"""The command line."""

import subprocess
import sys

from mrvi_pyro.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--n-cells", "400", "--n-genes", "120", "--n-samples", "6",
                 "--max-epochs", "3", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "trained 3 epochs" in out and "planted truth" in out
    for name in ("u_embedding.png", "training_history.png", "simulated.h5ad", "model/model.pt", "model/model.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "u_embedding.png").stat().st_size > 10_000


def test_bad_arguments_give_one_line_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mrvi_pyro.cli", "demo", "--out", str(tmp_path), "--n-samples", "3"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
