"""The paper configuration's step on a GPU, and what torch.compile and CUDA graphs change, side by side in one run.

    python bench/bench_gpu.py [--device cuda|cpu] [--config paper|small] [--batch N] [--repeats N] [--quick]
                              [--json FILE]

At the paper config (ResNet-50 DCG, ResNet-18 encoder, 6144-wide denoiser, 224 px, batch 64 on CUDA, bf16 autocast,
channels_last, cudnn.benchmark: as `engine.train` runs), each figure a median of round-robin rounds after a warm-up:

  train step, DCG joint     eager | the denoiser compiled (torch.compile, default mode)
  predict official 250 / ddim 10 steps
                            eager (f(x) once, as `DiffMIC.predict`) | the denoiser compiled | the denoiser compiled
                            with mode="reduce-overhead" (a CUDA graph per call) | the whole chain captured as one CUDA
                            graph (the DCG and the encoder eager, then one replay) | for ddim, the chain compiled as a
                            whole (the 10-step loop unrolled) | for official, the official code's loop (the DCG
                            twice, f(x) re-encoded at every step)

Every variant is checked against eager on the same inputs (max |difference| of the denoiser's output or of the
chain's y0 with the same seed; compiled random ops fall back to eager's generator for that), so a faster variant that
computes something else shows; the official code's loop is not compared (it draws its noise in another order). A variant that cannot run here
(no compiler, no CUDA for graphs) is reported with its error and the run goes on. Ratios are reported, never pass/fail.
On a CPU (`--device cpu --quick`) it checks that the script runs; the figures that matter are a GPU's.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_core, run from a checkout

import torch  # noqa: E402

from bench_core import (DDIM_STEPS, SPECS, official_style_predict, setup_bench, time_round_robin,  # noqa: E402
                        train_mode, train_step)
from diffmic.diffusion import sample  # noqa: E402


def chain_fn(model, embedding: torch.Tensor, prior: torch.Tensor, sampler: str, steps: int,
             denoiser: Callable) -> Callable[[], torch.Tensor]:
    """The reverse chain of `DiffMIC.predict` on a given embedding and prior, with `denoiser` for its ε̂."""
    def eps_fn(y_t: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return denoiser(embedding, y_t.to(embedding.dtype), p.to(embedding.dtype), t).float()
    return lambda: sample(model.schedule, eps_fn, prior, sampler, steps)


class Unavailable(RuntimeError):
    """A variant this machine cannot run (reported without a traceback)."""


class Variants:
    """Named (setup, fn) pairs for time_round_robin, and a check per name; a variant that fails to build is kept
    as its error."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[Callable | None, Callable]] = {}
        self.checks: dict[str, float | None] = {}  # None: not compared (computes something else by design)
        self.errors: dict[str, str] = {}

    def add(self, name: str, build: Callable[[], tuple[Callable | None, Callable, Callable[[], float] | None]]) -> None:
        try:
            setup, fn, check = build()
            if setup:
                setup()
            fn()  # compiles / captures here, untimed
            self.checks[name] = check() if check else None
            self.items[name] = (setup, fn)
        except Exception as e:  # noqa: BLE001 - a variant's failure is a result, not the end of the run
            self.errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            if not isinstance(e, Unavailable):
                traceback.print_exc(limit=3)


def bench_train(b, repeats: int) -> dict:
    m = b.model
    eager_forward = m.denoiser.forward
    compiled_forward = torch.compile(eager_forward)

    def use(forward: Callable) -> Callable[[], None]:
        def setup() -> None:
            train_mode(m, True)
            m.denoiser.forward = forward  # DiffMIC.loss calls self.denoiser(...): the instance attribute wins
        return setup

    def check() -> float:  # the compiled denoiser against the eager one, train mode, same inputs
        n, c = len(b.x), m.num_classes
        g = torch.Generator(device=b.x.device).manual_seed(0)
        args = (torch.randn(n, m.denoiser.out.in_features, generator=g, device=b.x.device),
                torch.randn(n, c, generator=g, device=b.x.device), torch.rand(n, c, generator=g, device=b.x.device),
                torch.randint(0, 1000, (n,), generator=g, device=b.x.device))
        m.eval()  # BatchNorm's running statistics: the same on both sides
        with torch.no_grad(), b.autocast():
            diff = (compiled_forward(*args).float() - eager_forward(*args).float()).abs().max().item()
        m.train()
        return diff

    v = Variants()
    v.add("eager", lambda: (use(eager_forward), lambda: train_step(b, True), lambda: 0.0))
    v.add("denoiser compiled", lambda: (use(compiled_forward), lambda: train_step(b, True), check))
    times = time_round_robin(v.items, repeats, b.sync) if v.items else {}
    vars(m.denoiser).pop("forward", None)  # back to the class's method
    return {"times": times, "checks": v.checks, "errors": v.errors}


def bench_predict(b, sampler: str, steps: int, repeats: int) -> dict:
    m, x, cuda = b.model, b.x, b.x.device.type == "cuda"
    m.eval()
    with torch.no_grad(), b.autocast():
        embedding, prior = m.denoiser.encode(x), m.priors(x).fused

    def eager_inputs() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), b.autocast():
            return m.denoiser.encode(x), m.priors(x).fused

    def run_chain(denoiser: Callable) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad(), b.autocast():
                chain_fn(m, *eager_inputs(), sampler, steps, denoiser)()
        return go

    def seeded(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        torch.manual_seed(0)
        with torch.no_grad(), b.autocast():
            return fn().float()

    reference = seeded(chain_fn(m, embedding, prior, sampler, steps, m.denoiser))

    def compiled(mode: str | None):
        def build():
            den = torch.compile(m.denoiser, **({"mode": mode} if mode else {}))
            check = lambda: (seeded(chain_fn(m, embedding, prior, sampler, steps, den)) - reference).abs().max().item()  # noqa: E731
            return None, run_chain(den), check
        return build

    def graphed():
        """The chain from the embedding and the prior on, captured once as a CUDA graph (its noise drawn inside
        it from the default generator, so a seeded replay draws what a seeded eager chain draws)."""
        if not cuda:
            raise Unavailable("CUDA graphs need a CUDA device")
        static_emb, static_prior = embedding.clone(), prior.clone()
        chain = chain_fn(m, static_emb, static_prior, sampler, steps, m.denoiser)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False):
            chain()  # warm-up off the capture stream, as torch.cuda.graphs asks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, cache_enabled=False), torch.cuda.graph(graph):
            out = chain()

        def go() -> None:
            emb, pri = eager_inputs()
            static_emb.copy_(emb)
            static_prior.copy_(pri)
            graph.replay()

        def check() -> float:
            static_emb.copy_(embedding)
            static_prior.copy_(prior)
            torch.manual_seed(0)
            graph.replay()
            return (out.float() - reference).abs().max().item()
        return None, go, check

    def chain_compiled():
        whole = torch.compile(lambda e, p: chain_fn(m, e, p, sampler, steps, m.denoiser)())

        def go() -> None:
            with torch.no_grad(), b.autocast():
                whole(*eager_inputs())
        return None, go, lambda: (seeded(lambda: whole(embedding, prior)) - reference).abs().max().item()

    def official_style():
        def go() -> None:
            with b.autocast():
                official_style_predict(m, x, steps)
        return None, go, None

    v = Variants()
    v.add("eager", lambda: (None, run_chain(m.denoiser), lambda: 0.0))
    v.add("denoiser compiled", compiled(None))
    v.add("denoiser compiled, reduce-overhead", compiled("reduce-overhead"))
    v.add("chain as one CUDA graph", graphed)
    if sampler == "ddim":  # unrolling the official 250-step loop would take dynamo minutes to trace
        v.add("chain compiled", chain_compiled)
    else:  # the official code has no DDIM
        v.add("official code's loop (f(x) every step)", official_style)
    times = time_round_robin(v.items, repeats, b.sync) if v.items else {}
    return {"times": times, "checks": v.checks, "errors": v.errors}


def print_group(title: str, res: dict, batch: int) -> None:
    print(f"\n{title}")
    eager = res["times"].get("eager")
    print(f"  {'variant':<42}{'ms/batch':>10}{'img/s':>9}{'x eager':>9}{'max |diff|':>12}")
    for name, t in res["times"].items():
        ratio = f"{eager / t:.2f}" if eager else "-"
        diff = res["checks"].get(name)
        print(f"  {name:<42}{t * 1e3:>10.1f}{batch / t:>9.1f}{ratio:>9}{'-' if diff is None else f'{diff:.2e}':>12}")
    for name, err in res["errors"].items():
        print(f"  {name:<42}not run: {err}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--config", choices=("paper", "small"), default="paper")
    p.add_argument("--batch", type=int, help="default: the config's (64 on CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per figure (median)")
    p.add_argument("--quick", action="store_true", help="batch 2, 1 round, 5 official steps: does the script run")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    args = p.parse_args(argv)
    # Compiled random ops draw what eager draws (inductor's own generator would not), so a seeded compiled chain can be
    # compared with the seeded eager one.
    import torch._inductor.config as inductor_config
    inductor_config.fallback_random = True
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible (--device cpu --quick checks the script on a CPU)")
    spec = SPECS[args.config]
    batch = args.batch or (2 if args.quick else spec["batch"][device.type])
    repeats = 1 if args.quick else args.repeats
    official_steps = 5 if args.quick else spec["official_steps"]
    start = time.perf_counter()
    b = setup_bench(spec, batch, device)
    results = {"train step, DCG joint": bench_train(b, repeats),
               f"predict official {official_steps} steps": bench_predict(b, "official", official_steps, repeats),
               f"predict ddim {DDIM_STEPS} steps": bench_predict(b, "ddim", DDIM_STEPS, repeats)}
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "config": args.config, "batch": batch, "repeats": repeats, "image_size": spec["image_size"],
            "amp": "bf16" if device.type == "cuda" else "fp32", "platform": platform.platform(),
            "argv": sys.argv[1:]}
    print(f"== {args.config}: {spec['image_size']} px, batch {batch}, {meta['gpu'] or device}, {meta['amp']}, "
          f"channels_last {device.type == 'cuda'}, median of {repeats} ==")
    for title, res in results.items():
        print_group(title, res, batch)
    meta["total_s"] = time.perf_counter() - start
    print(f"\ntotal {meta['total_s']:.0f} s, torch {meta['torch']}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
