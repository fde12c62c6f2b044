"""Self-contained HTML dashboards: figures and tables in one file that renders with no network.

plotly.js is inlined once, before the first figure; every figure is a
``div.plotly-graph-div`` with a stable id (``figure-0``, ``figure-1``, ...) inside
``section#section-N``, and the same inputs always give the same bytes. A section's
heading stands in for its figure's own title, which is left off (with the empty
band above the plot that held it); figures are drawn without plotly's toolbar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import html
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
import re
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio

from mitk.atomic import atomic_write_bytes
from mitk.viz.defaults import figures_for
from mitk.viz.section import Content, Section

MAX_TABLE_ROWS = 200  # a dashboard is for reading; longer tables belong in parquet
TWO_COLUMN_CONTENTS = 8  # a contents list this long or longer is set in two columns
TOP_MARGIN = 30  # px above a figure without a title (plotly leaves 100 for one)
TOP_MARGIN_WITH_MENUS = 55  # ... with room for subplot titles, annotations and menus above it
TABLE_HEADING_COLUMNS = 4  # columns named in the heading of an untitled table

_TRACE_KINDS = {
    "bar": "bar chart",
    "heatmap": "heatmap",
    "scatter": "scatter plot",
    "histogram": "histogram",
    "box": "box plot",
    "violin": "violin plot",
    "pie": "pie chart",
}


def _plain(title: str) -> str:
    """A plotly title as plain text for a heading: line breaks as spaces, tags and entities gone."""
    return html.unescape(re.sub(r"<[^>]*>", "", re.sub(r"(?i)<br\s*/?>", " ", title))).strip()


def figure_heading(fig: go.Figure) -> str:
    """A heading for ``fig``: its title, else what it draws (``"Bar chart: score by head"``)."""
    if fig.layout.title.text:
        return _plain(fig.layout.title.text)
    kinds = list(
        dict.fromkeys(_TRACE_KINDS.get(trace.type, f"{trace.type} plot") for trace in fig.data)
    )
    heading = " and ".join(kinds) or "empty figure"
    x, y = fig.layout.xaxis.title.text, fig.layout.yaxis.title.text
    if x and y:
        heading += f": {_plain(y)} by {_plain(x)}"
    return heading[0].upper() + heading[1:]


def _table_heading(frame: pd.DataFrame) -> str:
    names = [str(c) for c in frame.columns[:TABLE_HEADING_COLUMNS]]
    more = ", …" if len(frame.columns) > TABLE_HEADING_COLUMNS else ""
    return f"Table: {', '.join(names)}{more}" if names else "Table"


def as_sections(item: Any) -> list[Section]:
    """A dashboard item as sections: as is, wrapped, or (a result object) its default figures.

    A bare figure is headed by its title, or (untitled) by what it draws; a bare
    table by its columns; text has no heading.
    """
    if isinstance(item, Section):
        return [item]
    if isinstance(item, go.Figure):
        return [Section(figure_heading(item), item)]
    if isinstance(item, pd.DataFrame):
        return [Section(_table_heading(item), item)]
    if isinstance(item, str):
        return [Section("", item)]
    return figures_for(item)


def _table(frame: pd.DataFrame) -> str:
    shown = frame.head(MAX_TABLE_ROWS)
    body = shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)
    if len(frame) > len(shown):
        body += f"<p class='note'>First {len(shown)} of {len(frame)} rows.</p>"
    return body


def _under_heading(fig: go.Figure) -> go.Figure:
    """A copy of ``fig`` without its title, for a section whose heading already names it.

    Menu buttons that would put a title back (the attention head selector's)
    keep everything else they change.
    """
    fig = go.Figure(fig)
    fig.update_layout(title_text="")
    for menu in fig.layout.updatemenus:
        for button in menu.buttons:
            args = list(button.args or ())
            if len(args) > 1 and isinstance(args[1], dict):
                args[1] = {k: v for k, v in args[1].items() if not k.startswith("title")}
                button.args = args
    return fig


def _figure(fig: go.Figure, headed: bool, figure_index: int) -> str:
    fig = _under_heading(fig) if headed else go.Figure(fig)
    if not fig.layout.title.text and fig.layout.margin.t is None:
        above = fig.layout.updatemenus or fig.layout.annotations
        fig.update_layout(margin_t=TOP_MARGIN_WITH_MENUS if above else TOP_MARGIN)
    return pio.to_html(
        fig,
        include_plotlyjs=figure_index == 0,  # inline once: the file needs no CDN
        full_html=False,
        div_id=f"figure-{figure_index}",  # stable ids: same input, same bytes
        config={"displaylogo": False, "responsive": True, "displayModeBar": False},
    )


def _render(content: Content, figure_index: int, headed: bool) -> str:
    if isinstance(content, go.Figure):
        return _figure(content, headed, figure_index)
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
        body = _render(section.content, n_figures, bool(section.title))
        n_figures += isinstance(section.content, go.Figure)
        note = f"<p class='note'>{html.escape(section.note)}</p>" if section.note else ""
        heading = f"<h2>{html.escape(section.title)}</h2>" if section.title else ""
        parts.append(f"<section id='section-{i}'>{heading}{note}{body}</section>")
        if section.title:
            contents.append(f"<li><a href='#section-{i}'>{html.escape(section.title)}</a></li>")
    wide = " class='columns'" if len(contents) >= TWO_COLUMN_CONTENTS else ""
    toc = f"<nav><ol{wide}>{''.join(contents)}</ol></nav>" if len(contents) > 1 else ""
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
    A section's heading replaces its figure's title: put what else the title
    said in the section's note.
    """
    return atomic_write_bytes(path, dashboard_html(title, header, items).encode("utf-8"))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.2em 0.8em; text-align: left; border-bottom: 1px solid #ddd; }
table.header th { color: #555; font-weight: normal; }
nav ol { color: #555; }
nav ol.columns { columns: 2; }
section { margin-top: 2em; }
p.note { color: #555; }
footer { margin-top: 3em; color: #888; font-size: 0.9em; }
"""
