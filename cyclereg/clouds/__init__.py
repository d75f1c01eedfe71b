"""Keypoint-cloud registration path (paper Sec. 2.3.2): graph CNN features on point
coordinates, sparse loopy belief propagation over a kNN graph, thin-plate-spline
densification. Clouds are ``(N, 3)`` tensors; see :mod:`cyclereg` for conventions."""
