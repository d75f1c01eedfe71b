"""Dense image-volume registration (issue 3): feature CNN ``g`` + coupled convex optimiser
``h`` + refinement (inverse consistency, second warp, Adam instance optimisation).

Entry points: :func:`cyclereg.dense.pipeline.predict_displacement` (differentiable,
training stream), :func:`cyclereg.dense.pipeline.register` (full refinement, no
gradients; pseudo labels and test time), and the file-level functions of
:mod:`cyclereg.dense.api` used by the CLI.
"""

from cyclereg.dense.config import (AdamConfig, ConvexConfig, DensePipelineConfig, FeatureNetConfig,
                                   PreprocessConfig)

__all__ = ["AdamConfig", "ConvexConfig", "DensePipelineConfig", "FeatureNetConfig", "PreprocessConfig"]
