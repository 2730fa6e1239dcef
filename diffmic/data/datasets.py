"""Dataset objects: a list of image files, the lazy synthetic set, and the bundle of splits `build_splits` returns.

Every dataset yields (FloatTensor[3, S, S], int label), exposes `.labels` (int64 array, one per item) so callers can
count classes without touching images, and pickles cheaply (plain lists/arrays and a transform) for Ray workers and
DataLoader processes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from diffmic.data import synthetic
from diffmic.data.images import load_image


class ImageListDataset(Dataset):
    """Images read from `paths` by `reader` (PIL, RGB; `build_splits` gives a `PreparedImages`), with integer
    `labels`, passed through `transform`."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | np.ndarray, transform: Callable,
                 reader: Callable[[str], Image.Image] = load_image) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.transform, self.reader = transform, reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.reader(self.paths[i])), int(self.labels[i])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, classes={np.bincount(self.labels).tolist()})"


class SyntheticDataset(Dataset):
    """Items `indices` of synthetic split `split_id`, rendered on the fly (see `diffmic.data.synthetic`)."""

    def __init__(self, indices: Sequence[int] | np.ndarray, num_classes: int, image_size: int, seed: int,
                 split_id: int, transform: Callable) -> None:
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.num_classes, self.image_size, self.seed, self.split_id = num_classes, image_size, seed, split_id
        self.labels = synthetic.label_of(self.indices, num_classes).astype(np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        idx = int(self.indices[i])
        arr = synthetic.render(self.seed, self.split_id, idx, self.num_classes, self.image_size)
        return self.transform(Image.fromarray(arr)), int(self.labels[i])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={len(self)}, split_id={self.split_id}, seed={self.seed})"


@dataclass
class DataSplits:
    train: Dataset  # augmented transform
    val: Dataset  # eval transform, carved from train
    test: Dataset  # eval transform
    class_names: list[str]  # index order
    grouping: str = ""  # how the splits keep groups apart (diffmic/data/groups.py), for the run's log
    membership: list = field(default_factory=list)  # splits.csv rows: image, group, split, carve (file datasets)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> dict[str, list[int]]:
        """{'train': [n_0, ..., n_{C-1}], 'val': [...], 'test': [...]} from `.labels` (no image is read)."""
        return {name: np.bincount(getattr(self, name).labels, minlength=self.num_classes).tolist()
                for name in ("train", "val", "test")}
