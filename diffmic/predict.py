"""`python -m diffmic.predict MODEL_URI IMAGE_OR_DIR... [--output predictions.csv] [--samples S] [--sampler …]`

Classifies images with an exported bundle (a local directory, a run directory holding `model/`, or `s3://…`).
Prints one line per image: path, predicted class, its probability, the predictive entropy over S sampled chains (and,
for S > 1, their spread), and every class probability. `--output FILE` writes the same as CSV; `--explain DIR` writes
one figure per image into DIR (diffmic.explain: the DCG's class-activation map and crops, the spread of the chains).
Progress goes to stderr. An unreadable image is named on stderr and skipped; the exit code is then 1 (0: all
predicted; 2: bad arguments or bundle).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import diffmic
from diffmic.bundle import MANIFEST, META, Bundle, BundleError, load_bundle, verify_bundle
from diffmic.cli import Progress, one_line_errors
from diffmic.data import DataError, eval_transform, load_image
from diffmic.choices import SAMPLERS
from diffmic.explain import explanations_from, overlay_png
from diffmic.models import Prediction
from diffmic.remote import fetch, is_remote

PROGRAM = "diffmic.predict"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FIXED_COLUMNS = ("path", "predicted", "confidence", "entropy", "sample_std")


@dataclass
class Failure:
    path: str
    error: str


def bundle_directory(uri: str) -> Path:
    """A local directory for MODEL_URI; a remote bundle (s3://…) is mirrored into $DIFFMIC_CACHE/bundles."""
    path = fetch(uri, "bundles") if is_remote(uri) else Path(uri).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model {uri!r}: no such bundle directory")
    return path / "model" if (path / "model" / MANIFEST).is_file() else path  # a run directory holds its bundle


def open_bundle(uri: str, device: str = "cpu") -> Bundle:
    """Verify the manifest (every file's SHA-256) and the diffmic major version, then load the model."""
    directory = bundle_directory(uri)
    verify_bundle(directory)
    meta = json.loads((directory / META).read_text())
    theirs, ours = str((meta.get("versions") or {}).get("diffmic", "unknown")), diffmic.__version__
    if theirs.split(".")[0] != ours.split(".")[0]:
        raise BundleError(f"bundle {str(directory)!r} was written by diffmic {theirs}, which is incompatible with "
                          f"this diffmic {ours} (major version differs); re-export it with this version")
    return load_bundle(directory, device)


def find_images(args: Sequence[str]) -> list[str]:
    """Files as given; directories walked (recursively, sorted) for image files."""
    found: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            for root, dirs, files in os.walk(arg):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            found.append(arg)  # a missing or unreadable file is reported when it is read
    if not found:
        raise ValueError(f"no images found in {', '.join(args)} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return found


def resolve_settings(bundle: Bundle, sampler: str | None, steps: int | None, eta: float | None,
                     num_samples: int | None, keep_temperature: bool = True) -> tuple[str, int | None, float, int]:
    """The bundle's sampler defaults with the given overrides, checked before any image is read. A bundle's τ was
    fitted at one sampler point (its calibration says which); another point is refused unless `keep_temperature`
    says to use that τ anyway (the DCG read-out has its own τ and is always allowed)."""
    defaults = bundle.meta.get("sampler") or {}
    sampler = sampler or defaults.get("sampler") or "official"
    steps = steps if steps is not None else defaults.get("sample_steps")
    eta = eta if eta is not None else (defaults.get("eta") or 0.0)
    num_samples = num_samples if num_samples is not None else (defaults.get("num_samples") or 1)
    schedule = bundle.model.schedule
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    # the official sampler's steps count on the reference chain (diffusion.beta_steps), the others on T
    limit, what = ((schedule.reference_steps, "diffusion.beta_steps") if sampler == "official"
                   else (schedule.timesteps, "diffusion.timesteps"))
    if sampler == "dcg":  # no chain: steps and samples mean nothing
        return sampler, None, 0.0, 1
    if steps is not None and not 1 <= int(steps) <= limit:  # checked for ddpm too (which runs all T) to catch a typo
        raise ValueError(f"--steps {steps}: expected 1..{limit} (the bundle's {what})")
    if num_samples < 1:
        raise ValueError(f"--samples {num_samples}: expected at least 1")
    fitted = (bundle.meta.get("calibration") or {}).get("sampler")
    if fitted and not keep_temperature:
        wanted = {"sampler": sampler, "sample_steps": steps, "num_samples": num_samples}
        if any(fitted.get(k) != v for k, v in wanted.items()):
            shown = " ".join(f"{k}={v}" for k, v in fitted.items())
            raise ValueError(f"--sampler/--steps/--samples: this bundle's temperature was fitted on validation at "
                             f"{shown}; another point's probabilities would be calibrated for it: export that point "
                             "(python -m diffmic.export --trial ID --sampler …, which refits τ) or pass "
                             "--keep-temperature")
    return sampler, steps, float(eta), int(num_samples)


def iter_predictions(bundle: Bundle, paths: Sequence[str], sampler: str | None = None, steps: int | None = None,
                     eta: float | None = None, num_samples: int | None = None, batch_size: int = 32,
                     device: str | None = None, seed: int = 0,
                     on_batch: Callable[[list[str], torch.Tensor, Prediction], None] | None = None
                     ) -> Iterator[dict | Failure]:
    """One CSV-ready row (or a Failure) per path, in order within each batch; failures come before their batch.
    `on_batch(paths, inputs, prediction)` sees each batch's prediction (its guidance: the DCG's CAMs and crops)
    before the batch's rows are yielded."""
    sampler, steps, eta, num_samples = resolve_settings(bundle, sampler, steps, eta, num_samples)
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected at least 1")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available (use --device cpu)")
    pre, names = bundle.meta["preprocessing"], bundle.class_names
    transform = eval_transform(pre["image_size"], pre["mean"], pre["std"])
    model = bundle.model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    for start in range(0, len(paths), batch_size):
        tensors, ok = [], []
        for path in paths[start:start + batch_size]:
            try:
                tensors.append(transform(load_image(path)))
                ok.append(path)
            except DataError as e:
                yield Failure(path, str(e))
        if not tensors:
            continue
        inputs = torch.stack(tensors).to(device)
        pred = model.predict(inputs, sampler, steps, eta, num_samples, generator, bundle.temperature_for(sampler))
        if on_batch is not None:
            on_batch(ok, inputs, pred)
        probs, entropy, spread = (t.float().cpu().tolist() for t in (pred.probs, pred.entropy, pred.sample_std))
        for i, path in enumerate(ok):
            best = max(range(len(names)), key=probs[i].__getitem__)
            # one chain has no spread: its std is left empty rather than a 0 that reads as certainty
            yield {"path": path, "predicted": names[best], "confidence": probs[i][best], "entropy": entropy[i],
                   "sample_std": spread[i] if num_samples > 1 else None,
                   **{f"prob_{c}": p for c, p in zip(names, probs[i])}}


def predict_paths(bundle: Bundle, paths: Sequence[str], sampler: str | None = None, steps: int | None = None,
                  eta: float | None = None, num_samples: int | None = None, batch_size: int = 32,
                  device: str | None = None, seed: int = 0) -> tuple[list[dict], list[Failure]]:
    """(rows, failures) for the given image files; None settings take the bundle's sampler defaults."""
    rows: list[dict] = []
    failures: list[Failure] = []
    for item in iter_predictions(bundle, paths, sampler, steps, eta, num_samples, batch_size, device, seed):
        (failures if isinstance(item, Failure) else rows).append(item)
    return rows, failures


def explanation_writer(bundle: Bundle, directory: str) -> Callable[[list[str], torch.Tensor, Prediction], None]:
    """An `on_batch` for iter_predictions that writes each image's figure (diffmic.explain.overlay_png) into
    `directory`, named after the image: stem.png, then stem-1.png, stem-2.png for the same stem met again."""
    target = Path(directory).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"--explain {directory}: exists and is not a directory")
    target.mkdir(parents=True, exist_ok=True)
    pre, used = bundle.meta["preprocessing"], set()

    def write(paths: list[str], inputs: torch.Tensor, prediction: Prediction) -> None:
        explanations = explanations_from(bundle.model, inputs, prediction, pre["mean"], pre["std"],
                                         bundle.temperature)
        for path, explanation in zip(paths, explanations):
            stem, n = Path(path).stem, 0
            name = f"{stem}.png"
            while name in used:
                n += 1
                name = f"{stem}-{n}.png"
            used.add(name)
            overlay_png(explanation, bundle.class_names, target / name)

    return write


def format_row(row: dict, class_names: Sequence[str], num_samples: int) -> str:
    spread = f"  std {row['sample_std']:.4f}" if num_samples > 1 else ""
    probs = " ".join(f"{c}={row[f'prob_{c}']:.4f}" for c in class_names)
    head = f"{row['path']}  {row['predicted']}  p={row['confidence']:.4f}"
    return f"{head}  entropy {row['entropy']:.4f}{spread}  [{probs}]"


def cell(value):
    """A CSV cell that a spreadsheet shows as text: one starting with = + - @ (or a tab / CR before them) would be
    read as a formula (=HYPERLINK(…) from a class name), so it gets a leading apostrophe. Numbers stay numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_csv(path: str, rows: list[dict], class_names: Sequence[str]) -> None:
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    columns = [*FIXED_COLUMNS, *(f"prob_{c}" for c in class_names)]
    with target.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([cell(c) for c in columns])
        writer.writerows([cell(row.get(c, "")) for c in columns] for row in rows)


def check_destinations(output: str | None, explain: str | None) -> None:
    """--output must be a file we can create, --explain a directory we can create (their folders are made as
    needed): said before the work, not after."""
    def first_existing_is_a_folder(flag: str, given: str, start: Path, expected: str) -> None:
        for parent in (start, *start.parents):
            if parent.exists():
                if not parent.is_dir():
                    raise ValueError(f"{flag} {given}: {str(parent)!r} exists and is not a directory (expected "
                                     f"{expected})")
                return

    if output is not None:
        target = Path(output).expanduser()
        if target.is_dir():
            raise ValueError(f"--output {output}: is a directory (expected a CSV file to write)")
        first_existing_is_a_folder("--output", output, target.parent, "a CSV file to write")
    if explain is not None:
        first_existing_is_a_folder("--explain", explain, Path(explain).expanduser(),
                                   "a directory to write the figures into")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[1])
    p.add_argument("model", metavar="MODEL_URI", help="bundle directory (or a run directory with model/), or s3://…")
    p.add_argument("images", metavar="IMAGE_OR_DIR", nargs="+", help="image files and/or directories to walk")
    p.add_argument("--output", metavar="CSV", help="also write the predictions to this CSV file")
    p.add_argument("--samples", type=int, help="sampled chains per image, S (default: the bundle's num_samples)")
    p.add_argument("--sampler", choices=SAMPLERS, help="reverse sampler (default: the bundle's)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the bundle's sample_steps)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: the bundle's)")
    p.add_argument("--keep-temperature", action="store_true", help="with another --sampler/--steps/--samples than "
                   "the bundle's: keep its temperature, fitted at its own point")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise (default 0)")
    p.add_argument("--explain", metavar="DIR", help="also write one figure per image into DIR: where the model "
                   "looks (CAM and crops) and the spread of its samples")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[dict] = []
    failures = 0
    with one_line_errors(PROGRAM):
        check_destinations(args.output, args.explain)  # before any image is predicted
        paths = find_images(args.images)
        bundle = open_bundle(args.model)
        names = bundle.class_names
        sampler, steps, eta, samples = resolve_settings(bundle, args.sampler, args.steps, args.eta, args.samples,
                                                        keep_temperature=args.keep_temperature)
        on_batch = explanation_writer(bundle, args.explain) if args.explain else None
        if samples < 2:
            print(f"{PROGRAM}: note: sample_std is left empty: one chain per image (S=1) has no spread "
                  f"(--samples 8 gives one)", file=sys.stderr)
        with Progress(len(paths), "images", PROGRAM, min_total=args.batch_size) as progress:
            for item in iter_predictions(bundle, paths, sampler, steps, eta, samples, args.batch_size, args.device,
                                         args.seed, on_batch):
                if isinstance(item, Failure):
                    failures += 1
                    reason = item.error if item.path in item.error else f"{item.path}: {item.error}"
                    progress.echo(f"{PROGRAM}: skipped: {reason}", sys.stderr)
                else:
                    rows.append(item)
                    progress.echo(format_row(item, names, samples))
                progress.update()
        if args.output:
            write_csv(args.output, rows, names)
    if failures:
        print(f"{PROGRAM}: {failures} of {len(paths)} images could not be read", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
