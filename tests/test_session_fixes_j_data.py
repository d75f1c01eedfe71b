"""Contracts of small mends of point-file writing, volume preprocessing, volume datasets and two scripts (2026-12-07).

Mended: :func:`cyclereg.pointio.write_points` of an empty ``(0, 3)`` cloud wrote a file (a CSV header alone, an
empty l2r file, an ``.npy`` of shape ``(0, 3)``) that :func:`~cyclereg.pointio.read_points` then refused as empty
(every reader refuses an empty cloud, as the module says); it is now refused up front with one line naming the
file, and nothing is written, in every format.

Each test checks exact analytic figures or the exact message fragment naming the file or the argument.
"""

from __future__ import annotations

import pytest
import torch

from cyclereg.errors import InputError
from cyclereg.pointio import read_points, write_points


# ----------------------------------------------------------------------------- write_points of an empty cloud
@pytest.mark.parametrize("name, fmt", [("e.csv", None), ("e.txt", None), ("e.npy", None), ("e.ply", None),
                                       ("e.pcd", None), ("e.csv", "l2r")])
def test_write_points_refuses_an_empty_cloud_naming_the_file_and_writes_nothing(tmp_path, name, fmt):
    out = tmp_path / name
    with pytest.raises(InputError, match="point cloud is empty: nothing to write") as err:
        write_points(out, torch.zeros(0, 3), fmt=fmt, spacing_mm=(1.0, 1.0, 1.0))
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_write_points_of_one_point_still_reads_back(tmp_path):
    out = tmp_path / "one.csv"
    write_points(out, torch.tensor([[1.5, -2.0, 3.25]]))
    assert torch.equal(read_points(out), torch.tensor([[1.5, -2.0, 3.25]]))
