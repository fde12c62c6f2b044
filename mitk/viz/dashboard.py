"""Self-contained HTML dashboards: figures and tables in one file that renders with no network.

plotly.js is inlined once, before the first figure; every figure is a
``div.plotly-graph-div`` with a stable id (``figure-0``, ``figure-1``, ...) inside
``section#section-N``, and the same inputs always give the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import html
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from mitk.viz.defaults import figures_for
from mitk.viz.files import write_atomically
from mitk.viz.section import Content, Section

MAX_TABLE_ROWS = 200  # a dashboard is for reading; longer tables belong in parquet


def as_sections(item: Any) -> list[Section]:
    """A dashboard item as sections: as is, wrapped, or (a result object) its default figures."""
    if isinstance(item, Section):
        return [item]
    if isinstance(item, go.Figure):
        return [Section(item.layout.title.text or "Figure", item)]
    if isinstance(item, pd.DataFrame):
        return [Section("Table", item)]
    if isinstance(item, str):
        return [Section("", item)]
    return figures_for(item)


def _table(frame: pd.DataFrame) -> str:
    shown = frame.head(MAX_TABLE_ROWS)
    body = shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
    if len(frame) > len(shown):
        body += f"<p class='note'>First {len(shown)} of {len(frame)} rows.</p>"
    return body


def _render(content: Content, figure_index: int) -> str:
    if isinstance(content, go.Figure):
        return pio.to_html(
            content,
            include_plotlyjs=figure_index == 0,  # inline once: the file needs no CDN
            full_html=False,
            div_id=f"figure-{figure_index}",  # stable ids: same input, same bytes
            config={"displaylogo": False, "responsive": True},
        )
    if isinstance(content, pd.DataFrame):
        return _table(content)
    return "".join(f"<p>{html.escape(p)}</p>" for p in content.split("\n\n"))


def _mitk_version() -> str:
    try:
        return version("mitk")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def dashboard_html(title: str, header: Mapping[str, str], items: Sequence[Any]) -> str:
    """The complete page ``dashboard`` writes: header table, contents, then each section."""
    sections = [section for item in items for section in as_sections(item)]
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
        for k, v in header.items()
    )
    contents, parts, n_figures = [], [], 0
    for i, section in enumerate(sections):
        body = _render(section.content, n_figures)
        n_figures += isinstance(section.content, go.Figure)
        note = f"<p class='note'>{html.escape(section.note)}</p>" if section.note else ""
        heading = f"<h2>{html.escape(section.title)}</h2>" if section.title else ""
        parts.append(f"<section id='section-{i}'>{heading}{note}{body}</section>")
        if section.title:
            contents.append(f"<li><a href='#section-{i}'>{html.escape(section.title)}</a></li>")
    toc = f"<nav><ol>{''.join(contents)}</ol></nav>" if len(contents) > 1 else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table class='header'>{rows}</table>{toc}"
        f"{''.join(parts)}<footer>Written by mitk {html.escape(_mitk_version())}.</footer>"
        "</body></html>\n"
    )


def dashboard(
    path: str | Path, *, title: str, header: Mapping[str, str], items: Sequence[Any]
) -> Path:
    """Write one self-contained HTML dashboard to ``path`` atomically; returns the path.

    ``header`` says what produced the results (model, prompts, settings) and is
    shown as a table at the top. ``items`` are ``Section``s, figures, tables
    (DataFrames), text, or result objects (``PatchResult``, ``Attribution``,
    ``LogitLens``, ``SAEEvaluation``, ... see ``figures_for``), in page order.
    """
    return write_atomically(path, dashboard_html(title, header, items).encode("utf-8"))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.2em 0.8em; text-align: left; border-bottom: 1px solid #ddd; }
table.header th { color: #555; font-weight: normal; }
nav ol { columns: 2; color: #555; }
section { margin-top: 2em; }
p.note { color: #555; }
footer { margin-top: 3em; color: #888; font-size: 0.9em; }
"""


def write_report(
    path: str | Path, title: str, header: Mapping[str, str], sections: Sequence[Section]
) -> Path:
    """``dashboard`` with positional arguments, kept for callers written before it existed."""
    return dashboard(path, title=title, header=header, items=sections)
