"""Image transforms of the paper (section 5 of the method notes), on PIL images, pure Python/torch paths only.

Train: centre square crop (min(H, W)) -> resize (bilinear) -> H-flip p=0.5 -> V-flip p=0.5 -> rotation U(-r, r)
(bilinear, black corners, no expand) -> tensor -> normalise.  Eval: centre square crop -> resize -> tensor ->
normalise.  Every flip/rotation step is a knob (`augment`).  The deterministic head (crop, resize) leaves an image
it has already made as it is, so it may run ahead of time, once per image (`prepare_transform`, diffmic.data.prepared).
On a GPU the random tail may run per batch on the device instead (`device_transform` + `BatchAugment`,
`train.augment_on`): the loader's CPUs then only read images.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Each step does exactly what torchvision's transform of the same name does to a PIL RGB image, with the same torch
# RNG draws (tests/test_data.py compares them), written here so that the data path needs no torchvision.


class CenterSquareCrop:
    """Crop the largest centred square (side min(H, W)), as the official `trans.CropCenterSquare`."""

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        s = min(w, h)
        if w == h:
            return img
        left, top = (w - s) // 2, (h - s) // 2
        return img.crop((left, top, left + s, top + s))


class Resize:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.resize((self.size, self.size), Image.BILINEAR)


class RandomHorizontalFlip:
    method = Image.FLIP_LEFT_RIGHT

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(self.method) if torch.rand(1) < self.p else img


class RandomVerticalFlip(RandomHorizontalFlip):
    method = Image.FLIP_TOP_BOTTOM


class RandomRotation:
    """U(-degrees, degrees), bilinear, black corners, same canvas."""

    def __init__(self, degrees: float) -> None:
        self.degrees = float(degrees)

    def __call__(self, img: Image.Image) -> Image.Image:
        angle = float(torch.empty(1).uniform_(-self.degrees, self.degrees).item())
        return img.rotate(angle, Image.BILINEAR, expand=False, fillcolor=(0,) * len(img.getbands()))


class ToNormalizedTensor:
    """uint8 HWC -> float CHW in [0, 1] -> (x - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
        return x.sub_(self.mean).div_(self.std)


class ToUint8Tensor:
    """uint8 HWC -> uint8 CHW: what a loader hands a device that augments and normalises (BatchAugment)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()


class BatchAugment:
    """The random tail of `train_transform` on a batch, on the device it trains on: H/V-flips with p = 0.5, a rotation
    U(-r, r) (bilinear, black corners, same canvas), then normalisation; uint8 [N, 3, S, S] in, float out. The same
    distribution as the PIL steps; the pixels differ from PIL's rotation by interpolation rounding (grid_sample).
    On a GPU it costs next to nothing and leaves the loader's CPUs only the reading (bench/bench_data.py)."""

    def __init__(self, hflip: bool, vflip: bool, rotation: float, mean: Sequence[float], std: Sequence[float]):
        self.hflip, self.vflip, self.rotation = hflip, vflip, float(rotation)
        self.mean, self.std = tuple(mean), tuple(std)
        self._norm: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n, device = x.shape[0], x.device
        x = x.float().div_(255)
        for flip, dim in ((self.hflip, 3), (self.vflip, 2)):
            if flip:
                chosen = torch.rand(n, generator=generator, device=device) < 0.5
                x = torch.where(chosen.view(-1, 1, 1, 1), x.flip(dim), x)
        if self.rotation:
            angle = (torch.rand(n, generator=generator, device=device) * 2 - 1) * math.radians(self.rotation)
            cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # black corners
        if self._norm is None or self._norm[0].device != device:  # once, not a host-to-device copy per step
            self._norm = tuple(torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (self.mean, self.std))
        mean, std = self._norm
        return (x - mean) / std


class Pipeline:
    def __init__(self, transforms: list[Callable]) -> None:
        self.transforms = transforms

    def __call__(self, img):
        for step in self.transforms:
            img = step(img)
        return img


def _head(image_size: int) -> list:
    return [CenterSquareCrop(), Resize(image_size)]


def _tail(mean: Sequence[float], std: Sequence[float]) -> list:
    return [ToNormalizedTensor(mean, std)]


def prepare_transform(image_size: int) -> Callable:
    """PIL image -> the square `image_size` RGB image both transforms below start from (their crop and resize then
    change nothing: a square image is not cropped, and PIL's resize to the current size is a copy)."""
    return Pipeline(_head(image_size))


def eval_transform(image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Callable:
    """PIL image -> normalised FloatTensor[3, image_size, image_size] (deterministic)."""
    return Pipeline(_head(image_size) + _tail(mean, std))


def train_transform(image_size: int, hflip: bool = True, vflip: bool = False, rotation: float = 30.0,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Callable:
    """The augmented training transform; the random draws use torch's RNG (seeded per DataLoader worker)."""
    steps = _head(image_size)
    if hflip:
        steps.append(RandomHorizontalFlip())
    if vflip:
        steps.append(RandomVerticalFlip())
    if rotation:
        steps.append(RandomRotation(rotation))
    return Pipeline(steps + _tail(mean, std))


def device_transform(image_size: int) -> Callable:
    """PIL image -> uint8 [3, image_size, image_size]: the deterministic head only; BatchAugment does the rest."""
    return Pipeline(_head(image_size) + [ToUint8Tensor()])
