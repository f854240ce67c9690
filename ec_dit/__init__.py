"""ec-dit: diffusion transformers with expert-choice Mixture-of-Experts (EC-DiT) in JAX/Flax NNX."""

__version__ = "0.1.0"
