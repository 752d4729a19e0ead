"""Circuit discovery over the full edge graph: scoring (EAP, EAP-IG, exact, ACDC), extraction,
edge-patching evaluation, faithfulness (MIB CPR/CMD) and the ``circuit`` job kind."""
