"""Data layer: datasets (ISIC2018 CSV, APTOS2019 CSV, official pkl lists, ImageFolder, generic CSV, synthetic),
stratified seeded splits (validation always carved from train), and the paper's transforms.

    from diffmic.data import build_splits
    splits = build_splits({"name": "synthetic"})      # DataSplits(train, val, test, class_names)
"""
from diffmic.data.build import build_splits
from diffmic.data.config import KNOWN as DATASET_NAMES
from diffmic.data.config import resolve_config
from diffmic.data.datasets import DataSplits, ImageListDataset, SyntheticDataset
from diffmic.data.errors import DataError
from diffmic.data.images import load_image
from diffmic.data.prepared import PreparedImages
from diffmic.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform

__all__ = [
    "build_splits", "DataSplits", "DataError", "eval_transform", "train_transform", "load_image", "IMAGENET_MEAN",
    "IMAGENET_STD", "DATASET_NAMES", "resolve_config", "ImageListDataset", "SyntheticDataset",
    "PreparedImages",
]
