"""The model layer: timm ViT adapter (load, describe, count), demo models and their shipped
checkpoint, and hook-based gates (the masked model that surgery is verified against)."""
from .vit import (SUPPORTED_HINT, count_model, describe, load_model, model_kwargs_of, nonblock_params,
                  preprocessing_of, read_checkpoint)

__all__ = ["SUPPORTED_HINT", "count_model", "describe", "load_model", "model_kwargs_of", "nonblock_params",
           "preprocessing_of", "read_checkpoint"]
