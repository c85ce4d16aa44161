"""TTFT against quality: datasets, the runner over modes × ratios, metrics, reports and plots."""
