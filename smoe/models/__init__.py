"""Models: the SMoE layer, its gates and routing, baselines, and the registry by name."""
