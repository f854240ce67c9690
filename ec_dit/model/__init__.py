"""The models: the DiT (PixArt-alpha blocks with EC-DiT FFNs), the trainable text encoder, and both together.

    from ec_dit.model import DiT, TextToImage, abstract_model
"""

from ec_dit.model.dit import ContextCache, DiT, is_moe_layer
from ec_dit.model.text_encoder import TextEncoder
from ec_dit.model.text_to_image import TextToImage, abstract_model, abstract_params

__all__ = ["ContextCache", "DiT", "TextEncoder", "TextToImage", "abstract_model", "abstract_params", "is_moe_layer"]
