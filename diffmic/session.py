"""Where a training run lives. The engine asks its session for the device, the data-parallel wrapping, and where
reports and checkpoints go; `LocalSession` is a plain process writing to a run directory, and `tune/` provides
the Ray Train one. Same loop, different surroundings."""
from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch

from diffmic.checkpoint import STATE_FILE, previous, save_checkpoint, to_jsonable
from diffmic.errors import DiffmicError


class SessionError(DiffmicError):
    """A run that must not start where it was asked to; one line, nothing written."""


class Session:
    rank: int = 0
    world_size: int = 1

    def __init__(self, device: str | torch.device | None = None, amp: bool = True):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.amp = amp and self.device.type == "cuda"  # bf16 autocast only where it pays (CUDA)

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[diffmic] {message}", file=sys.stderr, flush=True)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)

    def autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def write_splits(self, membership: list[dict]) -> None:
        """The split membership the run used (splits.csv: image, group, split, carve), where the run lives; a
        session that keeps no files of its own writes nothing (a search writes it into its record)."""

    def prepare_loader(self, loader):
        return loader

    def set_epoch(self, loader, epoch: int) -> None:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1 or not torch.distributed.is_initialized():
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def start(self, cfg: dict) -> None:
        """Called once the run's data and model are built: every check has passed, outputs may be written."""

    def report(self, metrics: dict, state: dict | None) -> None:
        raise NotImplementedError

    def latest_checkpoints(self) -> list[Path]:
        """Checkpoints to resume from, newest first (the engine takes the first that loads)."""
        return []

    def resumed_from(self, checkpoint: Path) -> None:
        """Called with the checkpoint the engine resumed from (the first of latest_checkpoints that loaded)."""

    def finish(self, result, model, cfg: dict, class_names: list[str]) -> None:
        """Called once on every rank after the final evaluation."""


class LocalSession(Session):
    """One process writing `output_dir/{config.json, history.csv, metrics.json, checkpoint/, model/}`.

    A run directory is never overwritten: starting a run in one that holds a run needs `resume=True`, and resuming
    needs a checkpoint there. Both are checked here, before anything is read or written."""

    OUTPUTS = ("config.json", "history.csv", "metrics.json", "checkpoint", "checkpoint-previous", "model")

    def __init__(self, output_dir: str | Path, resume: bool = False, device=None, amp: bool = True):
        super().__init__(device, amp)
        self.output_dir = Path(output_dir).resolve()
        self.resume = resume
        self.rows: list[dict] = []
        found = [name for name in self.OUTPUTS if (self.output_dir / name).exists()]
        if resume and not (self.checkpoint_dir / STATE_FILE).is_file():
            raise SessionError(f"resume=true: no checkpoint to resume in output_dir={self.output_dir} (expected "
                               f"checkpoint/{STATE_FILE} there); without resume=true a new run starts")
        if found and not resume:
            raise SessionError(f"output_dir={self.output_dir} already holds a run ({', '.join(found)}): pass "
                               "resume=true to continue it, or choose another output_dir (nothing was changed)")

    def start(self, cfg: dict) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config.json").write_text(json.dumps(to_jsonable(cfg), indent=1))

    def write_splits(self, membership: list[dict]) -> None:
        if membership:
            write_csv(self.output_dir / "splits.csv", membership)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoint"

    def report(self, metrics: dict, state: dict | None) -> None:
        self.rows = list(state["history"]) if state else self.rows + [metrics]
        write_csv(self.output_dir / "history.csv", self.rows)
        if state is not None:
            save_checkpoint(self.checkpoint_dir, state)

    def latest_checkpoints(self) -> list[Path]:
        if not self.resume:
            return []
        return [d for d in (self.checkpoint_dir, previous(self.checkpoint_dir)) if (d / STATE_FILE).is_file()]

    def finish(self, result, model, cfg: dict, class_names: list[str]) -> None:
        write_csv(self.output_dir / "history.csv", result.history)
        write_result(self.output_dir, result, model, cfg, class_names)
        if result.test:  # the run looked at its test split once: the ledger says so
            from diffmic import ledger
            sampling = {k: cfg["diffusion"][k] for k in ("sampler", "sample_steps", "num_samples")}
            ledger.append(self.output_dir, ledger.look("diffmic.train", result.test, cfg["dataset"]["name"],
                                                       point=sampling))


def write_result(directory: Path, result, model, cfg: dict, class_names: list[str],
                 metrics_file: str = "metrics.json") -> None:
    """What a finished run leaves, in a run directory (local) or its final checkpoint (Ray Train): the val and test
    metrics of its evaluation weights, and those weights exported as a bundle in `model/`."""
    from diffmic.bundle import write_bundle

    metrics = to_jsonable({"val": result.val, "test": result.test, "best_epoch": result.best_epoch})
    (directory / metrics_file).write_text(json.dumps(metrics, indent=1))
    write_bundle(directory / "model", model, cfg, class_names, metrics)


def write_csv(path: Path, rows: list[dict]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
