"""Importers of other libraries' checkpoints into ec-dit run directories: `python -m ec_dit.convert FORMAT ...`.

Formats: `dit_moe` (feizc/DiT-MoE's class-conditional checkpoints; `ec_dit.convert.dit_moe`),
`pixart` (diffusers' PixArtTransformer2DModel folders; `ec_dit.convert.pixart`) and `dit`
(facebookresearch/DiT state dicts or diffusers' DiTTransformer2DModel folders; `ec_dit.convert.dit`).

    from ec_dit.convert import pixart, dit
    model, config = pixart.load(folder)
    model, config = dit.load(path_or_folder)
"""
