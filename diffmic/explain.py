"""Where the model looks: the paper's qualitative figures, from the model's own forward pass.

The DCG decides twice where to look: its class-activation map (CAM) gives the global prior, and the K most salient
CAM windows are cropped for the local prior. An `Explanation` keeps both exactly as that prediction used them (no
Grad-CAM, nothing recomputed), together with the spread of the S sampled diffusion chains:

    explanations = explain(model, images, mean, std, "ddim", 10, 0.0, 8, generator, temperature)
    Path("a.png").write_bytes(overlay_png(explanations[0], class_names))

Coordinates: `boxes` are (x0, y0, x1, y1) in pixels of `image` (the model input), half-open like PIL's crop boxes.
`heatmap_png` draws no boxes and returns the picture enlarged `display_scale(side)` times, so an SVG with
viewBox="0 0 W H" (W, H: `image`'s size) laid over it places the boxes as they are.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from diffmic.models import DiffMIC, Prediction

MIN_DISPLAY_SIDE = 192  # a 48 px input is too small to read on a screen: enlarged at least to this
HEAT_ALPHA = 0.45       # enough heat to see the map, enough image to see what it lies on
# A jet-like colour map as (position, RGB) anchors, interpolated with numpy (no matplotlib in the core)
_COLOUR_ANCHORS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_COLOURS = np.array([[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], float)
BOX_COLOURS = ((255, 255, 255), (0, 255, 0), (255, 0, 255), (255, 255, 0), (0, 255, 255), (255, 128, 0))


@dataclass
class Explanation:
    image: np.ndarray                      # H×W×3 uint8: the model input de-normalised, the pixels the DCG saw
    cam: np.ndarray                        # g×g float32 in [0, 1]: the predicted class's CAM, min-max normalised
    boxes: list[tuple[int, int, int, int]]  # K crops of the local stream, (x0, y0, x1, y1) in `image` pixels
    probs: list[float]                     # C, mean over the S chains (as Prediction.probs)
    sample_probs: list[list[float]]        # S×C, softmax(ŷ0 / τ) of each chain: the prediction's spread
    predicted: int
    label: int | None = None

    def to_json(self) -> dict:
        """Everything but the image, as plain JSON values."""
        return {"size": list(self.image.shape[:2]), "cam": self.cam.astype(float).round(4).tolist(),
                "boxes": [list(b) for b in self.boxes], "probs": self.probs, "sample_probs": self.sample_probs,
                "predicted": self.predicted, "label": self.label}


def _normalised(cam: torch.Tensor) -> np.ndarray:
    cam = cam.float()
    lo, span = cam.min(), cam.max() - cam.min()
    # a constant map says nothing about where the model looks: zeros, not a division by zero
    return ((cam - lo) / span if span > 0 else torch.zeros_like(cam)).cpu().numpy().astype(np.float32)


def explanations_from(model: DiffMIC, images: torch.Tensor, prediction: Prediction, mean: Sequence[float],
                      std: Sequence[float], temperature: float = 1.0,
                      labels: Sequence[int] | None = None) -> list[Explanation]:
    """One Explanation per image of a finished `model.predict(images, …)` call (whose guidance it reads)."""
    if prediction.guidance is None:
        raise ValueError("the prediction carries no DCG guidance (Prediction.guidance is None)")
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = ((images.detach().float().cpu() * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    probs = prediction.probs.float().cpu()
    # the same softmax(ŷ0 / τ) that Prediction.probs averages, kept per chain
    chains = torch.softmax(prediction.samples.float().cpu() / temperature, dim=2).transpose(0, 1)  # N×S×C
    predicted = probs.argmax(1).tolist()
    cams, rois, crop = prediction.guidance.cam, prediction.guidance.rois.cpu(), model.dcg.crop_size
    return [Explanation(image=pixels[i], cam=_normalised(cams[i, predicted[i]]),
                        boxes=[(int(c), int(r), int(c) + crop, int(r) + crop) for r, c in rois[i].tolist()],
                        probs=probs[i].tolist(), sample_probs=chains[i].tolist(), predicted=predicted[i],
                        label=None if labels is None else int(labels[i]))
            for i in range(len(images))]


def explain(model: DiffMIC, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
            sampler: str = "official", steps: int | None = None, eta: float = 0.0, num_samples: int = 1,
            generator: torch.Generator | None = None, temperature: float = 1.0,
            labels: Sequence[int] | None = None) -> list[Explanation]:
    """Predict `images` (normalised with mean/std, on the model's device; the model in eval mode) and explain each:
    one `model.predict` call, whose DCG pass supplies the CAMs and crops."""
    prediction = model.predict(images, sampler, steps, eta, num_samples, generator, temperature)
    return explanations_from(model, images, prediction, mean, std, temperature, labels)


def choose_examples(labels: Sequence[int], predicted: Sequence[int], per_class: int = 2,
                    wrong_per_class: int = 1) -> list[int]:
    """Indices of a few images per true class: up to `per_class` right and `wrong_per_class` wrong ones, in index
    order, class by class, right before wrong. When a class has too few of one kind, the other fills its share, so a
    class the model always gets wrong still shows per_class + wrong_per_class images."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    chosen: list[int] = []
    for c in np.unique(labels):
        right = np.flatnonzero((labels == c) & (predicted == c)).tolist()
        wrong = np.flatnonzero((labels == c) & (predicted != c)).tolist()
        n_wrong = min(len(wrong), max(wrong_per_class, per_class + wrong_per_class - len(right)))
        n_right = min(len(right), per_class + wrong_per_class - n_wrong)
        chosen += right[:n_right] + wrong[:n_wrong]
    return chosen


def explain_split(model: DiffMIC, dataset, mean: Sequence[float], std: Sequence[float], sampler: str = "official",
                  steps: int | None = None, eta: float = 0.0, num_samples: int = 1, temperature: float = 1.0,
                  device: str | torch.device = "cpu", candidates_per_class: int = 8, per_class: int = 2,
                  wrong_per_class: int = 1, seed: int = 0, batch_size: int = 32) -> list[Explanation]:
    """Explanations of a few images per class of `dataset` (items (tensor, label), `.labels`): up to
    `candidates_per_class` images of each class, drawn with `seed`, are predicted, then `choose_examples` keeps
    right and wrong ones. Deterministic for a seed. Puts the model in eval mode."""
    model.eval()
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset.labels)
    candidates = sorted(int(i) for c in np.unique(labels)
                        for i in rng.permutation(np.flatnonzero(labels == c))[:candidates_per_class])
    generator = torch.Generator(device=device).manual_seed(seed)
    found: list[Explanation] = []
    for start in range(0, len(candidates), batch_size):
        items = [dataset[i] for i in candidates[start:start + batch_size]]
        images = torch.stack([x for x, _ in items]).to(device)
        found += explain(model, images, mean, std, sampler, steps, eta, num_samples, generator, temperature,
                         [y for _, y in items])
    keep = choose_examples([e.label for e in found], [e.predicted for e in found], per_class, wrong_per_class)
    return [found[i] for i in keep]


def display_scale(side: int, minimum: int = MIN_DISPLAY_SIDE) -> int:
    """The integer factor that enlarges an image of this side to at least `minimum` pixels (1 when it already is)."""
    return max(1, -(-minimum // side))


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → RGB float array (…×3), through the jet-like colour map."""
    v = np.clip(values, 0, 1)
    return np.stack([np.interp(v, _COLOUR_ANCHORS, _COLOURS[:, k]) for k in range(3)], -1)


def heatmap_image(e: Explanation, scale: int | None = None) -> Image.Image:
    """The image enlarged `scale` times (default `display_scale`; nearest, so its pixels stay honest) with the CAM
    blended over it (bilinear, so the coarse g×g grid reads as a smooth map). No boxes."""
    h, w = e.image.shape[:2]
    scale = scale or display_scale(max(h, w))
    size = (w * scale, h * scale)
    base = np.asarray(Image.fromarray(e.image).resize(size, Image.NEAREST), dtype=float)
    # the g×g cells cover the image as cells_to_pixels maps them (cell i ↔ pixels i/g·H …), as a resize does
    heat = np.asarray(Image.fromarray(e.cam.astype(np.float32)).resize(size, Image.BILINEAR))
    blended = (1 - HEAT_ALPHA) * base + HEAT_ALPHA * heat_colours(heat)
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def _png(image: Image.Image, path: str | Path | None = None) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def heatmap_png(e: Explanation, scale: int | None = None) -> bytes:
    """`heatmap_image` as PNG bytes: `scale` (default `display_scale(max(H, W))`) times the size of `e.image`.
    `e.boxes` stay in `e.image` pixels: multiply them by the scale, or draw them in an SVG with viewBox="0 0 W H"."""
    return _png(heatmap_image(e, scale))


def overlay_png(e: Explanation, class_names: Sequence[str], path: str | Path | None = None) -> bytes:
    """One figure per image: the heat map with the K crops outlined (numbered in the DCG's order of saliency), then
    "predicted NAME p=… ± … over S samples" (and the true class when known), then each class's mean probability as
    a bar with each chain's probability as a tick. Returns the PNG bytes; also writes them to `path` if given."""
    picture = heatmap_image(e)
    scale = picture.width // e.image.shape[1]
    font, line = ImageFont.load_default(size=12), 16
    names = [str(n) for n in class_names]
    chains = np.asarray(e.sample_probs)
    # ± is the std over chains of the predicted class's probability, as Prediction.sample_std
    spread = (f" ± {chains[:, e.predicted].std(ddof=1):.2f} over {len(chains)} samples" if len(chains) > 1
              else " (1 sample)")
    text = [f"predicted {names[e.predicted]}  p={e.probs[e.predicted]:.2f}{spread}"]
    if e.label is not None:
        text.append(f"true {names[e.label]} ({'right' if e.label == e.predicted else 'wrong'})")
    width = max(picture.width, 320, 8 + max(int(font.getlength(t)) for t in text))
    figure = Image.new("RGB", (width, picture.height + 10 + line * (len(text) + len(names))), "white")
    left = (width - picture.width) // 2
    figure.paste(picture, (left, 0))
    draw = ImageDraw.Draw(figure)
    for k, (x0, y0, x1, y1) in enumerate(e.boxes):
        colour = BOX_COLOURS[k % len(BOX_COLOURS)]
        draw.rectangle([left + x0 * scale, y0 * scale, left + x1 * scale - 1, y1 * scale - 1], outline=colour, width=2)
        draw.text((left + x0 * scale + 3, y0 * scale + 1), str(k + 1), fill=colour, font=font)
    y = picture.height + 4
    for t in text:
        draw.text((4, y), t, fill="black", font=font)
        y += line
    label_w = min(120, 8 + max(int(font.getlength(n)) for n in names))
    bar_x0, bar_x1 = label_w, width - 40
    span = bar_x1 - bar_x0
    for c, name in enumerate(names):
        while len(name) > 1 and font.getlength(name) > label_w - 8:  # a long class name is cut to its column
            name = name[:-1]
        draw.text((4, y + 1), name, fill="black", font=font)
        draw.rectangle([bar_x0, y + 3, bar_x1, y + line - 3], outline=(190, 190, 190))
        fill = (200, 60, 40) if c == e.predicted else (90, 110, 170)
        draw.rectangle([bar_x0, y + 3, bar_x0 + round(span * e.probs[c]), y + line - 3], fill=fill)
        for q in chains[:, c]:  # one tick per chain: how far the S samples disagree
            x = bar_x0 + round(span * float(q))
            draw.line([x, y + 1, x, y + line - 1], fill="black", width=1)
        draw.text((bar_x1 + 4, y + 1), f"{e.probs[c]:.2f}", fill="black", font=font)
        y += line
    return _png(figure, path)
