"""Graph views and fx helpers shared by patterns and passes."""

from segquant_fx.graph.fx_utils import get_arg, normalize_dim, shape_of, static_int, target_name
from segquant_fx.graph.nx_view import DEFAULT_TRANSPARENCY, GraphView, Transparency

__all__ = [
    "DEFAULT_TRANSPARENCY",
    "GraphView",
    "Transparency",
    "get_arg",
    "normalize_dim",
    "shape_of",
    "static_int",
    "target_name",
]
