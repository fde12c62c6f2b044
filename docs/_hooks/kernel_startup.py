"""Run by the docs' notebook kernel before the first cell (see notebooks.py).

Plotly figures become a div and a ``Plotly.newPlot`` call, calling the plotly.js the
site loads once, with neither plotly.js nor MathJax inlined or fetched; the kernel
works in a scratch directory, so whatever a notebook writes stays out of the repository.
"""

import os
import tempfile
from typing import Any
import warnings

import plotly.io as pio
from plotly.io._base_renderers import MimetypeRenderer


class SiteRenderer(MimetypeRenderer):
    """HTML that draws with the page's ``Plotly``; nothing fetched from a CDN."""

    def to_mimebundle(self, fig_dict: Any) -> dict[str, str]:
        html = pio.to_html(
            fig_dict,
            include_plotlyjs=False,
            include_mathjax=False,
            full_html=False,
            default_width="100%",
            validate=False,
        )
        return {"text/html": html}


# tqdm.auto asks for ipywidgets, which a static page cannot use: plain bars are what we want
warnings.filterwarnings("ignore", message="IProgress not found")
pio.renderers["mitk_docs"] = SiteRenderer()
pio.renderers.default = "mitk_docs"
os.chdir(tempfile.mkdtemp(prefix="mitk-docs-notebook-"))
