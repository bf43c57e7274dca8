"""A single self-contained HTML report: figures embedded as base64 PNG with captions, tables as
HTML (scrolling sideways inside the page when wider than it), preformatted text kept as is, and a
table of run metadata (versions, command line, seed, data file and its SHA-256, date)."""

from __future__ import annotations

import base64
import hashlib
import html
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd

PACKAGES = ("mrvi-pyro", "torch", "pyro-ppl", "anndata", "numpy", "pandas", "scipy", "xarray", "zarr", "matplotlib")
"""Packages whose versions the run metadata records."""


@dataclass
class Section:
    """One report section, shown in this order: heading, paragraphs, preformatted blocks
    (e.g. the model summary), figures (PNG file, caption) and tables (caption, DataFrame)."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    preformatted: list[str] = field(default_factory=list)


_STYLE = """
*, *::before, *::after { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222;
       overflow-wrap: anywhere; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
figure { margin: 1em 0; max-width: 100%; } img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.3em; }
.table-wrap { max-width: 100%; overflow-x: auto; margin: 0.5em 0 1em; }
table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; vertical-align: top; }
th { background: #f4f4f4; overflow-wrap: normal; } td { white-space: nowrap; }
.text { text-align: left; } td.text { white-space: normal; }
.caption { font-weight: 600; margin-top: 1em; } .note { font-size: 0.85em; color: #555; }
pre { background: #f7f7f7; padding: 0.8em; max-width: 100%; overflow-x: auto; white-space: pre; }
"""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def run_metadata(*, data_path: str | Path | None = None, seed: int | None = None,
                 command: list[str] | None = None) -> list[tuple[str, str]]:
    """(name, value) rows describing a run: date, command line, seed, data file and checksum,
    Python and package versions."""
    rows = [("date (UTC)", datetime.now(timezone.utc).isoformat(timespec="seconds"))]
    if command is not None:
        rows.append(("command line", " ".join(command)))
    if seed is not None:
        rows.append(("seed", str(seed)))
    if data_path is not None:
        rows.append(("data file", Path(data_path).name))
        rows.append(("data SHA-256", file_sha256(data_path)))
    rows.append(("python", platform.python_version()))
    for package in PACKAGES:
        try:
            rows.append((package, version(package)))
        except PackageNotFoundError:
            rows.append((package, "not installed"))
    return rows


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    text, name = html.escape(caption), html.escape(Path(path).name)
    return (f'<figure><img alt="{text}" data-file="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{text}</figcaption></figure>")


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4g}"
    return str(value)


def _table(caption: str, table: pd.DataFrame, max_rows: int) -> str:
    """A captioned HTML table without the DataFrame's index; numbers right-aligned, text left."""
    shown = table.head(max_rows)
    numeric = [pd.api.types.is_numeric_dtype(shown[c]) and not pd.api.types.is_bool_dtype(shown[c])
               for c in shown.columns]
    classes = ["" if n else ' class="text"' for n in numeric]
    head = "".join(f"<th{k}>{html.escape(str(c))}</th>" for c, k in zip(shown.columns, classes))
    rows = "".join("<tr>" + "".join(f"<td{k}>{html.escape(_cell(v))}</td>" for v, k in zip(row, classes)) + "</tr>"
                   for row in shown.itertuples(index=False, name=None))
    note = f'<div class="note">First {max_rows} of {len(table)} rows.</div>' if len(table) > max_rows else ""
    return (f"<div class='caption'>{html.escape(caption)}</div><div class='table-wrap'><table><thead><tr>{head}"
            f"</tr></thead><tbody>{rows}</tbody></table></div>{note}")


def _metadata(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f'<tr><th class="text">{html.escape(k)}</th><td class="text">{html.escape(v)}</td></tr>'
                    for k, v in rows)
    return f"<h2>Run</h2><div class='table-wrap'><table>{cells}</table></div>"


def write_html_report(path: str | Path, title: str, sections: list[Section], *,
                      metadata: list[tuple[str, str]] | None = None, max_rows: int = 200) -> Path:
    """Write the report to ``path`` and return it. Every figure is embedded (no external files);
    tables longer than ``max_rows`` show their first rows and say so."""
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        parts.extend(f"<p>{html.escape(text)}</p>" for text in section.paragraphs)
        parts.extend(f"<pre>{html.escape(text)}</pre>" for text in section.preformatted)
        parts.extend(_image(figure, caption) for figure, caption in section.figures)
        parts.extend(_table(caption, table, max_rows) for caption, table in section.tables)
    if metadata:
        parts.append(_metadata(metadata))
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
