"""Reports: aggregated tables, figures and prediction exports."""
