"""`python -m diffmic.evaluate checkpoint=PATH [split=val|test] [diffusion.sampler=ddim diffusion.sample_steps=10 …]`

Evaluates a trained model on a split of its dataset. PATH is a run directory, its `checkpoint/` or `model/`, or an
exported bundle. Any `key=value` overrides the stored config (sampler settings, `dataset.root` when the data moved).
Prints the metrics as JSON (a test split's with bootstrap intervals); `output=FILE` also writes them. Progress goes
to stderr. The default split is val; each evaluation on test adds a line to the ledger beside PATH
(diffmic/ledger.py).
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from diffmic.cli import one_line_errors


def load_for_evaluation(path: str | Path, overrides: list[str]):
    """(model, config, temperatures) from a bundle or a training checkpoint, with dotted overrides applied to the
    config; the temperatures ({"temperature": head's τ, "dcg_temperature": its DCG's}) are those fitted on
    validation."""
    import torch

    from diffmic.bundle import MANIFEST, load_bundle
    from diffmic.checkpoint import STATE_FILE, fitted_temperature, load_eval_model, load_state
    from diffmic.config import parse_overrides, with_values

    path = Path(path)
    if (path / "model" / MANIFEST).is_file():
        path = path / "model"
    if (path / MANIFEST).is_file():
        bundle = load_bundle(path)
        model, cfg = bundle.model, bundle.config
        temperature = {"temperature": bundle.temperature, "dcg_temperature": bundle.dcg_temperature}
    elif (path / STATE_FILE).is_file() or (path / "checkpoint" / STATE_FILE).is_file():
        state = load_state(path if (path / STATE_FILE).is_file() else path / "checkpoint")
        cfg, model = state["config"], load_eval_model(state)
        temperature = {k: fitted_temperature(state, k) for k in ("temperature", "dcg_temperature")}
    else:
        raise FileNotFoundError(f"checkpoint={str(path)!r}: expected a run directory, a checkpoint directory "
                                f"(with {STATE_FILE}) or an exported bundle (with {MANIFEST})")
    cfg = with_values(cfg, parse_overrides(overrides))
    model.schedule = model.schedule.to(dtype=torch.float32)
    return model, cfg, temperature


def measure(model, dataset, cfg: dict, session, seed: int, temperature: float | None) -> dict:
    """`engine.evaluate` with cfg's sampler settings, and what that prediction costs: wall-clock milliseconds per
    image (everything a prediction does: reading, DCG, encoding, the reverse chain) and denoiser evaluations per
    image (one chain step of one image = 1; steps x samples for a chain that is not cut short)."""
    from diffmic.engine import evaluate

    rows = 0

    def count(module, args, output) -> None:
        nonlocal rows
        rows += int(output.shape[0])

    handle = model.denoiser.register_forward_hook(count)
    try:
        start = time.perf_counter()
        metrics = evaluate(model, dataset, cfg, session, seed, temperature=temperature)
        elapsed = time.perf_counter() - start
    finally:
        handle.remove()
    images = max(1, len(dataset))
    return {**metrics, "predict_ms_per_image": 1000.0 * elapsed / images, "denoiser_calls_per_image": rows / images}


@contextmanager
def progress_over_images(model, total: int, min_total: int):
    """Progress (diffmic.cli.Progress) over the images engine.evaluate predicts, counted as the model's DCG sees
    them (one pass per batch): engine.evaluate has no progress hook of its own."""
    from diffmic.cli import Progress

    with Progress(total, "images", "diffmic.evaluate", min_total) as progress:
        handle = model.dcg.register_forward_hook(lambda module, args, output: progress.update(len(output.fused)))
        try:
            yield progress
        finally:
            handle.remove()


def main(argv: list[str] | None = None) -> None:
    given = argv if argv is not None else sys.argv[1:]
    with one_line_errors("diffmic.evaluate"):
        for a in given:
            if "=" not in a or a.startswith("-"):
                raise ValueError(f"unexpected argument {a!r}: expected key=value (checkpoint=PATH, split=val, "
                                 "output=FILE or a config key such as diffusion.sample_steps=10)")
        args = dict(a.split("=", 1) for a in given)
        if "checkpoint" not in args:
            raise ValueError("checkpoint=PATH is required (a run directory, checkpoint or exported bundle)")
        from diffmic.config import split_seed, validate_config
        from diffmic.data import build_splits
        from diffmic.engine import evaluate
        from diffmic.session import Session

        split = args.pop("split", "val")  # the test split is looked at on purpose (and counted), never by default
        output = args.pop("output", None)
        checkpoint = args.pop("checkpoint")
        model, cfg, temperature = load_for_evaluation(checkpoint, [f"{k}={v}" for k, v in args.items()])
        validate_config(cfg)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r}: expected train, val or test")
        data = build_splits(cfg["dataset"], seed=split_seed(cfg))
        session = Session(amp=cfg["train"]["amp"])
        dataset = getattr(data, split)
        start = time.perf_counter()
        with progress_over_images(model, len(dataset), min_total=cfg["train"]["eval_batch_size"]):
            metrics = evaluate(model.to(session.device), dataset, cfg, session, cfg["seed"], **temperature,
                               intervals=True)
        metrics.update(split=split, images=len(dataset), seconds=round(time.perf_counter() - start, 2),
                       sampler=cfg["diffusion"]["sampler"], sample_steps=cfg["diffusion"]["sample_steps"])
        if split == "test":
            from diffmic import ledger
            where = Path(checkpoint)
            where = where if where.is_dir() else where.parent
            ledger.append(where, ledger.look("diffmic.evaluate", metrics, cfg["dataset"]["name"], point={
                k: cfg["diffusion"][k] for k in ("sampler", "sample_steps", "num_samples")}))
        from diffmic.checkpoint import to_jsonable
        text = json.dumps(to_jsonable(metrics), indent=1)
        print(text)
        if output:
            Path(output).write_text(text)


if __name__ == "__main__":
    main()
