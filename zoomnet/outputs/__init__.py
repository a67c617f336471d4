"""What a prediction leaves for people and viewers: heatmap pictures, GeoJSON for QuPath,
and the attention as a pyramidal TIFF."""

from zoomnet.outputs.attention_tiff import write_attention_tiff
from zoomnet.outputs.geojson import geojson_of
from zoomnet.outputs.heatmap import attention_density, colormap, render_batch, render_heatmap

__all__ = ["attention_density", "colormap", "geojson_of", "render_batch", "render_heatmap", "write_attention_tiff"]
