"""Analyses built on the engine: activation/attribution patching (more to come: circuits, grafting)."""
