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

# Choices of model options, for checking a config's options without PyTorch; tests keep each
# equal to the list the model code uses (named in the comment).
LAYER_ACTIVATIONS = ("relu", "gelu", "tanh", "identity")  # smoe.nn.layers.ACTIVATIONS
ROUTING_ACTIVATIONS = ("identity", "sigmoid", "relu", "tanh")  # smoe.nn.routing.ACTIVATIONS
RC_SIGNALS = ("score", "output")  # smoe.nn.routing.RC_SIGNALS
EXPERT_INITS = ("reference", "pytorch", "identity")  # smoe.nn.layer.EXPERT_INITS
AUX_LOSSES = ("importance", "load", "spatial", "load_shazeer", "smoothness")  # smoe.nn.layer
BASELINE_INITS = ("reference", "pytorch")  # smoe.families.heat.baselines.INITS
COORDS = ("every", "first")  # smoe.families.heat.baselines.COORDS
