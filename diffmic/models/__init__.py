from diffmic.models.dcg import DCG, DCGOutput, crop_rois, select_rois
from diffmic.models.denoiser import Denoiser
from diffmic.models.diffmic import DiffMIC, Prediction, Priors, build_model

__all__ = ["DCG", "DCGOutput", "Denoiser", "DiffMIC", "Prediction", "Priors", "build_model", "crop_rois",
           "select_rois"]
