from diffmic.models.dcg import DCG, DCGOutput, crop_rois, select_rois
from diffmic.models.denoiser import Denoiser
from diffmic.choices import KINDS
from diffmic.models.build import build_model
from diffmic.models.diffmic import DiffMIC, Prediction, Priors
from diffmic.models.diffmic_v2 import DiffMICv2

__all__ = ["DCG", "DCGOutput", "Denoiser", "DiffMIC", "DiffMICv2", "KINDS", "Prediction", "Priors", "build_model", "crop_rois",
           "select_rois"]
