"""Datasets: discovery of labelled images, checks, synthetic data and the training cache."""

from training.data.sources import IMAGE_EXTENSIONS, Sample, discover, load_samples

__all__ = ["IMAGE_EXTENSIONS", "Sample", "discover", "load_samples"]
