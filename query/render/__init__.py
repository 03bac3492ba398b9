"""Flame-graph output formats: `renderer_for(path).render(tree, options, out)`."""

from fleetprof.query.render.base import RenderOptions, renderer_for

__all__ = ["RenderOptions", "renderer_for"]
