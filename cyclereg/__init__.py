"""cyclereg: unsupervised 3D registration by optimisation-guided cyclical self-training.

Implements Bigalke et al., "Unsupervised 3D registration through optimization-guided
cyclical self-training" (MICCAI 2023): a feature network ``g`` followed by a
non-learnable, differentiable optimiser ``h``; pseudo labels start from random features
and are refreshed after every training stage.

Conventions (fixed for the whole package; convert only through :mod:`cyclereg.frames`)
--------------------------------------------------------------------------------------
Point clouds
    Flat tensors of shape ``(N, 3)`` (one cloud per call; the conversions of
    :mod:`cyclereg.frames` take any ``(..., 3)``), columns ``x, y, z`` in
    **millimetres** in the world frame of the data set (the frame of the CSV files).
    Integer coordinates (voxel indices) are computed in torch's default float dtype, never in integers.
    Graphs over points are PyTorch-Geometric style ``edge_index`` tensors of shape
    ``(2, E)`` with row 0 = source (neighbour ``j``) and row 1 = target (centre ``i``).
Volumes
    Tensors of shape ``(B, C, D, H, W)`` whose three spatial axes are the NIfTI array
    axes ``(i, j, k)`` exactly as nibabel loads them (never transposed). The NIfTI affine
    maps voxel indices ``(i, j, k, 1)`` to world millimetres.
Displacements
    Always **fixed to moving**: a displacement ``u`` at a fixed-frame point ``p`` maps it
    to ``p + u`` in the moving frame; warping the moving image samples it at ``p + u``.
    Point-cloud displacements are ``(N, 3)`` in mm (x, y, z). Dense displacement fields
    are ``(B, 3, D, H, W)`` in **voxels of the fixed grid**, channel ``c`` along array
    axis ``c`` (i, j, k).
Coordinate frames (see :mod:`cyclereg.frames`)
    ``world`` (mm), ``voxel`` (array indices, float), ``grid`` (the ``[-1, 1]``
    coordinates of :func:`torch.nn.functional.grid_sample`, last dim ordered ``(k, j, i)``
    i.e. ``(x, y, z)`` of torch, always ``align_corners=True``: -1 and +1 are the centres
    of the first and last voxel), and ``unit`` for point clouds (mm shifted and scaled
    per axis so that the registration domain spans ``[-1, 1]``; the optimiser's
    hyper-parameters are stated in this frame, as in the authors' code). A trained cloud
    model stores the box it was trained in (``CloudRegConfig.training_box``) and registers
    new pairs in it (:func:`cyclereg.clouds.pipeline.registration_box`).
Devices and dtypes
    Follow the inputs. Nothing is moved to CUDA implicitly; user entry points take
    ``device="auto"|"cpu"|"cuda"`` (:func:`cyclereg.device.resolve_device`).
"""

__version__ = "0.1.0"

from cyclereg.errors import InputError  # noqa: E402

__all__ = ["InputError", "__version__"]
