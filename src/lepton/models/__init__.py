"""Model stage: one registry of networks and one factory, ``create_model``."""

from lepton.models.registry import ModelInfo, create_model, head_parameters, list_models, register_model

__all__ = ["ModelInfo", "create_model", "head_parameters", "list_models", "register_model"]
