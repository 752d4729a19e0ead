"""Command-line interface: ``interplab <command>``."""
