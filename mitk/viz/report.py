"""Self-contained HTML reports: figures and tables in one file that renders with no network."""

from __future__ import annotations

from dataclasses import dataclass
import html
import os
from pathlib import Path
import tempfile
from typing import TypeAlias

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

Content: TypeAlias = go.Figure | pd.DataFrame | str


@dataclass(frozen=True)
class Section:
    """One titled part of a report: a figure, a table or a paragraph of text."""

    title: str
    content: Content
    note: str = ""


def _render(content: Content, first_figure: bool) -> str:
    if isinstance(content, go.Figure):
        # plotly.js goes inline once, in the first figure, so the file needs no CDN
        return pio.to_html(content, include_plotlyjs=first_figure, full_html=False)
    if isinstance(content, pd.DataFrame):
        return content.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
    return f"<p>{html.escape(content)}</p>"


def html_report(title: str, header: dict[str, str], sections: list[Section]) -> str:
    """A complete HTML page: a header table saying what produced it, then each section."""
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in header.items()
    )
    parts, seen_figure = [], False
    for section in sections:
        body = _render(section.content, not seen_figure)
        seen_figure = seen_figure or isinstance(section.content, go.Figure)
        note = f"<p class='note'>{html.escape(section.note)}</p>" if section.note else ""
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>{note}{body}</section>")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table class='header'>{rows}</table>"
        f"{''.join(parts)}</body></html>"
    )


def write_report(
    path: str | Path, title: str, header: dict[str, str], sections: list[Section]
) -> Path:
    """Write ``html_report(...)`` to ``path`` atomically; returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(html_report(title, header, sections))
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.2em 0.8em; text-align: left; border-bottom: 1px solid #ddd; }
table.header th { color: #555; font-weight: normal; }
section { margin-top: 2em; }
p.note { color: #555; }
"""
