"""A single self-contained HTML report: figures embedded as base64 PNG, tables as HTML."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass
class Section:
    """One report section: a heading, paragraphs, PNG files and tables (shown in that order)."""

    heading: str
    paragraphs: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
img { max-width: 100%; margin: 0.5em 0; } table { border-collapse: collapse; font-size: 0.85em; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
.caption { font-weight: 600; margin-top: 1em; }
"""


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    name = html.escape(Path(path).name)
    return f'<figure><img alt="{name}" data-file="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'


def write_html_report(path: str | Path, title: str, sections: list[Section], *, max_rows: int = 20) -> Path:
    """Write the report to ``path`` and return it. Every figure is embedded (no external files)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.heading)}</h2>")
        parts.extend(f"<p>{html.escape(text)}</p>" for text in section.paragraphs)
        parts.extend(_image(figure) for figure in section.figures)
        for caption, table in section.tables:
            parts.append(f"<div class='caption'>{html.escape(caption)}</div>")
            parts.append(table.head(max_rows).to_html(float_format=lambda v: f"{v:.4g}", border=0))
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
