"""bench/bench_core.py: a quick run prints every figure with its floor and every ratio (timings are not checked)."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"\d+(?:\.\d+)?"
FIGURES = ("train step, DCG joint", "train step, DCG frozen", "predict official 20 steps", "predict ddim 10 steps",
           "predict ours 20 steps", "predict official-style 20 steps")
RATIOS = (r"\(a\) train step / plain resnet18 train step, DCG joint", r"\(a\) train step / plain resnet18 train step, "
          r"DCG frozen", r"\(b\) predict / plain resnet18 forward, official 20 steps",
          r"\(b\) predict / plain resnet18 forward, ddim 10 steps", r"\(c\) official-style / ours, 20 steps")


@pytest.mark.slow
def test_quick_bench_prints_every_ratio_and_floor(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_core.py"), "--quick", "--config", "small",
                           "--json", str(out)], capture_output=True, text=True, timeout=1200, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for label in FIGURES:  # time, floor, time/floor, ms/img, img/s
        assert re.search(rf"^{re.escape(label)}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", text, re.M), label
        assert re.search(rf"^floor of {re.escape(label)}: .*denoiser MLP.* ms$", text, re.M), label
    for label in RATIOS:
        assert re.search(rf"^{label}: {NUMBER}$", text, re.M), label
    assert re.search(rf"^targets: time/floor <= 1\.2 for \d/6 figures; \(c\) >= 15 .*: {NUMBER}$", text, re.M)

    rows = json.loads(out.read_text())["results"][0]["rows"]
    assert [r["label"] for r in rows] == list(FIGURES)
    for r in rows:  # a floor is the sum of its parts, each a positive time
        assert all(v > 0 for v in r["parts"].values()) and math.isclose(r["floor"], sum(r["parts"].values()))


@pytest.mark.slow  # about 30 s: images of the real sets' sizes decoded side by side
def test_quick_loader_bench_writes_its_figures(tmp_path):
    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_data.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    for key in ("uncached_img_per_s_per_core", "cached_img_per_s_per_core", "cache_speedup_per_core",
                "draft_speedup_per_core", "trial_loader_img_per_s", "gpu_img_per_s_estimate"):
        assert isinstance(figures[key], (int, float)) and figures[key] > 0, key
    assert "estimate" in figures["gpu_estimate_basis"] and "cache" in proc.stdout


@pytest.mark.slow  # about a minute: three torch.compile variants on a CPU
def test_the_gpu_step_script_runs_every_variant_a_cpu_can(tmp_path):
    """bench_gpu.py waits for a GPU session; its CPU smoke run keeps it working until then."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--device", "cpu", "--quick",
                           "--config", "small", "--json", str(out)], capture_output=True, text=True, timeout=900,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["train step, DCG joint", "predict official 5 steps", "predict ddim 10 steps"]
    for group in results.values():
        assert set(group["errors"]) <= {"chain as one CUDA graph"}, group["errors"]  # CUDA only
        assert group["times"]["eager"] > 0 and all(t > 0 for t in group["times"].values())
        for name, diff in group["checks"].items():  # every compiled variant computes what eager computes
            assert diff is None or diff < 1e-3, (name, diff)
