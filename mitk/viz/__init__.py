"""Pictures of results: pure builders from result objects to plotly figures and HTML reports."""

from mitk.viz.figures import composition_heatmap, dla_bar, head_scores_heatmap, patching_heatmap
from mitk.viz.report import Section, html_report, write_report

__all__ = [
    "Section",
    "composition_heatmap",
    "dla_bar",
    "head_scores_heatmap",
    "html_report",
    "patching_heatmap",
    "write_report",
]
