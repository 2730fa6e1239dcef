"""The one training loop: `train(cfg, session)`, used alike by `python -m diffmic.train`, Ray Train workers and
Tune trials. `cfg` is a plain dict (the resolved Hydra config); `session` says where the run lives: rank, device,
how to wrap model and loader for data parallelism, where reports and checkpoints go.

Phases: DCG pre-training (cross-entropy), then diffusion training with optional joint DCG steps. Every
`train.val_every` epochs the run is evaluated on the validation split (the only split used for model selection)
and reported with a checkpoint; the test split is evaluated once, at the end, with the best validation weights.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from diffmic.calibration import class_probabilities, fit_temperature
from diffmic.checkpoint import CheckpointError, evaluation_weights, load_state
from diffmic.config import split_seed, validate_config
from diffmic.data import DataSplits, build_splits
from diffmic.data.transforms import BatchAugment
from diffmic.ema import EMA
from diffmic.intervals import bootstrap_intervals
from diffmic.metrics import classification_metrics, prefixed
from diffmic.models import DiffMIC, build_model
from diffmic.rng import rng_state, seed_everything, set_rng_state
from diffmic.secrets import redact_config
from diffmic.session import LocalSession, Session
from diffmic.selection import better


@dataclass
class RunResult:
    val: dict[str, Any]
    test: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0


def warmup_epochs(train_cfg: dict) -> float:
    """`warmup_epochs` when given, else `warmup_fraction` of the epoch budget (the paper's 40 of 1000 epochs), so a
    short run leaves its warm-up as the paper's long one does."""
    given = train_cfg["warmup_epochs"]
    return float(given) if given is not None else train_cfg["warmup_fraction"] * train_cfg["epochs"]


def learning_rate(train_cfg: dict, epoch: float) -> float:
    """Linear warm-up to `lr`, then a half-cycle cosine to `min_lr` at the last epoch (fractional epochs)."""
    lr, min_lr = train_cfg["lr"], train_cfg["min_lr"]
    warmup, total = warmup_epochs(train_cfg), train_cfg["epochs"]
    if epoch < warmup:
        return lr * epoch / warmup
    span = max(total - warmup, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup) / span)))


def _shard(dataset: Dataset, session: Session) -> Subset:
    """Every rank evaluates indices rank, rank+W, …: the union is the whole split, each example exactly once."""
    return Subset(dataset, list(range(session.rank, len(dataset), session.world_size)))


@torch.no_grad()
def evaluate(model: DiffMIC, dataset: Dataset, cfg: dict, session: Session, generator_seed: int = 0,
             temperature: float | None = None, dcg_temperature: float | None = None, intervals: bool = False) -> dict:
    """Whole-split metrics of the diffusion prediction and of the DCG alone (`dcg_*`, and `gain_*` = head − DCG),
    gathered across workers.

    Class probabilities are softmax(ŷ0 / τ) (diffmic.calibration) with the given `temperature`; None fits τ on this
    split (the validation split, whose τ then serves test and prediction). The τ used is returned as `temperature`.
    The DCG's probabilities get a temperature of their own the same way (`dcg_temperature`), so that both figures
    are calibrated alike. `intervals` (a test figure) adds bootstrap 95 % intervals, `<metric>_lo/_hi`
    (diffmic.intervals).
    """
    d, t = cfg["diffusion"], cfg["train"]
    shard = _shard(dataset, session)
    loader = DataLoader(shard, batch_size=t["eval_batch_size"], shuffle=False,
                        num_workers=loader_workers(cfg, session.device.type), pin_memory=session.device.type == "cuda")
    model.eval()
    generator = torch.Generator(device=session.device).manual_seed(generator_seed + session.rank)
    samples, dcg_probs, labels = [], [], []
    with session.autocast():
        for x, y in loader:
            x = session.to_device(x)
            pred = model.predict(x, d["sampler"], d["sample_steps"], d["eta"],
                                 d["num_samples"], generator)
            samples.append(pred.samples.float().cpu().transpose(0, 1))  # N×S×C: gathered by example
            dcg_probs.append(pred.dcg_probs.float().cpu())
            labels.append(y)
    classes, draws = model.num_classes, d["num_samples"]
    local = {"index": np.asarray(shard.indices, dtype=np.int64),
             "samples": torch.cat(samples).numpy() if samples else np.zeros((0, draws, classes)),
             "dcg": torch.cat(dcg_probs).numpy() if dcg_probs else np.zeros((0, classes)),
             "labels": torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)}
    parts = session.all_gather(local)
    order = np.argsort(np.concatenate([p["index"] for p in parts]))
    merged = {k: np.concatenate([p[k] for p in parts])[order] for k in ("samples", "dcg", "labels")}
    chains = merged["samples"].transpose(1, 0, 2)  # S×N×C
    dcg_logits = np.log(np.clip(merged["dcg"], 1e-12, None))[None]  # log-probabilities: logits up to a constant
    if d["sampler"] == "dcg":  # the DCG read out alone: the head's τ (a chain's) does not apply, its own does
        temperature = dcg_temperature
    if temperature is None:
        temperature = fit_temperature(chains, merged["labels"])
    if dcg_temperature is None:
        dcg_temperature = fit_temperature(dcg_logits, merged["labels"])
    probs = class_probabilities(chains, temperature)
    # a config written before dataset.ordinal existed: nominal (Cohen's kappa only)
    ordinal = bool(cfg["dataset"].get("ordinal", False))
    metrics = classification_metrics(merged["labels"], probs, class_probabilities(dcg_logits, dcg_temperature),
                                     ordinal=ordinal)
    metrics["mean_entropy"] = float(-(probs * np.log(np.clip(probs, 1e-12, None))).sum(1).mean()) if len(probs) else 0.0
    metrics["temperature"] = float(temperature)
    metrics["dcg_temperature"] = float(dcg_temperature)
    if intervals:
        metrics.update(bootstrap_intervals(merged["labels"], probs, seed=generator_seed, ordinal=ordinal))
    return metrics


def loader_workers(cfg: dict, device_type: str) -> int:
    """DataLoader worker processes of one training process: `train.num_workers`, or for `auto` one per CPU it has
    (`scaling.resources_per_worker.CPU` in a Ray Train worker, 1 when not given; the CPUs this process may run on
    without Ray), less one on a CPU, where the training process computes on the remaining one(s). On a GPU the
    training process mostly waits for the device, so the loaders get every CPU (4 on cluster/aws.yaml's g5.xlarge)."""
    given = cfg["train"]["num_workers"]  # auto or an integer >= 0 (diffmic.config.validate_config)
    if given != "auto":
        return given
    scaling = cfg["scaling"]
    if scaling["num_workers"] >= 1:
        cpus = int((scaling["resources_per_worker"] or {}).get("CPU", 1))
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, cpus if device_type == "cuda" else cpus - 1)


def _loader(dataset: Dataset, cfg: dict, session: Session, seed: int) -> DataLoader:
    t = cfg["train"]
    batch = min(t["batch_size"], len(dataset))
    workers = loader_workers(cfg, session.device.type)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=len(dataset) > batch,
                        num_workers=workers, persistent_workers=workers > 0, pin_memory=session.device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    loader.base_seed = seed
    return session.prepare_loader(loader)


def _begin_epoch(loader, session: Session, epoch: int) -> None:
    """Each epoch's order depends on (seed, epoch) alone, so a resumed run draws the batches the uninterrupted one
    draws (a distributed sampler does the same through set_epoch)."""
    session.set_epoch(loader, epoch)
    if getattr(loader, "generator", None) is not None and hasattr(loader, "base_seed"):
        loader.generator.manual_seed(loader.base_seed * 100_003 + epoch)


class Selection:
    """The one rule that picks the best epoch: `train.select_metric` (a validation metric) and `train.select_mode`.
    A search sets both from `search.metric`/`search.mode`, so the engine, Ray Train's checkpoint scoring, Tune, ASHA,
    the best trial and its export all pick alike."""

    def __init__(self, train_cfg: dict):
        self.metric, self.mode = train_cfg["select_metric"], train_cfg["select_mode"]
        self.worst = -math.inf if self.mode == "max" else math.inf

    def better(self, value: float, than: float) -> bool:
        return better(value, than, self.mode)  # diffmic/selection.py: ties keep the earlier epoch


def device_augment(cfg: dict, data: DataSplits, session: Session) -> BatchAugment | None:
    """Where the training augmentation runs (`train.augment_on`): `loader`, as the official code, in the DataLoader's
    processes on PIL images; `device`, per batch on the training device, the loader then only reading images (the
    train split's transform becomes `device_transform`); `auto`, on the device when it is a GPU."""
    mode = cfg["train"]["augment_on"]
    if mode == "auto":
        mode = "device" if session.device.type == "cuda" else "loader"
    if mode != "device" or not hasattr(data.train, "transform"):
        return None
    from diffmic.data.config import resolve_config
    from diffmic.data.transforms import device_transform

    c = resolve_config(cfg["dataset"])
    data.train.transform = device_transform(c["image_size"])
    a = c["augment"]
    return BatchAugment(a["hflip"], a["vflip"], a["rotation"], c["mean"], c["std"])


def _epoch(model, core: DiffMIC, loader, optimizers, cfg: dict, session: Session, epoch: int, phase: str,
           ema: EMA | None, augment: BatchAugment | None = None) -> dict[str, float]:
    t = cfg["train"]
    joint = t["joint_dcg"]
    model.train()
    if phase == "diffusion" and not joint:
        core.dcg.eval()  # frozen guidance: BN running statistics stay as pre-training left them
    sums: dict[str, float] = {}
    seen, start = 0, time.perf_counter()
    steps = len(loader)
    if augment is not None:  # a resumed run draws the flips and angles the uninterrupted one draws
        draws = torch.Generator(device=session.device).manual_seed(
            (cfg["seed"] * 1_000_003 + epoch * 2 + (phase == "dcg")) * 1009 + session.rank)
    for i, (x, y) in enumerate(loader):
        if phase == "diffusion":
            for group in optimizers["denoiser"].param_groups:
                group["lr"] = learning_rate(t, epoch + i / steps)
        x, y = session.to_device(x), session.to_device(y)
        if augment is not None:
            x = augment(x, draws)
        with session.autocast():
            losses = model(x, y, phase=phase, joint_dcg=joint, mmd_weight=t["mmd_weight"], guidance=t["guidance"],
                           mmd_bandwidths=tuple(t["mmd_bandwidths"]), ce_weight=t["ce_weight"])
        active = [optimizers["dcg"]] if phase == "dcg" else [optimizers["denoiser"]] + ([optimizers["dcg"]] if joint else [])
        for opt in active:
            opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if phase == "diffusion" and t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(core.denoiser.parameters(), t["grad_clip"])
        for opt in active:
            opt.step()
        if ema is not None and (phase == "diffusion" or not t["denoiser"]):
            ema.update(core)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(y)
        seen += len(y)
    elapsed = time.perf_counter() - start
    prefix = "dcg_" if phase == "dcg" else "train_"
    out = {prefix + k.removeprefix("dcg_" if phase == "dcg" else ""): v / max(seen, 1) for k, v in sums.items()}
    out[prefix + "samples_per_s"] = seen * session.world_size / max(elapsed, 1e-9)
    out[prefix + "epoch_time_s"] = elapsed
    return out


def build_optimizers(model: DiffMIC, t: dict) -> dict[str, torch.optim.Optimizer]:
    """Adam for the denoiser and (AMSGrad) for the DCG, as the official code has them.

    `fused=True` updates every parameter in one kernel: the paper's 108 M-parameter denoiser then steps 6-7x faster
    on a CPU (57 vs 387 ms, measured) than with the per-tensor loop, whose temporaries are each as large as a weight.
    """
    return {
        "denoiser": torch.optim.Adam(model.denoiser.parameters(), lr=t["lr"], betas=(0.9, 0.999), eps=1e-8,
                                     fused=True),
        "dcg": torch.optim.Adam(model.dcg.parameters(), lr=t["dcg_lr"], betas=(0.9, 0.999), eps=1e-8,
                                amsgrad=t["dcg_amsgrad"], fused=True),
    }


def _resume_from(session: Session) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads, and its state; a damaged one is passed over with one warning line. When
    there are checkpoints and none loads, the run stops: it never silently starts again from scratch."""
    candidates, error = session.latest_checkpoints(), None
    for candidate in candidates:
        try:
            state = load_state(candidate)
        except CheckpointError as e:
            error = e
            if candidate != candidates[-1]:
                session.log(f"warning: {e}; resuming from the checkpoint before it")
            continue
        session.resumed_from(candidate)
        return candidate, state
    if error is not None:
        raise error
    return None, None


def train(cfg: dict, session: Session | None = None) -> RunResult:
    """Train and evaluate one configuration; returns the best-validation metrics and the test metrics."""
    validate_config(cfg)
    cfg = redact_config(cfg)  # it is written into every checkpoint and bundle
    session = session or LocalSession(cfg["output_dir"])  # its default lives in configs/config.yaml
    t = cfg["train"]
    seed = int(cfg["seed"])
    seed_everything(seed + session.rank, cfg["deterministic"])
    data: DataSplits = build_splits(cfg["dataset"], seed=split_seed(cfg))
    session.log(f"data: {cfg['dataset']['name']} train {len(data.train)} / val {len(data.val)} / test "
                f"{len(data.test)}, {data.num_classes} classes" + (f"; splits {data.grouping}" if data.grouping else ""))
    torch.manual_seed(seed)  # identical initial weights on every rank
    core = build_model(cfg, data.num_classes, cfg["dataset"]["image_size"]).to(session.device)
    if session.device.type == "cuda" and t["channels_last"]:
        core = core.to(memory_format=torch.channels_last)
    optimizers = build_optimizers(core, t)
    ema = EMA(core, t["ema_decay"]) if t["ema"] else None
    session.start(cfg)
    session.write_splits(data.membership)
    history: list[dict] = []
    selection = Selection(t)
    best = {"epoch": 0, "value": selection.worst, "metrics": {}}
    best_weights: dict[str, torch.Tensor] | None = None
    start_epoch, pretrained = 0, False

    resumed, state = _resume_from(session)
    if resumed is not None:
        core.load_state_dict(state["model"])
        for name, opt in optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, pretrained, history, best = state["epoch"], state["dcg_pretrained"], state["history"], state["best"]
        best_weights = dict(evaluation_weights(state)) if best["epoch"] else None
        set_rng_state(state["rng"])
        session.log(f"resumed from {resumed} at epoch {start_epoch}")

    model = session.prepare_model(core)
    select = selection.metric

    def checkpoint_state(epoch: int) -> dict:
        return {"format": 1, "epoch": epoch, "dcg_pretrained": True, "config": cfg, "history": history, "best": best,
                "model": core.state_dict(), "ema": ema.state_dict() if ema else None,
                "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                # the best epoch's weights are this checkpoint's model + EMA shadow when it is the best one
                "best_weights": None if best["epoch"] == epoch else best_weights,
                "class_names": data.class_names, "rng": rng_state()}

    augment = device_augment(cfg, data, session)
    if not pretrained and t["dcg_pretrain_epochs"] > 0:
        loader = _loader(data.train, cfg, session, seed)
        for e in range(t["dcg_pretrain_epochs"]):
            _begin_epoch(loader, session, e)
            stats = _epoch(model, core, loader, optimizers, cfg, session, e, "dcg", None, augment)
            session.log(f"dcg pre-train {e + 1}/{t['dcg_pretrain_epochs']}: ce {stats['dcg_ce']:.4f}, "
                        f"{stats['dcg_samples_per_s']:.0f} img/s")
    if ema is not None and not pretrained:
        ema.reset(core)  # pre-training moved the DCG: start averaging from the weights diffusion starts from
    if not t["joint_dcg"]:
        core.dcg.requires_grad_(False)

    loader = _loader(data.train, cfg, session, seed + 1)
    # train.denoiser=false: the same epochs train the DCG alone (a search's plain control, read out with
    # diffusion.sampler=dcg); the denoiser keeps its initial weights
    phase = "diffusion" if t["denoiser"] else "dcg"
    for epoch in range(start_epoch, t["epochs"]):
        _begin_epoch(loader, session, epoch)
        stats = _epoch(model, core, loader, optimizers, cfg, session, epoch, phase, ema, augment)
        if (epoch + 1) % t["val_every"] and epoch + 1 < t["epochs"]:
            continue
        with (ema.applied(core) if ema else _null()):
            val = evaluate(core, data.val, cfg, session, generator_seed=seed)
            if selection.better(val[select], best["value"]):
                best = {"epoch": epoch + 1, "value": val[select], "metrics": val}
                best_weights = {k: v.detach().cpu().clone() for k, v in core.state_dict().items()}
        row = {"epoch": epoch + 1, "lr": optimizers["denoiser"].param_groups[0]["lr"], **stats, **prefixed("val", val)}
        history.append(row)
        stats = {k.replace("dcg_", "train_", 1) if phase == "dcg" else k: v for k, v in stats.items()}
        session.log(f"epoch {epoch + 1}/{t['epochs']}: loss {stats['train_loss']:.4f}, val {head_vs_dcg(val)}, "
                    f"{stats['train_samples_per_s']:.0f} img/s")
        due = (epoch + 1) % t["checkpoint_every"] == 0 or epoch + 1 == t["epochs"]
        session.report(row, checkpoint_state(epoch + 1) if due else None)

    if resumed is not None and start_epoch >= t["epochs"] and history:
        # A resumed run with nothing left to train must still report its result, or a restored Tune trial
        # finishes without metrics (seen with Ray Train V2).
        session.report(history[-1], None)

    if best_weights is not None:
        core.load_state_dict(best_weights)
    elif ema is not None:
        ema.copy_to(core)
    test: dict = {}
    if t["test_at_end"]:  # a search trial never looks at test; its best model is tested once, later
        test = evaluate(core, data.test, cfg, session, generator_seed=seed,  # the τ fitted on validation
                        temperature=best["metrics"].get("temperature", 1.0),
                        dcg_temperature=best["metrics"].get("dcg_temperature", 1.0), intervals=True)
    result = RunResult(val=best["metrics"], test=test, history=history, best_epoch=best["epoch"])
    session.finish(result, core, cfg, data.class_names)
    summary = f"best val {select} ({selection.mode}) {best['value']:.3f} at epoch {best['epoch']}"
    if test:
        summary += f"; test {head_vs_dcg(test)}"
    session.log(summary)
    return result


def head_vs_dcg(m: dict) -> str:
    """One result line: the head's figures, its DCG's, and the gain (head − DCG)."""
    return (f"acc {m['accuracy']:.3f} f1 {m['macro_f1']:.3f} auc {m['auc']:.3f} | DCG acc {m['dcg_accuracy']:.3f} "
            f"f1 {m['dcg_macro_f1']:.3f} auc {m['dcg_auc']:.3f} | gain f1 {m['gain_macro_f1']:+.3f}")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
