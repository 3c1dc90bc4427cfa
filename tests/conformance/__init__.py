"""Conformance harness: every normlab layer against the float64 reference and torch.nn.

``cases.py`` is the registry (one :class:`~conformance.cases.LayerCase` per layer
configuration); ``test_conformance.py`` holds the generic checks that every case passes;
``test_edges.py`` pins, one test each, the points where normlab is meant to beat torch.
A new layer joins by adding a case to ``cases.CASES``.
"""
