"""The command line."""

import contextlib
import io
import subprocess
import sys

import pytest

from mrvi_pyro.cli import main

from ._chromium import CHROMIUM, NO_BROWSER, render


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A small demo run (400 cells, 3 epochs): its output directory and what it printed."""
    out_dir = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--out", str(out_dir), "--n-cells", "400", "--n-genes", "120", "--n-samples", "6",
                     "--max-epochs", "3", "--quiet"])
    assert code == 0
    return out_dir, printed.getvalue()


def test_demo_runs_end_to_end(demo_run):
    out_dir, out = demo_run
    assert "trained 3 epochs" in out
    for prefix in ("distances: largest between-sample spread", "DE: highest effect size", "DA: highest log-ratio"):
        assert prefix in out, prefix
    for name in ("u_embedding.png", "training_history.png", "simulated.h5ad", "model/model.pt", "model/model.json",
                 "de_summary.csv", "da_summary.csv", "sample_distance_spread.csv", "report.html",
                 "results/local_sample_distances.zarr", "results/differential_expression.zarr",
                 "results/differential_abundance.zarr"):
        assert (out_dir / name).exists(), name
    assert (out_dir / "u_embedding.png").stat().st_size > 10_000
    _check_report(out_dir)
    text = (out_dir / "report.html").read_text()
    for group in ("type_0", "type_1", "type_2", "type_3"):  # every cell type in the DE table
        assert text.count(f'<td class="text">{group}</td>') >= 3, group  # distances, DE and DA tables
    assert "Training curves: -ELBO per cell" in text and "simulated.h5ad" in text
    assert "mrvi-pyro demo --out" in text  # the command line in the run metadata


@pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)
def test_demo_report_renders_in_headless_chromium(demo_run, tmp_path):
    out_dir, _ = demo_run
    state = render(CHROMIUM, out_dir / "report.html", tmp_path / "demo_report_1280px.png", width=1280)
    assert len(state["images"]) == len(list(out_dir.glob("*.png"))) >= 8
    assert all(image["complete"] and image["width"] > 0 for image in state["images"]), state["images"]
    assert state["scrollWidth"] <= 1280 == state["innerWidth"]
    assert state["console_errors"] == []


def _check_report(out_dir):
    """The report embeds every figure it references, and every figure written is in it."""
    import re

    text = (out_dir / "report.html").read_text()
    referenced = set(re.findall(r'data-file="([^"]+)"', text))
    written = {p.name for p in out_dir.glob("*.png")}
    assert referenced == written and len(written) >= 8
    assert text.count("data:image/png;base64,") == len(referenced)
    assert "src=\"http" not in text and "<table" in text


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
    assert err.startswith("error: sample_key 'donor' is not a column of adata.obs")
    assert len(err.strip().splitlines()) == 1


def test_analyze_command_and_its_errors(tmp_path, small_adata, capsys):
    raw = small_adata.copy()
    del raw.uns["_mrvi_pyro"]
    raw.write_h5ad(tmp_path / "data.h5ad")
    assert main(["fit", str(tmp_path / "data.h5ad"), "--sample-key", "sample", "--batch-key", "batch",
                 "--out", str(tmp_path / "run"), "--max-epochs", "2", "--quiet"]) == 0
    assert main(["analyze", str(tmp_path / "run"), "--groupby", "cell_type", "--de", "age", "--quiet",
                 "--mc-samples", "3"]) == 0
    assert (tmp_path / "run" / "de_summary.csv").is_file() and not (tmp_path / "run" / "da_summary.csv").exists()
    _check_report(tmp_path / "run")
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "run"), "--groupby", "celltype"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --groupby 'celltype' is not a column of obs") and len(err.strip().splitlines()) == 1
    assert main(["analyze", str(tmp_path / "run"), "--groupby", "cell_type", "--basis", "X_umap"]) == 2
    assert capsys.readouterr().err.startswith("error: --basis 'X_umap' is not a key of obsm")
    assert main(["analyze", str(tmp_path / "nowhere"), "--groupby", "cell_type"]) == 2
    assert "pass --data" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "run"), "--groupby", "cell_type", "--de", "cell_type"]) == 2
    assert "already holds analysis outputs" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "run"), "--groupby", "cell_type", "--de", "cell_type", "--overwrite"]) == 2
    assert "not a sample-level covariate" in capsys.readouterr().err
    assert (tmp_path / "run" / "de_summary.csv").is_file()  # the failed run left the earlier outputs


def test_help_and_version_answer_without_loading_the_heavy_libraries():
    code = ("import sys\nfrom mrvi_pyro.cli import main\n"
            "for argv in (['--help'], ['--version'], ['fit', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as done:\n        assert done.code == 0, argv\n"
            "heavy = sorted(m for m in ('torch', 'anndata', 'pyro', 'numpy', 'pandas', 'matplotlib', 'xarray') "
            "if m in sys.modules)\nprint('heavy:', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import mrvi_pyro

    assert f"mrvi-pyro {mrvi_pyro.__version__}" in result.stdout
    assert "heavy: []" in result.stdout
    option = "--batch-size BATCH_SIZE\n" + " " * 24 + "cells per step (as MRVI.train) (default: 128)"
    assert option in result.stdout
    assert "(default: None)" not in result.stdout and "(default: False)" not in result.stdout


def test_the_package_imports_lazily_and_keeps_its_public_names():
    code = ("import sys, types\nimport mrvi_pyro\nassert 'torch' not in sys.modules\n"
            "from mrvi_pyro import MRVI, pl\nimport mrvi_pyro.model, mrvi_pyro.guide\n"
            "assert not isinstance(mrvi_pyro.model, types.ModuleType) and callable(mrvi_pyro.guide)\n"
            "assert mrvi_pyro.model is sys.modules['mrvi_pyro.model'].model and MRVI is mrvi_pyro.api.MRVI\n"
            "assert mrvi_pyro.plotting.volcano is pl.volcano and callable(mrvi_pyro.datasets.simulate)\n"
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
