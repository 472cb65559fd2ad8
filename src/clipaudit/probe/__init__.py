"""Probe scenes and the probe models trained on them: a demo whose findings can be checked against truth.

- :mod:`clipaudit.probe.scenes`: the scene generator (every attribute of every image known).
- :mod:`clipaudit.probe.truth`: measures findings (blind pairs, DAF cases) against that truth.
- :mod:`clipaudit.probe.train`: trains the probe CLIP (blind to one attribute by its captions) and its reference.
"""
