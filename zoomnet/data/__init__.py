"""Data: in-memory examples and synthetic tiny-object generators."""

from zoomnet.data.examples import Example, batches_by_size
from zoomnet.data.synthetic import TinyObjects, make_tiny_objects

__all__ = ["Example", "TinyObjects", "batches_by_size", "make_tiny_objects"]
