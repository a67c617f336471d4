"""Data: examples and their batches, manifests, reading ahead, and the synthetic sets of
``zoomnet make-data`` (:mod:`zoomnet.data.generators`)."""

from zoomnet.data.examples import Example, batches_by_size
from zoomnet.data.generators.tiny_objects import TinyObjects, make_tiny_objects

__all__ = ["Example", "TinyObjects", "batches_by_size", "make_tiny_objects"]
