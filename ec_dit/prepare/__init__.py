"""Preparing a latent dataset: `python -m ec_dit.prepare` (see `ec_dit.prepare.writer`)."""
