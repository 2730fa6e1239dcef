"""Every option of every config group composes, and the composed configs pass validation."""
import pytest

from diffmic.cli import CONFIG_DIR
from diffmic.config import ConfigError, validate_config

from helpers import compose

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONFIG_DIR.iterdir() if g.is_dir()}


# groups chosen by another group's choice, not on the command line: the option is that group's option
FOLLOWS = {"model_sampler": "model", "search_model": "model"}
SEARCH_ONLY = ("search", "tracking", "search_model")


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() if g not in ("preset", "search_preset") for o in opts])
def test_every_group_option_composes(group, option):
    overrides = [f"{FOLLOWS.get(group, group)}={option}"]
    if group == "storage" and option == "s3":
        overrides.append("storage.uri=s3://bucket/prefix")
    cfg = compose(overrides, "search" if group in SEARCH_ONLY else "config")  # groups of searches only
    if group not in SEARCH_ONLY:
        validate_config(cfg)  # raises on a bad value
    assert {"dataset", "model", "diffusion", "train", "storage"} <= set(cfg)  # the whole config, with the option


def test_search_preset_applies_to_searches_only():
    search, single = compose([], "search"), compose([])
    assert search["dataset"]["image_size"] == 48 and search["model"]["dcg"]["backbone"] == "resnet10t"
    assert single["dataset"]["image_size"] == 64 and single["model"]["dcg"]["backbone"] == "resnet18"
    validate_config(search)
    assert compose(["dataset=isic2018"], "search")["dataset"]["image_size"] == 224  # no search preset: unchanged


def test_dataset_preset_follows_the_dataset():
    assert compose([])["model"]["dcg"]["backbone"] == "resnet18"  # synthetic preset
    isic = compose(["dataset=isic2018"])
    assert isic["model"]["dcg"]["backbone"] == "resnet50.tv_in1k" and isic["model"]["dcg"]["pretrained"] is True
    assert isic["diffusion"]["sample_steps"] == 250
    assert isic["model"]["denoiser"]["feature_dim"] == 6144 and isic["train"]["epochs"] == 1000


def test_search_config_has_the_default_space():
    cfg = compose([], "search")
    keys = {p["key"] for p in cfg["search"]["space"].values()}
    assert keys == {"diffusion.timesteps", "diffusion.schedule", "train.mmd_weight", "model.dcg.roi_count"}
    assert cfg["train"]["test_at_end"] is False and cfg["scaling"]["num_workers"] == 1


@pytest.mark.parametrize("override,message", [
    ("diffusion.sample_steps=2000", "diffusion.sample_steps=2000: expected null (all 100 steps) or an integer in 1..100"),
    ("diffusion.timesteps=10", "diffusion.beta_steps=1000: expected null or an integer >= 1 with beta_end * beta_steps"),
    ("train.epochs=0", "train.epochs=0: expected an integer >= 1"),
    ("diffusion.schedule=nope", "diffusion.schedule='nope': expected one of linear"),
    ("train.mmd_weight=-1", "train.mmd_weight=-1: expected a weight >= 0"),
    ("diffusion.schedule=jsd", "diffusion.schedule='jsd': expected one of linear"),
    ("train.select_mode=best", "train.select_mode='best': expected max or min"),
    ("model.dcg.crop_size=100", "model.dcg.crop_size=100: expected null (one CAM cell) or an integer in 1..64"),
])
def test_impossible_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as e:
        validate_config(compose([override]))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("program", [["-m", "diffmic.train"], ["tune/search.py"]])
def test_print_config_flag(program):
    """`--cfg job` (config.yaml and the README: "Print the composed config") prints the config; its value is not an
    override for the one-line override check. Also shows v2's own defaults: DDIM-10 and a frozen DCG."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, *program, "model=diffmic_v2", "--cfg", "job"], capture_output=True,
                       text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-1500:]
    assert "kind: diffmic_v2" in r.stdout and "joint_dcg: false" in r.stdout, r.stdout[-1500:]
