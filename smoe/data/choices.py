"""Names accepted for store options, kept apart so the CLI can list them without heavy imports."""

COMPRESSIONS = ("lz4", "zstd", "none")
SCHEDULERS = ("threads", "processes", "synchronous", "distributed")
