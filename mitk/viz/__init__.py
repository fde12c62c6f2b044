"""Pictures of results: pure builders from result objects to plotly figures and HTML dashboards.

Nothing here runs a model: callers compute results (``mitk.analysis``,
``mitk.sae``) and pass them in. Every figure function returns a
``plotly.graph_objects.Figure``; ``dashboard`` writes figures, tables and
result objects into one self-contained HTML file; ``save_image`` exports a
figure to PNG/SVG/PDF where Kaleido and a Chrome are installed; ``graph_viewer`` writes
an attribution graph as a self-contained, clickable HTML page.
"""

from mitk.viz.attention import attention_heatmap, cached_attention_heatmap
from mitk.viz.attribution_graph import graph_viewer, graph_viewer_html
from mitk.viz.circuit_graph import circuit_graph
from mitk.viz.circuits import composition_heatmap, eigenvalue_scatter, head_scores_heatmap
from mitk.viz.dashboard import as_sections, dashboard, dashboard_html
from mitk.viz.defaults import UnsupportedResultError, figures_for
from mitk.viz.dla import dla_bar, dla_head_heatmap, logit_lens_heatmap
from mitk.viz.export import ImageExportError, save_image
from mitk.viz.feature_card import feature_card
from mitk.viz.patching import patching_curve, patching_facets, patching_heatmap
from mitk.viz.probes import probe_curve, probe_sections
from mitk.viz.sae import (
    density_histogram,
    l0_fvu_tradeoff,
    tradeoff_point,
    training_curves,
)
from mitk.viz.section import Section

__all__ = [
    "ImageExportError",
    "Section",
    "UnsupportedResultError",
    "as_sections",
    "attention_heatmap",
    "cached_attention_heatmap",
    "circuit_graph",
    "composition_heatmap",
    "dashboard",
    "dashboard_html",
    "density_histogram",
    "dla_bar",
    "dla_head_heatmap",
    "eigenvalue_scatter",
    "feature_card",
    "figures_for",
    "graph_viewer",
    "graph_viewer_html",
    "head_scores_heatmap",
    "l0_fvu_tradeoff",
    "logit_lens_heatmap",
    "patching_curve",
    "patching_facets",
    "patching_heatmap",
    "probe_curve",
    "probe_sections",
    "save_image",
    "tradeoff_point",
    "training_curves",
]
