"""Training, evaluation and the metrics both use."""
