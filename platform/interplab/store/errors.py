"""The one error type the store raises for bad input (the CLI turns it into exit code 2)."""

from __future__ import annotations


class StoreError(ValueError):
    """Bad input to the store: not a store, unknown run, refused or malformed SQL, missing parameter."""
