"""The models: the DiT (PixArt-alpha blocks with EC-DiT FFNs), the trainable text encoder, and both together;
and DiT-MoE's class-conditional network (`config.model.arch = "dit_moe"`, `ec_dit.model.dit_moe`).

    from ec_dit.model import DiT, TextToImage, abstract_model

`abstract_model(config)` and `abstract_params(config)` are the one dispatch point
on `config.model.arch`: the text-to-image model ("ec_dit") or DiT-MoE ("dit_moe").
"""

from ec_dit.model import dit_moe, text_to_image
from ec_dit.model.dit import ContextCache, DiT, is_moe_layer
from ec_dit.model.text_encoder import TextEncoder
from ec_dit.model.text_to_image import TextToImage

__all__ = ["ContextCache", "DiT", "TextEncoder", "TextToImage", "abstract_model", "abstract_params", "is_class_cond",
           "is_moe_layer"]


def is_class_cond(config) -> bool:
  """True for the class-conditional DiT-MoE network (`config.model.arch == "dit_moe"`)."""
  return config.model.arch == "dit_moe"


def abstract_model(config, *, seed: int = 0):
  """The model of `config.model.arch` with ShapeDtypeStructs in place of arrays (no memory allocated)."""
  if is_class_cond(config):
    return dit_moe.abstract_model(config, seed=seed)
  return text_to_image.abstract_model(config, seed=seed)


def abstract_params(config) -> dict:
  """ShapeDtypeStructs of the parameters of `config.model.arch`'s model as a pure dict (checkpoint targets)."""
  if is_class_cond(config):
    return dit_moe.abstract_params(config)
  return text_to_image.abstract_params(config)
