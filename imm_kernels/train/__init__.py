"""Training support: data sets, sample writers and the digits evaluation metric."""

from .data import Dataset, load_dataset, save_image_grid, save_scatter_plot
from .metrics import DigitsEvaluator, frechet_distance, frechet_distance_between, gaussian_fit_samples

__all__ = [
    "Dataset",
    "DigitsEvaluator",
    "frechet_distance",
    "frechet_distance_between",
    "gaussian_fit_samples",
    "load_dataset",
    "save_image_grid",
    "save_scatter_plot",
]
