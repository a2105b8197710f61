"""Training support: the trainer, data sets, sample writers and the digits evaluation metric."""

from .data import Dataset, load_dataset, save_image_grid, save_scatter_plot
from .metrics import DigitsEvaluator, frechet_distance, frechet_distance_between, gaussian_fit_samples
from .sampling_helpers import pushforward_sample
from .trainer import ProcessInfo, TrainConfig, Trainer

__all__ = [
    "Dataset",
    "DigitsEvaluator",
    "ProcessInfo",
    "TrainConfig",
    "Trainer",
    "frechet_distance",
    "frechet_distance_between",
    "gaussian_fit_samples",
    "load_dataset",
    "pushforward_sample",
    "save_image_grid",
    "save_scatter_plot",
]
