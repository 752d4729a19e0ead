"""The execution engine: hooked models, sites, interventions, gradients."""
