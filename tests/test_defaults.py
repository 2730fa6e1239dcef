"""One owner for every default (issue 23): a config read back from an older checkpoint or bundle that lacks a key is
completed from configs/, or with what runs before the key did — never from a second default in code."""
import copy

import pytest

from diffmic.defaults import complete
from diffmic.models import build_model
from helpers import TINY, compose


def test_an_old_config_is_completed_from_the_yaml_not_from_code():
    cfg = compose(TINY)
    old = copy.deepcopy(cfg)
    del old["diffusion"]["beta_steps"], old["model"]["denoiser"]["output"], old["model"]["dcg"]["local_backbone"]
    done = complete(old)
    assert done["diffusion"]["beta_steps"] == 1000  # configs/diffusion/card.yaml (code used to read None)
    assert done["model"]["denoiser"]["output"] == "eps"  # what every run before the key was
    assert done["model"]["dcg"]["local_backbone"] is None
    assert done["model"]["dcg"]["roi_count"] == cfg["model"]["dcg"]["roi_count"]  # given keys stay as given
    model = build_model(done, 4, cfg["dataset"]["image_size"], initial_weights=False)
    fresh = build_model({**cfg, "diffusion": {**cfg["diffusion"], "beta_steps": 1000}}, 4,
                        cfg["dataset"]["image_size"], initial_weights=False)
    assert (model.schedule.betas == fresh.schedule.betas).all()
    with pytest.raises(KeyError):  # an incomplete config that was not completed is refused, not defaulted
        build_model(old, 4, cfg["dataset"]["image_size"], initial_weights=False)
