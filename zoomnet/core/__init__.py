"""Pure tensor math of the Zoom-In network: geometry, sampling, the unbiased estimator, losses.

Nothing here holds state or touches files; every random function takes a ``torch.Generator``.
"""

from zoomnet.core.expectation import (
    exact_weights,
    with_replacement_weights,
    without_replacement_weights,
)
from zoomnet.core.geometry import AxisPool, Box, cell_boxes, grid_shape, pool_to_grid, pooling_matrix, pooling_plan
from zoomnet.core.sampling import (
    complement_log_probs,
    largest_remainder_counts,
    sample_with_replacement,
    sample_without_replacement,
    smoothed_log_softmax,
    top_k_children,
)

__all__ = [
    "AxisPool",
    "Box",
    "cell_boxes",
    "complement_log_probs",
    "exact_weights",
    "grid_shape",
    "largest_remainder_counts",
    "pool_to_grid",
    "pooling_matrix",
    "pooling_plan",
    "sample_with_replacement",
    "sample_without_replacement",
    "smoothed_log_softmax",
    "top_k_children",
    "with_replacement_weights",
    "without_replacement_weights",
]
