"""The unit a dashboard is built from: a titled figure, table or paragraph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

import pandas as pd
import plotly.graph_objects as go

Content: TypeAlias = go.Figure | pd.DataFrame | str


@dataclass(frozen=True)
class Section:
    """One titled part of a dashboard: a figure, a table or a paragraph of text.

    ``title`` is the section's heading; a figure under a heading is drawn
    without its own title, so ``note`` is the place for anything else it said.
    """

    title: str
    content: Content
    note: str = ""
