"""What Ray Train costs a DiffMIC run: steady-state epoch time through Ray Train (1 worker) ÷ the bare loop's, and
Ray Train's start-up time per run (from `fit()` to the first training step).

    python bench/bench_ray.py [--rounds N] [--threads N] [--epochs N] [--num-train N] [--json FILE]
                              [overrides ...]

Both sides run the same configuration (`preset/synthetic`, 64 px, `dataset.num_train=400`, 3 epochs, one DCG
pre-training epoch) through the one training loop `diffmic.engine.train`: the bare side with a `LocalSession` in this
process, the Ray side through `tune.train.distributed.build_trainer(...).fit()` (the trainer `python -m diffmic.train
scaling.num_workers=1` builds) on a local Ray started once (or the cluster at RAY_ADDRESS), storage in a temporary
local directory. The two sides alternate (bare, Ray, Ray, bare, …) so that load from other processes hits both alike.

(a) epoch time: `train_epoch_time_s` (the engine's own timer around the batches of one diffusion epoch) of epochs
    >= 2 on both sides — epoch 1 carries one-off costs (allocator, oneDNN kernel choice); median over all runs.
    Both sides use the same intra-op thread count (`--threads`; the Ray worker gets `resources_per_worker.CPU` =
    that and sets torch's threads to it, the bare side calls `torch.set_num_threads`).
(b) start-up: the Ray side's worker loop is `tune.train.distributed.train_loop_per_worker`'s three lines with a
    `RaySession` subclass whose data loader notes the wall-clock time of the first batch it hands to the loop
    (= the first training step) and adds it to every report; start-up = that time − the time just before
    `build_trainer(...).fit()`. It splits into Ray's part (until the worker's loop function begins), the project's
    imports in the fresh worker process (timm, torchvision), and the engine's set-up (data, model, optimizers, the
    same as in the bare loop, whose own `train()` → first step is shown beside it).
    Nothing in the project is patched. Ray's own start (`ray.init`) is reported separately; it is paid once per
    cluster, not per run.

Figures are reported, never pass/fail; targets: (a) <= 1.05, (b) <= 10 s on this machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: timm would retry its lookups for ~40 s
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from diffmic.compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()  # before timm (and torchvision) are imported

DEFAULTS = ["dataset=synthetic", "train.dcg_pretrain_epochs=1", "train.test_at_end=false",
            "train.checkpoint_every=1000"]  # one checkpoint (the last epoch's) per run on both sides


class FirstBatch:
    """A data loader that notes the wall-clock time of the first batch it yields (once per run)."""

    def __init__(self, loader, marks: dict):
        self.loader, self.marks = loader, marks

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # sampler, dataset, … (set_epoch looks for .sampler)
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            self.marks.setdefault("first_step_unix", time.time())
            yield batch


def timed_ray_loop(cfg: dict) -> None:
    """`tune.train.distributed.train_loop_per_worker` with a session that reports when the loop began and first stepped."""
    marks = {"loop_start_unix": time.time()}
    from diffmic.engine import train  # the project's imports (timm, torchvision) in a fresh worker process
    from diffmic.remote import localize
    from tune.train.distributed import RaySession

    marks["imported_unix"] = time.time()

    class TimedSession(RaySession):
        def prepare_loader(self, loader):
            return FirstBatch(super().prepare_loader(loader), marks)

        def report(self, metrics, state):
            times = marks.setdefault("epoch_times", [])
            times.append(metrics.get("train_epoch_time_s"))
            super().report({**metrics, "loop_start_unix": marks["loop_start_unix"],
                            "imported_unix": marks["imported_unix"], "first_step_unix": marks.get("first_step_unix"),
                            "epoch_times": ",".join(repr(t) for t in times)}, state)

    cpus = (cfg["scaling"].get("resources_per_worker") or {}).get("CPU")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    cfg = localize({**cfg, "dataset": {**cfg["dataset"], "verify_images": False}})
    train(cfg, TimedSession(amp=cfg["train"].get("amp", True)))


def cpu_times() -> tuple[int, int]:
    """(all, idle + iowait) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]


def compose(overrides: list[str]) -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from diffmic.cli import CONFIG_DIR
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return OmegaConf.to_container(hydra_compose("config", overrides=overrides), resolve=True)


def run_bare(cfg: dict, out: Path, threads: int) -> dict:
    from diffmic.engine import train
    from diffmic.session import LocalSession

    marks: dict = {}

    class TimedLocal(LocalSession):
        def prepare_loader(self, loader):
            return FirstBatch(super().prepare_loader(loader), marks)

    torch.set_num_threads(threads)
    start = time.time()
    result = train(cfg, TimedLocal(out, amp=cfg["train"]["amp"]))
    end = time.time()
    shutil.rmtree(out, ignore_errors=True)
    return {"side": "bare", "epoch_times": [r["train_epoch_time_s"] for r in result.history],
            "startup_s": marks["first_step_unix"] - start, "total_s": end - start}


def run_ray(cfg: dict, storage, name: str) -> dict:
    import tune.train.distributed as distributed

    distributed.train_loop_per_worker = timed_ray_loop  # build_trainer looks it up at call time
    start = time.time()
    result = distributed.build_trainer(cfg, storage, name).fit()
    end = time.time()
    if result.error:
        raise result.error
    m = result.metrics  # the last report with a checkpoint: the last epoch's, with every epoch's time
    return {"side": "ray", "epoch_times": [float(t) for t in m["epoch_times"].split(",")],
            "startup_s": m["first_step_unix"] - start, "ray_until_loop_s": m["loop_start_unix"] - start,
            "project_imports_s": m["imported_unix"] - m["loop_start_unix"],
            "setup_until_first_step_s": m["first_step_unix"] - m["imported_unix"], "total_s": end - start}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="runs per side (alternating order); default 2")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads on both sides (the worker's CPUs)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--num-train", type=int, default=400)
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    p.add_argument("overrides", nargs="*", help="more Hydra overrides for both sides")
    args = p.parse_args(argv)

    import ray

    from tune.train.distributed import init_ray
    from tune.storage import open_storage

    overrides = [*DEFAULTS, f"dataset.num_train={args.num_train}", f"train.epochs={args.epochs}",
                 "scaling.num_workers=1", f"scaling.resources_per_worker.CPU={args.threads}", *args.overrides]
    cfg = compose(overrides)
    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    storage = open_storage(str(work / "storage"))
    cpu0 = cpu_times()
    t0 = time.time()
    init_ray(cfg)
    ray_init_s = time.time() - t0
    print(f"ray.init: {ray_init_s:.1f} s ({'joined ' + os.environ['RAY_ADDRESS'] if os.environ.get('RAY_ADDRESS') else 'local'})",
          flush=True)
    runs: list[dict] = []
    try:
        for r in range(args.rounds):
            order = ("bare", "ray") if r % 2 == 0 else ("ray", "bare")
            for side in order:
                res = (run_bare(cfg, work / f"bare-{r}", args.threads) if side == "bare"
                       else run_ray(cfg, storage, f"run-{r}"))
                res["round"] = r
                runs.append(res)
                print(f"round {r} {side:4s}: epochs {', '.join(f'{t:.2f}' for t in res['epoch_times'])} s; "
                      f"start-up {res['startup_s']:.1f} s; total {res['total_s']:.1f} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    steady = {side: [t for res in runs if res["side"] == side for t in res["epoch_times"][1:]] for side in ("bare", "ray")}
    bare_epoch, ray_epoch = statistics.median(steady["bare"]), statistics.median(steady["ray"])
    ray_runs = [res for res in runs if res["side"] == "ray"]
    bare_runs = [res for res in runs if res["side"] == "bare"]
    figures = {
        "epoch_time_bare_s": bare_epoch, "epoch_time_ray_s": ray_epoch, "epoch_ratio": ray_epoch / bare_epoch,
        "startup_ray_s": [res["startup_s"] for res in ray_runs],
        "startup_ray_median_s": statistics.median(res["startup_s"] for res in ray_runs),
        "ray_until_loop_s": [res["ray_until_loop_s"] for res in ray_runs],
        "project_imports_s": [res["project_imports_s"] for res in ray_runs],
        "setup_until_first_step_s": [res["setup_until_first_step_s"] for res in ray_runs],
        "startup_bare_s": [res["startup_s"] for res in bare_runs],
        "ray_init_s": ray_init_s,
    }
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__, "ray": ray.__version__,
            "threads": args.threads, "rounds": args.rounds, "overrides": overrides}
    print(f"(a) steady-state epoch (epochs >= 2, median of {len(steady['ray'])} vs {len(steady['bare'])}): "
          f"Ray Train {ray_epoch:.2f} s / bare {bare_epoch:.2f} s = {figures['epoch_ratio']:.3f}  (target <= 1.05)")
    print(f"(b) Ray Train start-up, fit() -> first step: "
          f"{', '.join(f'{s:.1f}' for s in figures['startup_ray_s'])} s (median {figures['startup_ray_median_s']:.1f} s; "
          f"target <= 10 s) = Ray until the worker loop {', '.join(f'{s:.1f}' for s in figures['ray_until_loop_s'])} s "
          f"+ the project's imports in the worker {', '.join(f'{s:.1f}' for s in figures['project_imports_s'])} s "
          f"+ engine set-up {', '.join(f'{s:.1f}' for s in figures['setup_until_first_step_s'])} s; bare loop "
          f"train() -> first step {', '.join(f'{s:.1f}' for s in figures['startup_bare_s'])} s; "
          f"ray.init once {ray_init_s:.1f} s")
    cpu1 = cpu_times()
    figures["machine_busy"] = 1 - (cpu1[1] - cpu0[1]) / max(cpu1[0] - cpu0[0], 1)
    print(f"machine CPU busy during the run (all processes, this one included): {figures['machine_busy']:.0%}; "
          f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    out = {"meta": meta, "figures": figures, "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
