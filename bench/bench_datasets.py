"""Two datasets searched at once against one after the other, on a local multi-node Ray cluster.

    python bench/bench_datasets.py [--samples 3] [--slots 2] [--json FILE] [-- extra Hydra overrides]

A Ray cluster of `--slots` worker nodes with 1 CPU each and a head with none (`ray.cluster_utils.Cluster`, every node
its own raylet) runs the same tiny two-dataset search (synthetic and synthetic with another pixel seed, `--samples`
trials each, search.max_concurrent_trials = `--slots`) twice, in the same process, with the same seeds, so the same
trials: (1) sequential: the search of each dataset on its own, one after the other, which is what `datasets=[a,b]`
did before; (2) concurrent: `datasets=[a,b]`, both at once sharing the slots. Prints the wall time of each and
their ratio, plus the busy share of the slots (trial-seconds ÷ (slots × wall)). No Pareto measurement, finalists,
export or report: the search itself is compared.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ["model.dcg.backbone=test_resnet", "model.denoiser.encoder=test_resnet", "model.dcg.pretrained=false",
        "dataset.image_size=32", "dataset.num_train=96", "dataset.num_test=32", "model.denoiser.feature_dim=32",
        "train.epochs=2", "train.dcg_pretrain_epochs=1", "train.batch_size=16", "train.eval_batch_size=64",
        "diffusion.sample_steps=5", "search.space.roi_count.choice=[1,2]", "search.scheduler=none",
        "search.pareto=[]", "search.finalists=0", "export=false", "report=false", "scaling.max_failures=0"]


def second_dataset(configs: Path) -> None:
    """synthetic_b: the synthetic dataset with another pixel seed, in a config dir of its own."""
    (configs / "dataset").mkdir(parents=True)
    (configs / "preset").mkdir()
    (configs / "search_preset").mkdir()
    text = (ROOT / "configs" / "dataset" / "synthetic.yaml").read_text()
    (configs / "dataset" / "synthetic_b.yaml").write_text(text.replace("\nseed: 0 ", "\nseed: 7 "))
    for group in ("preset", "search_preset"):
        shutil.copy(ROOT / "configs" / group / "synthetic.yaml", configs / group / "synthetic_b.yaml")


def run(datasets: list[str], name: str, storage: Path, configs: Path, extra: list[str]) -> tuple[float, float]:
    """One search invocation; (wall seconds, trial-seconds) from the summary's started_at / ended_at."""
    from hydra import compose, initialize_config_dir

    from diffmic.cli import to_plain
    from tune.record.experiment import Record
    from tune.stages.pipeline import search

    overrides = [f"datasets=[{','.join(datasets)}]", f"experiment={name}", f"storage.uri={storage}",
                 f"hydra.searchpath=[file://{configs}]", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = to_plain(compose(config_name="search", overrides=overrides))
        start = time.perf_counter()
        search(cfg, overrides)
        wall = time.perf_counter() - start
    summary = Record.at(str(storage / name)).read_table("summary")
    return wall, float((summary["ended_at"] - summary["started_at"]).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3, help="trials per dataset")
    ap.add_argument("--slots", type=int, default=2, help="worker nodes of 1 CPU = trials at once")
    ap.add_argument("--json")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every search")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    extra = [*TINY, f"search.num_samples={args.samples}", f"search.max_concurrent_trials={args.slots}", *args.extra]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(args.slots):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    figures = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            configs, storage = Path(tmp) / "configs", Path(tmp) / "results"
            second_dataset(configs)
            walls, busy = [], 0.0
            for i, dataset in enumerate(("synthetic", "synthetic_b")):
                wall, used = run([dataset], f"seq{i}", storage, configs, extra)
                walls.append(wall)
                busy += used
            figures["sequential_s"] = sum(walls)
            figures["sequential_busy"] = busy / (args.slots * sum(walls))
            wall, used = run(["synthetic", "synthetic_b"], "both", storage, configs, extra)
            figures["concurrent_s"] = wall
            figures["concurrent_busy"] = used / (args.slots * wall)
    finally:
        ray.shutdown()
        cluster.shutdown()
    figures["speedup"] = figures["sequential_s"] / figures["concurrent_s"]
    figures.update(samples=args.samples, slots=args.slots, machine=platform.platform(), cpus=os.cpu_count(),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(f"\n== two datasets x {args.samples} trials, {args.slots} one-CPU worker nodes ==")
    print(f"sequential (one dataset after the other): {figures['sequential_s']:7.1f} s, slots busy "
          f"{figures['sequential_busy']:.0%}")
    print(f"concurrent (both at once):                {figures['concurrent_s']:7.1f} s, slots busy "
          f"{figures['concurrent_busy']:.0%}")
    print(f"speed-up: {figures['speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
