"""Runtime of DiffMIC's training step and prediction, side by side with a plain classifier and with floors.

    python bench/bench_core.py [--config small|paper|both] [--device cpu|cuda] [--batch N] [--repeats N]
                               [--quick] [--json FILE]

For each config it prints (a) train step ÷ a plain timm classifier's train step (CE + Adam) at the DCG's backbone,
batch and size, with the DCG trained jointly and frozen; (b) predict time per image (`official` sampler, `ddim` at
10 steps) ÷ the classifier's forward; (c) official-style predict (DCG run twice, f(x) re-encoded at every step)
÷ ours (f(x) once), at 100 steps. Next to every time stands its floor: the necessary parts of that computation
(backbone passes, crop gather, denoiser MLP steps, optimizer steps) each timed alone on the same shapes, summed.

Every figure of a group is timed round-robin (A, B, C, A, B, C, …) after a warm-up round and reported as a median,
so load from other processes hits both sides of each ratio alike. Ratios are reported, never pass/fail.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: timm would retry its lookups for ~40 s
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import yaml  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffmic.compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # before timm (and torchvision) are imported
import timm  # noqa: E402
from diffmic.diffusion import sample  # noqa: E402
from diffmic.engine import build_optimizers  # noqa: E402
from diffmic.models import DiffMIC, build_model, crop_rois  # noqa: E402

# small = the synthetic preset (configs/preset/synthetic.yaml), paper = configs/model/diffmic.yaml on ISIC (7 classes,
# the ISIC test sampler starts at step 250). CPU batches are small so that a run fits in ~10 minutes on 2 cores.
SPECS = {
    "small": {"image_size": 64, "num_classes": 4, "batch": {"cpu": 32, "cuda": 64}, "official_steps": 20,
              "repeats": 7, "feature_dim": 512,
              "dcg": {"backbone": "resnet18", "output_stride": 16, "roi_count": 4, "crop_size": 16}},
    "paper": {"image_size": 224, "num_classes": 7, "batch": {"cpu": 4, "cuda": 64}, "official_steps": 250,
              "repeats": 3, "feature_dim": 6144,
              "dcg": {"backbone": "resnet50", "output_stride": 32, "roi_count": 6, "crop_size": 32}},
}
DDIM_STEPS = 10
COMPARE_STEPS = 100  # (c)
MMD_WEIGHT, GRAD_CLIP = 0.5, 1.0  # configs/train/paper.yaml


@dataclass
class Row:
    label: str
    time: float                                  # median seconds per batch
    floor: float                                 # seconds per batch, sum of `parts`
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class Bench:
    model: DiffMIC
    classifier: torch.nn.Module
    opts: dict[str, torch.optim.Optimizer]
    x: torch.Tensor
    y: torch.Tensor
    crops: torch.Tensor   # the B·K crops the DCG cuts from x, for timing the local backbone alone
    rois: torch.Tensor
    autocast: Callable
    sync: Callable


def time_round_robin(items: dict[str, tuple[Callable | None, Callable]], repeats: int, sync: Callable
                     ) -> dict[str, float]:
    """Median seconds of each item's fn; its setup (a mode switch, dropping grads) runs untimed before each call."""
    samples: dict[str, list[float]] = {name: [] for name in items}
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, oneDNN/cuDNN kernel choice)
        for name, (setup, fn) in items.items():
            if setup:
                setup()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if round_:
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def model_config(spec: dict) -> dict:
    """The `model` and `diffusion` sections `build_model` reads: the YAML defaults of configs/ (plain YAML, no Hydra)
    with the benchmark's sizes."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    model = yaml.safe_load((configs / "model" / "diffmic.yaml").read_text())
    diffusion = yaml.safe_load((configs / "diffusion" / "card.yaml").read_text())
    model["dcg"].update(spec["dcg"], local_backbone=None, pretrained=False)
    model["denoiser"].update(encoder="resnet18", feature_dim=spec["feature_dim"], pretrained=False)
    return {"model": model, "diffusion": {**diffusion, "timesteps": 1000, "schedule": "linear"}}


def setup_bench(spec: dict, batch: int, device: torch.device) -> Bench:
    torch.manual_seed(0)
    size, classes = spec["image_size"], spec["num_classes"]
    model = build_model(model_config(spec), classes, size).to(device)
    stride = spec["dcg"]["output_stride"]  # the classifier gets the DCG's backbone exactly, dilation included
    classifier = timm.create_model(spec["dcg"]["backbone"], num_classes=classes, pretrained=False,
                                   **({"output_stride": stride} if stride != 32 else {})).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    cuda = device.type == "cuda"
    if cuda:  # as engine.train runs on CUDA (the loader's NCHW input stays as it is)
        torch.backends.cudnn.benchmark = True
        model, classifier = (m.to(memory_format=torch.channels_last) for m in (model, classifier))
    train_cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "train" / "paper.yaml").read_text())
    opts = {**build_optimizers(model, train_cfg),  # as engine.train builds them
            "classifier": torch.optim.Adam(classifier.parameters(), lr=1e-3, fused=True)}
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    with torch.no_grad(), autocast():
        rois = model.dcg(x).rois
        crops = crop_rois(x, rois, model.dcg.crop_size).flatten(0, 1).contiguous()
    return Bench(model, classifier, opts, x, torch.arange(batch, device=device) % classes, crops, rois, autocast,
                 torch.cuda.synchronize if cuda else (lambda: None))


def train_mode(model: DiffMIC, joint: bool) -> None:
    """The state engine._epoch trains in: a frozen DCG stays in eval mode with requires_grad off."""
    model.train()
    model.dcg.requires_grad_(joint)
    if not joint:
        model.dcg.eval()


def train_step(b: Bench, joint: bool) -> None:
    """One diffusion-phase step of engine._epoch (EMA update left out: it is a knob, not part of the method)."""
    active = [b.opts["denoiser"]] + ([b.opts["dcg"]] if joint else [])
    with b.autocast():
        losses = b.model(b.x, b.y, phase="diffusion", joint_dcg=joint, mmd_weight=MMD_WEIGHT)
    for opt in active:
        opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_(b.model.denoiser.parameters(), GRAD_CLIP)
    for opt in active:
        opt.step()


def classifier_step(b: Bench) -> None:
    with b.autocast():
        loss = F.cross_entropy(b.classifier(b.x).float(), b.y)
    b.opts["classifier"].zero_grad(set_to_none=True)
    loss.backward()
    b.opts["classifier"].step()


@torch.no_grad()
def official_style_predict(model: DiffMIC, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The official test loop: the DCG runs twice per batch (once for y_T's mean, once for ŷ) and every denoiser
    call re-encodes the image."""
    model.priors(x)
    prior = model.priors(x).fused

    def eps_fn(y_t: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        embedding = model.denoiser.encode(x)
        return model.denoiser(embedding, y_t.to(embedding.dtype), p.to(embedding.dtype), t).float()

    return sample(model.schedule, eps_fn, prior, "official", steps)


def part_fns(b: Bench, grad: bool) -> dict[str, Callable]:
    """The necessary pieces of a step, each alone: fwd+bwd (into the weights) when `grad`, else a no_grad fwd."""
    m, classes = b.model, b.model.num_classes
    n = len(b.x)
    y_t, prior = torch.randn(n, classes, device=b.x.device), torch.rand(n, classes, device=b.x.device)
    t = torch.randint(0, 1000, (n,), device=b.x.device)
    with torch.no_grad(), b.autocast():
        embedding = m.denoiser.encode(b.x).detach()
    embedding.requires_grad_(grad)  # the MLP's backward also yields the embedding's grad, as in the real step

    def run(f: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def go() -> None:
            with torch.set_grad_enabled(grad), b.autocast():
                out = f()
            if out.requires_grad:  # the crop gather has nothing to back-propagate into (x needs no grad)
                out.float().sum().backward()
        return go

    return {"global backbone": run(lambda: m.dcg.global_net(b.x)),
            "crop gather": run(lambda: crop_rois(b.x, b.rois, m.dcg.crop_size).flatten(0, 1).contiguous()),
            "local backbone": run(lambda: m.dcg.local_net(b.crops)),
            "encoder": run(lambda: m.denoiser.encode(b.x)),
            "denoiser MLP": run(lambda: m.denoiser(embedding, y_t, prior, t)),
            # training runs the fused, global and local branches as one stacked pass (DiffMIC.loss)
            "denoiser MLP 3 branches": run(lambda: m.denoiser(embedding, y_t.repeat(3, 1), prior.repeat(3, 1),
                                                             t.repeat(3), branches=3))}


def optimizer_fns(b: Bench) -> dict[str, Callable]:
    den = b.model.denoiser

    def denoiser_step() -> None:
        torch.nn.utils.clip_grad_norm_(den.parameters(), GRAD_CLIP)
        b.opts["denoiser"].step()

    return {"clip + Adam denoiser": denoiser_step, "Adam DCG": b.opts["dcg"].step}


def fill_grads(module: torch.nn.Module) -> Callable[[], None]:
    """Setup for a lone optimizer step: every parameter holds a gradient, as after the real backward.

    The gradients are allocated once and handed back every round: fresh ones would make each lone step first-touch
    ~0.4 GB of new pages at the paper config, which inflated this floor part 2-3x.
    """
    grads = {p: torch.zeros_like(p) for p in module.parameters()}

    def setup() -> None:
        for p, g in grads.items():
            if p.grad is None:
                p.grad = g
    return setup


def bench_train(b: Bench, repeats: int) -> tuple[list[Row], float]:
    """(a): rows for the joint and frozen train steps, and the classifier's step time."""
    m = b.model
    joint, frozen = (lambda: train_mode(m, True)), (lambda: train_mode(m, False))

    def drop_grads() -> None:  # a fwd+bwd part starts, like the real step after zero_grad, from no gradients
        joint()
        m.zero_grad(set_to_none=True)

    fb, fwd, opt = part_fns(b, grad=True), part_fns(b, grad=False), optimizer_fns(b)
    items = {"classifier": (lambda: b.classifier.train(), lambda: classifier_step(b)),
             "joint": (joint, lambda: train_step(b, True)),
             "frozen": (frozen, lambda: train_step(b, False))}
    items |= {f"{k} fwd+bwd": (drop_grads, f) for k, f in fb.items()}
    items |= {f"{k} fwd (eval)": (frozen, fwd[k]) for k in ("global backbone", "local backbone")}
    items |= {k: (fill_grads(m), f) for k, f in opt.items()}
    t = time_round_robin(items, repeats, b.sync)
    shared = {"encoder fwd+bwd": t["encoder fwd+bwd"],
              "denoiser MLP fwd+bwd, 3 branches": t["denoiser MLP 3 branches fwd+bwd"],
              "crop gather": t["crop gather fwd+bwd"], "clip + Adam denoiser": t["clip + Adam denoiser"]}
    joint_parts = {"global backbone fwd+bwd": t["global backbone fwd+bwd"],
                   "local backbone fwd+bwd": t["local backbone fwd+bwd"], **shared, "Adam DCG": t["Adam DCG"]}
    frozen_parts = {"global backbone fwd": t["global backbone fwd (eval)"],
                    "local backbone fwd": t["local backbone fwd (eval)"], **shared}
    rows = [Row("train step, DCG joint", t["joint"], sum(joint_parts.values()), joint_parts),
            Row("train step, DCG frozen", t["frozen"], sum(frozen_parts.values()), frozen_parts)]
    return rows, t["classifier"]


def bench_predict(b: Bench, official_steps: int, compare_steps: int, repeats: int) -> tuple[list[Row], float]:
    """(b) and (c): rows for our sampler runs and the official-style one, and the classifier's forward time."""
    m = b.model

    def evaluate() -> None:
        m.eval()
        b.classifier.eval()

    def predict(sampler: str, steps: int) -> Callable[[], None]:
        def go() -> None:
            with b.autocast():
                m.predict(b.x, sampler, steps)
        return go

    def official_style() -> None:
        with b.autocast():
            official_style_predict(m, b.x, compare_steps)

    def classify() -> None:
        with torch.no_grad(), b.autocast():
            b.classifier(b.x)

    items = {"classifier": classify, "official": predict("official", official_steps),
             "ddim": predict("ddim", DDIM_STEPS), "ours": predict("official", compare_steps),
             "official-style": official_style, **part_fns(b, grad=False)}
    t = time_round_robin({k: (evaluate, f) for k, f in items.items()}, repeats, b.sync)
    dcg = {"global backbone fwd": t["global backbone"], "crop gather": t["crop gather"],
           "local backbone fwd": t["local backbone"]}

    def row(label: str, key: str, steps: int, dcg_runs: int = 1, encodes: int = 1) -> Row:
        parts = {f"{k} x{dcg_runs}" if dcg_runs > 1 else k: dcg_runs * v for k, v in dcg.items()}
        parts[f"encoder fwd x{encodes}" if encodes > 1 else "encoder fwd"] = encodes * t["encoder"]
        parts[f"{steps} x denoiser MLP fwd"] = steps * t["denoiser MLP"]
        return Row(label, t[key], sum(parts.values()), parts)

    # eps_fn calls per chain: `official` with s steps makes s calls; ddim with s respaced indices makes s calls
    rows = [row(f"predict official {official_steps} steps", "official", official_steps),
            row(f"predict ddim {DDIM_STEPS} steps", "ddim", DDIM_STEPS),
            row(f"predict ours {compare_steps} steps", "ours", compare_steps),
            row(f"predict official-style {compare_steps} steps", "official-style", compare_steps, dcg_runs=2,
                encodes=compare_steps)]
    return rows, t["classifier"]


def run_config(name: str, device: torch.device, batch: int | None, repeats: int | None, quick: bool) -> dict:
    spec = SPECS[name]
    batch = batch or (4 if quick else spec["batch"][device.type])
    repeats = repeats or (1 if quick else spec["repeats"])
    steps = 20 if quick else COMPARE_STEPS  # (c) costs `steps` encoder passes per call: the bulk of a run
    b = setup_bench(spec, batch, device)
    train_rows, classifier_step_s = bench_train(b, repeats)
    predict_rows, classifier_fwd_s = bench_predict(b, spec["official_steps"], steps, repeats)
    rows = {r.label: r for r in train_rows + predict_rows}
    ours, official = predict_rows[2], predict_rows[3]
    backbone = spec["dcg"]["backbone"]
    ratios = {f"(a) train step / plain {backbone} train step, DCG joint": train_rows[0].time / classifier_step_s,
              f"(a) train step / plain {backbone} train step, DCG frozen": train_rows[1].time / classifier_step_s,
              f"(b) predict / plain {backbone} forward, official {spec['official_steps']} steps":
                  predict_rows[0].time / classifier_fwd_s,
              f"(b) predict / plain {backbone} forward, ddim {DDIM_STEPS} steps": predict_rows[1].time / classifier_fwd_s,
              f"(c) official-style / ours, {steps} steps": official.time / ours.time}
    return {"config": name, "device": str(device), "batch": batch, "repeats": repeats,
            "image_size": spec["image_size"], "num_classes": spec["num_classes"], "backbone": backbone,
            "feature_dim": spec["feature_dim"], "amp": "bf16" if device.type == "cuda" else "fp32",
            "classifier_train_step_s": classifier_step_s, "classifier_forward_s": classifier_fwd_s,
            "rows": [asdict(r) for r in rows.values()], "ratios": ratios}


def print_result(res: dict) -> None:
    b = res["batch"]
    print(f"\n== {res['config']}: {res['image_size']} px, batch {b}, {res['num_classes']} classes, DCG "
          f"{res['backbone']}, feature_dim {res['feature_dim']}, {res['device']} {res['amp']}, "
          f"median of {res['repeats']} ==")
    print(f"{'figure':<38}{'time ms':>10}{'floor ms':>10}{'time/floor':>11}{'ms/img':>9}{'img/s':>9}")
    base = [("plain classifier train step", res["classifier_train_step_s"]),
            ("plain classifier forward", res["classifier_forward_s"])]
    for label, s in base:
        print(f"{label:<38}{s * 1e3:>10.1f}{'-':>10}{'-':>11}{s * 1e3 / b:>9.2f}{b / s:>9.1f}")
    for r in res["rows"]:
        print(f"{r['label']:<38}{r['time'] * 1e3:>10.1f}{r['floor'] * 1e3:>10.1f}{r['time'] / r['floor']:>11.2f}"
              f"{r['time'] * 1e3 / b:>9.2f}{b / r['time']:>9.1f}")
    for r in res["rows"]:
        print(f"floor of {r['label']}: " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in r["parts"].items()) + " ms")
    for label, value in res["ratios"].items():
        print(f"{label}: {value:.2f}")
    within = sum(r["time"] <= 1.2 * r["floor"] for r in res["rows"])
    print(f"targets: time/floor <= 1.2 for {within}/{len(res['rows'])} figures; (c) >= 15 "
          f"({'paper config' if res['config'] == 'paper' else 'set for the paper config'}): "
          f"{list(res['ratios'].values())[-1]:.2f}")


def machine_busy_s() -> float:
    """CPU seconds all processes have spent so far (Linux /proc/stat; 0 elsewhere), to report others' load."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=("small", "paper", "both"), default="both")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, help="override the config's batch size")
    p.add_argument("--repeats", type=int, help="timed rounds per figure (median); default 7 small, 3 paper")
    p.add_argument("--quick", action="store_true", help="batch 4, 1 round, (c) at 20 steps: a smoke run")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    start, busy = time.perf_counter(), (machine_busy_s(), time.process_time())
    results = []
    for name in ("small", "paper") if args.config == "both" else (args.config,):
        results.append(run_config(name, device, args.batch, args.repeats, args.quick))
        print_result(results[-1])
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "timm": timm.__version__, "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "argv": sys.argv[1:],
            "total_s": time.perf_counter() - start}
    meta["others_cpu_share"] = max(0.0, machine_busy_s() - busy[0] - (time.process_time() - busy[1])) / (
        meta["total_s"] * (os.cpu_count() or 1))
    print(f"\ntotal {meta['total_s']:.0f} s, torch {meta['torch']}, {meta['cpu_threads']} threads"
          + (f", {meta['gpu']}" if meta["gpu"] else "") + f"; other processes used {meta['others_cpu_share']:.0%} of "
          f"the {os.cpu_count()} CPUs meanwhile (CPU timings are noisy when that is more than a few %)")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
