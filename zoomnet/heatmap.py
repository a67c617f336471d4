"""Pictures of where the model looked: kept so that ``zoomnet.heatmap.render_batch`` (the
name the Python API first had) still works; the code lives in :mod:`zoomnet.outputs`."""

from zoomnet.outputs import attention_density, colormap, render_batch, render_heatmap, write_attention_tiff

__all__ = ["attention_density", "colormap", "render_batch", "render_heatmap", "write_attention_tiff"]
