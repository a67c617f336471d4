"""Image sources: the only way pixels reach the model (docs/design.md, "The hierarchy").

A source knows the image size and reads a box of it, optionally resized; the model never
opens files. :class:`ArraySource` holds an image in memory.
"""

from zoomnet.sources.array import ArraySource
from zoomnet.sources.base import CountingSource, ImageSource
from zoomnet.sources.open import open_image
from zoomnet.sources.pillow import PillowSource

__all__ = ["ArraySource", "CountingSource", "ImageSource", "PillowSource", "open_image"]
