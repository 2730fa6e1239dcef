"""The model a config describes: `model.kind` picks DiffMIC (v1) or DiffMIC-v2; both share the DCG and its knobs."""
from __future__ import annotations

from torch import nn

from diffmic.choices import KINDS
from diffmic.diffusion import NoiseSchedule
from diffmic.models.dcg import DCG
from diffmic.models.denoiser import Denoiser
from diffmic.models.diffmic import DiffMIC
from diffmic.models.diffmic_v2 import DenoiserV2, DiffMICv2



def build_model(cfg: dict, num_classes: int, image_size: int, initial_weights: bool = True) -> nn.Module:
    """The model described by the `model` and `diffusion` config sections (plain dicts).

    `initial_weights=False` skips the pretrained / weights-file initialisation: for loading trained weights.
    """
    m, d = cfg["model"], cfg["diffusion"]
    if m["kind"] not in KINDS:
        raise ValueError(f"model.kind={m['kind']!r}: expected one of {', '.join(KINDS)}")
    dcg_cfg, den_cfg = m["dcg"], m["denoiser"]

    def init(c: dict) -> dict:
        return {"pretrained": bool(c["pretrained"]) and initial_weights,
                "weights": c["weights"] if initial_weights else None}

    dcg = DCG(num_classes, image_size, backbone=dcg_cfg["backbone"], local_backbone=dcg_cfg["local_backbone"],
              **init(dcg_cfg), output_stride=dcg_cfg["output_stride"], roi_count=dcg_cfg["roi_count"],
              crop_size=dcg_cfg["crop_size"], top_t=dcg_cfg["top_t"],
              roi_mode=dcg_cfg["roi_mode"], crop_channels=dcg_cfg["crop_channels"],
              fusion_weight=dcg_cfg["fusion_weight"])
    schedule = NoiseSchedule(d["schedule"], d["timesteps"], d["beta_start"], d["beta_end"],
                             beta_steps=d["beta_steps"])
    if m["kind"] == "diffmic_v2":
        grid = den_cfg["grid"] or dcg_cfg["roi_count"]  # null: Np = K, as the official code ties them
        denoiser = DenoiserV2(num_classes, d["timesteps"], dcg_cfg["roi_count"], encoder=den_cfg["encoder"],
                              roi_encoder=den_cfg["roi_encoder"] or den_cfg["encoder"],
                              feature_dim=den_cfg["feature_dim"],
                              **init(den_cfg))
        return DiffMICv2(dcg, denoiser, schedule, num_classes, grid=grid, guidance=den_cfg["guidance"],
                         start=den_cfg["start"], focal_alpha=float(den_cfg["focal_alpha"]),
                         crop_channels=dcg_cfg["crop_channels"], output=den_cfg["output"])
    denoiser = Denoiser(num_classes, d["timesteps"], encoder=den_cfg["encoder"], feature_dim=den_cfg["feature_dim"],
                        **init(den_cfg), embedding_bias=den_cfg["embedding_bias"])
    # (a config read back from an older checkpoint or bundle is completed first: diffmic/defaults.py)
    return DiffMIC(dcg, denoiser, schedule, num_classes, output=den_cfg["output"])
