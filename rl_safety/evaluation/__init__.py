"""Evaluation of text-to-image models on benchmark prompt sets: the metric contract (`metrics.py`) and the metrics."""
