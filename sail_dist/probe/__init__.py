"""Forward-only probes of a model on calibration data."""
