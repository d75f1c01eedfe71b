"""Cyclical self-training (paper Sec. 2.2): a stage scheduler shared by the keypoint-cloud
and the dense path, and the keypoint-cloud task that plugs into it."""
