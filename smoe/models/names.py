"""Names of model kinds and gates, importable without PyTorch.

The Snakefile checks a config's model kinds and gates at parse time; importing torch there
would slow every `snakemake` call. Tests keep these lists equal to the real registries.
"""

MODEL_KINDS = (
    "condconv",
    "cnn",
    "convlcn",
    "coordconv",
    "generator",
    "lcn",
    "mlp",
    "persistence",
    "smoe",
    "stencil",
)
ANALYTIC_KINDS = ("persistence", "stencil", "generator")
"""Kinds that learn nothing: their rows are references, not results of training."""
GATE_NAMES = (
    "latent",
    "conv",
    "conv1",
    "coordconv",
    "coordconv-multi",
    "linear",
    "lcn",
    "lcn1",
    "fixed",
)
