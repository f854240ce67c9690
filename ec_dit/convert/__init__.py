"""Importers of other libraries' checkpoints into ec-dit run directories: `python -m ec_dit.convert FORMAT ...`.

Formats: `dit_moe` (feizc/DiT-MoE's class-conditional checkpoints; `ec_dit.convert.dit_moe`).
"""
