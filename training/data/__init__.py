"""Datasets: discovery of labelled images, checks, synthetic data and the training cache."""

from training.data.sources import Sample, discover, load_samples

__all__ = ["Sample", "discover", "load_samples"]
