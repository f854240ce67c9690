"""The models: the DiT (PixArt-alpha blocks with EC-DiT FFNs), the trainable text encoder, and both together;
and DiT-MoE's class-conditional network (`ec_dit.model.dit_moe`).

    from ec_dit.model import DiT, TextToImage

Which network a config trains is the task's choice (`ec_dit.tasks.task_for(config).abstract_model`),
not the model package's: model code never reads `config.model.arch`.
"""

from ec_dit.model import dit_moe, text_to_image
from ec_dit.model.dit import ContextCache, DiT, is_moe_layer
from ec_dit.model.text_encoder import TextEncoder
from ec_dit.model.text_to_image import TextToImage

__all__ = ["ContextCache", "DiT", "TextEncoder", "TextToImage", "dit_moe", "is_moe_layer", "text_to_image"]
