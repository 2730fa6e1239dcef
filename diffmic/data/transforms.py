"""Image transforms of the paper (section 5 of the method notes), on PIL images, pure Python/torch paths only.

Train: centre square crop (min(H, W)) -> resize (bilinear) -> H-flip p=0.5 -> V-flip p=0.5 -> rotation U(-r, r)
(bilinear, black corners, no expand) -> tensor -> normalise.  Eval: centre square crop -> resize -> tensor ->
normalise.  Every flip/rotation step is a knob (`augment`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import diffmic  # noqa: F401  (makes torchvision importable beside a CPU-only torch)
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CenterSquareCrop:
    """Crop the largest centred square (side min(H, W)), as the official `trans.CropCenterSquare`."""

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        s = min(w, h)
        if w == h:
            return img
        left, top = (w - s) // 2, (h - s) // 2
        return img.crop((left, top, left + s, top + s))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Pipeline(T.Compose):
    """torchvision Compose whose class lives here, so unpickling a transform (spawned DataLoader workers, Ray
    workers) imports `diffmic` (and its torchvision fix) before any torchvision class."""


def _head(image_size: int) -> list:
    return [CenterSquareCrop(), T.Resize((image_size, image_size), interpolation=InterpolationMode.BILINEAR)]


def _tail(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]


def eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Callable:
    """PIL image -> normalised FloatTensor[3, image_size, image_size] (deterministic)."""
    return Pipeline(_head(image_size) + _tail(mean, std))


def train_transform(image_size: int, hflip: bool = True, vflip: bool = False, rotation: float = 30.0,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Callable:
    """The augmented training transform; the random draws use torch's RNG (seeded per DataLoader worker)."""
    steps = _head(image_size)
    if hflip:
        steps.append(T.RandomHorizontalFlip(0.5))
    if vflip:
        steps.append(T.RandomVerticalFlip(0.5))
    if rotation:
        steps.append(T.RandomRotation(float(rotation), interpolation=InterpolationMode.BILINEAR, expand=False, fill=0))
    return Pipeline(steps + _tail(mean, std))
