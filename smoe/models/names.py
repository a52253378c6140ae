"""Names of model kinds and gates, importable without PyTorch.

The Snakefile checks a config's model kinds and gates at parse time; importing torch there
would slow every `snakemake` call. Tests keep these lists equal to the real registries.
"""

MODEL_KINDS = ("condconv", "cnn", "convlcn", "coordconv", "lcn", "mlp", "persistence", "smoe")
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
