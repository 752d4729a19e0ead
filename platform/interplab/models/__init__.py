"""Model loading and the per-architecture adapters."""
