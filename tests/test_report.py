"""report.html as a person reads it: every group in the DE table, captions in words, the model
summary with its line breaks, run metadata, and, in headless Chromium at 1280 px, every image
loaded, nothing wider than the window and no console error (screenshots kept under tmp_path)."""

import hashlib
import html
import re
import sys

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mrvi_pyro.pipeline import de_top_genes  # noqa: E402
from mrvi_pyro.report import Section, run_metadata, write_html_report  # noqa: E402

from ._chromium import CHROMIUM, NO_BROWSER, render  # noqa: E402


def de_summary(n_groups: int = 12, n_genes: int = 30) -> pd.DataFrame:
    """A differential_expression_summary-like table: every gene of ``n_groups`` groups."""
    rng = np.random.default_rng(0)
    frames = []
    for g in range(n_groups):
        lfc = rng.normal(0, 1, n_genes)
        order = np.argsort(-np.abs(lfc))
        frames.append(pd.DataFrame({
            "group": f"type_{g}", "covariate": "disease_disease", "rank": np.arange(1, n_genes + 1),
            "gene": [f"gene_{i:03d}" for i in order], "lfc_mean": lfc[order], "n_cells": 100 + g,
            "effect_size_mean": float(g), "frac_significant": g / n_groups,
        }))
    return pd.concat(frames, ignore_index=True)


def wide_figure(path, width_px: int = 3000):
    fig, ax = plt.subplots(figsize=(width_px / 100, 2), dpi=100)
    ax.plot(np.arange(10), np.arange(10) ** 2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stress_report(tmp_path):
    """A report with everything that could overflow: a 3000-px figure, a 60-column table, a
    long unbroken line in a preformatted block, long paths and checksums in the metadata."""
    data = tmp_path / ("cohort_" + "x" * 150 + ".h5ad")
    data.write_bytes(b"not really an h5ad, only checksummed")
    summary = de_summary()
    wide = pd.DataFrame(np.random.default_rng(1).normal(size=(5, 60)), columns=[f"column_{i}" for i in range(60)])
    sections = [
        Section("Model", preformatted=["MRVI: trained\n  line two\n  " + "z" * 400]),
        Section("Differential expression", ["A paragraph."], [(wide_figure(tmp_path / "wide.png"), "A wide figure.")],
                [("Top genes of every cell type", de_top_genes(summary, "cell_type")), ("A wide table", wide)]),
    ]
    metadata = run_metadata(data_path=data, seed=7, command=["mrvi-pyro", "analyze", str(tmp_path / ("r" * 200))])
    return write_html_report(tmp_path / "report.html", "test report", sections, metadata=metadata), data


def test_report_shows_every_group_in_words_with_its_run_metadata(tmp_path):
    path, data = stress_report(tmp_path)
    text = path.read_text()
    table = de_top_genes(de_summary(), "cell_type")
    assert len(table) == 12 and table["cell_type"].tolist() == [f"type_{g}" for g in range(11, -1, -1)]
    assert all(f"<td class=\"text\">type_{g}</td>" in text for g in range(12))  # every group, none cut at 20 rows
    top = de_summary().query("group == 'type_3'").head(5)
    assert ", ".join(f"{g} ({v:+.2f})" for g, v in zip(top["gene"], top["lfc_mean"])) in text
    assert "<th></th>" not in text and "dataframe" not in text  # no pandas index, no pandas styling
    assert re.findall(r"<figcaption>([^<]*)</figcaption>", text) == ["A wide figure."]
    assert "MRVI: trained\n  line two" in text and "<pre>MRVI: trained" in text  # line breaks kept
    assert text.count("<div class='table-wrap'>") == 3  # two tables and the metadata, each in a scrolling wrapper
    for key, value in [("seed", "7"), ("data file", data.name),
                       ("data SHA-256", hashlib.sha256(data.read_bytes()).hexdigest()),
                       ("python", f"{sys.version_info.major}.{sys.version_info.minor}"), ("torch", ""),
                       ("command line", "mrvi-pyro analyze")]:
        cell = rf'<th class="text">{re.escape(key)}</th><td class="text">[^<]*{re.escape(html.escape(value))}'
        assert re.search(cell, text), key
    assert re.search(r"date \(UTC\)</th><td class=\"text\">\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", text)


@pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)
def test_report_renders_in_headless_chromium_without_overflow(tmp_path):
    path, _ = stress_report(tmp_path)
    state = render(CHROMIUM, path, tmp_path / "report_1280px.png", width=1280)
    assert state["innerWidth"] == 1280
    assert [(image["complete"], image["width"] > 0) for image in state["images"]] == [(True, True)]
    assert state["images"][0]["width"] == 3000  # loaded at full resolution, drawn scaled to the page
    assert state["scrollWidth"] <= 1280, state
    assert state["console_errors"] == []
    assert (tmp_path / "report_1280px.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(CHROMIUM is None, reason=NO_BROWSER)
def test_browser_check_sees_broken_images_overflow_and_console_errors(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><img alt='gone' src='missing.png'>"
                    "<div style='width: 3000px'>wide</div><script>console.error('boom')</script></body></html>")
    state = render(CHROMIUM, page, tmp_path / "broken.png", width=1280)
    assert state["images"] == [{"alt": "gone", "complete": True, "width": 0}]
    assert state["scrollWidth"] >= 3000
    assert any("boom" in error for error in state["console_errors"])
