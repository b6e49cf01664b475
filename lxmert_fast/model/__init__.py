"""The model: LXMERT itself (configuration, modeling, static shapes), its checkpoints (weights) and the checks
and counts made against it (checks, flops)."""
