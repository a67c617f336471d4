"""Networks of the hierarchy, registered by name: attention nets ``a_l``, feature nets ``f``
and classifiers ``g``.

>>> from zoomnet.nets import build, available
>>> available("feature")
['lenet', 'resnet']
>>> build("feature", "lenet").out_dim
48
"""

from zoomnet.nets import attention, classifier, features  # noqa: F401  (registers the nets)
from zoomnet.nets.registry import available, build, register

__all__ = ["available", "build", "register"]
