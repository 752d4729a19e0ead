"""Circuit discovery over the full edge graph: scoring (EAP, EAP-IG, exact, ACDC), extraction,
edge-patching evaluation, faithfulness (MIB CPR/CMD) and the ``circuit`` job kind."""

from interplab.analyses.circuits.graph import CircuitGraph, Dest, GraphError, Node, circuit_families

__all__ = ["CircuitGraph", "Dest", "GraphError", "Node", "circuit_families"]
