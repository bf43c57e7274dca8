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


def test_fit_command(tmp_path, small_adata):
    path = tmp_path / "data.h5ad"
    raw = small_adata.copy()
    del raw.uns["_mrvi_pyro"]
    raw.write_h5ad(path)
    code = main(["fit", str(path), "--sample-key", "sample", "--batch-key", "batch", "--labels-key", "cell_type",
                 "--out", str(tmp_path / "run"), "--max-epochs", "2", "--quiet"])
    assert code == 0
    for name in ("model/model.pt", "history.csv", "training_history.png", "u_embedding.png", "fit.json"):
        assert (tmp_path / "run" / name).is_file(), name


def test_fit_bad_input_gives_one_line_errors(tmp_path, small_adata, capsys):
    assert main(["fit", str(tmp_path / "missing.h5ad"), "--sample-key", "s", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: data file {tmp_path / 'missing.h5ad'} does not exist"
    (tmp_path / "junk.h5ad").write_text("not hdf5")
    assert main(["fit", str(tmp_path / "junk.h5ad"), "--sample-key", "s", "--out", str(tmp_path)]) == 2
    assert "is not a readable .h5ad file" in capsys.readouterr().err
    small_adata.write_h5ad(tmp_path / "ok.h5ad")
    assert main(["fit", str(tmp_path / "ok.h5ad"), "--sample-key", "donor", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sample_key 'donor' is not a column of adata.obs") and len(err.strip().splitlines()) == 1
