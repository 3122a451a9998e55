"""Model stage: one registry of networks and one factory, ``create_model``."""

from lepton.models.factory import create_model, head_parameters, list_models, model_info
from lepton.models.registry import ModelInfo, register_model

__all__ = ["ModelInfo", "create_model", "head_parameters", "list_models", "model_info", "register_model"]
