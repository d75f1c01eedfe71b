"""Contracts of the session's mends, from a mutation audit (2026-12-07).

Audited: the library lines changed on 2026-12-07 (``git diff 9e648ed`` of ``cyclereg`` and ``cyclereg_cli``):
the min-sum graph checks (:func:`cyclereg.clouds.native.require_graph`), the Learn2Reg readers' new helpers
(:func:`cyclereg.dense.data.label_guess`, :func:`~cyclereg.dense.data.dataset_modality`,
:func:`~cyclereg.dense.data.training_pairs`), the seed ranges (:mod:`cyclereg.errors`), the hd95 voxel metric,
difficulty weights of NaN / inf disagreements, the foreign ``config.json`` rule of ``stale_outputs``, the
temporary names of atomic writes, ``.txt`` point files and NIfTI spatial units of ``.hdr/.img`` pairs. Hand-made
mutants of those lines that the session's own tests let through are killed here; every expected value is
derived by hand (a known count, a known path, a known distance, an exact message fragment). Real bugs found are
pinned as strict xfails (``BUG: ...``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cyclereg.clouds import lbp
from cyclereg.clouds import native as cloud_native
from cyclereg.errors import InputError


# ----------------------------------------------------------------------------- min-sum graph checks
def _graph(n=6, k=4):
    g = torch.Generator().manual_seed(3)
    unary = torch.rand(n, k, generator=g)
    cand = torch.randn(n, k, 3, generator=g) * 0.1
    # a chain 0-1-2-...: edges i->i+1 and back, reverse pairs them
    a = torch.arange(n - 1)
    edge_index = torch.stack([torch.cat([a, a + 1]), torch.cat([a + 1, a])])
    e = edge_index.shape[1]
    reverse = torch.cat([torch.arange(n - 1, e), torch.arange(0, n - 1)])
    return unary, cand, edge_index, reverse


def test_require_graph_accepts_a_chain_whose_reverse_pairs_its_edges():
    unary, cand, edge_index, reverse = _graph()
    e = edge_index.shape[1]
    assert torch.equal(edge_index[:, reverse], edge_index.flip(0))  # the helper's graph is what it says
    cloud_native.require_graph(unary, cand, edge_index, reverse)
    assert e == 10


@pytest.mark.parametrize("fused", [True, False])
def test_a_reverse_index_of_minus_one_is_refused_naming_reverse(fused):
    """-1 would index the last edge in torch and before the buffer in C: refused with the range [0, E)."""
    unary, cand, edge_index, reverse = _graph()
    reverse = reverse.clone()
    reverse[2] = -1
    with pytest.raises(ValueError, match=r"^reverse: edge indices must lie in \[0, 10\), got \[-1, "):
        lbp.min_sum(unary, cand, edge_index, reverse, 3.0, 2, fused=fused)


def test_a_float_reverse_is_refused_naming_reverse():
    unary, cand, edge_index, reverse = _graph()
    with pytest.raises(ValueError, match=r"^reverse: expected \(10,\) integers"):
        cloud_native.require_graph(unary, cand, edge_index, reverse.float())


@pytest.mark.parametrize("fused", [True, False])
def test_min_sum_of_a_graph_without_edges_is_its_unary_costs(fused):
    """No edge, no message: each node's belief is its unary cost (an empty graph is no error)."""
    unary, cand, _, _ = _graph()
    edge_index, reverse = torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    cloud_native.require_graph(unary, cand, edge_index, reverse)
    belief = lbp.min_sum(unary, cand, edge_index, reverse, 3.0, 2, fused=fused)
    torch.testing.assert_close(belief, unary)
