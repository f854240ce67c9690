"""Inference in the habit of diffusers pipelines: load a run, call it with prompts, get images.

This module is the text front end; `inference.class_to_image` is the class-conditional one and
`inference.pipeline` the core both share (sampling, batching, decoding, from the run's task).

    from ec_dit.inference import TextToImagePipeline
    pipe = TextToImagePipeline.from_run("runs/tiny")
    out = pipe("a photo of a red circle", num_inference_steps=32, guidance_scale=3.0, generator=0,
               num_images_per_prompt=4)
    out.images                                      # 4 PIL images (output_type="np": uint8 [H, W, 3] arrays)
    arrays = pipe.generate(["a photo of two blue squares"], seed=0)   # uint8 [N, H, W, 3]
"""

from __future__ import annotations

import os
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ec_dit import configs, diffusion, images as images_lib, schema, tasks, tokenizer as tokenizer_lib
from ec_dit.inference import pipeline as sampling_pipeline
from ec_dit.encoders.frozen import FrozenEncoders


load_run_config = configs.from_run  # the config a run was trained with (workdir/config.json)
base_key = sampling_pipeline.base_key


@dataclasses.dataclass
class ImagePipelineOutput:
  """What `TextToImagePipeline.__call__` returns, as diffusers' pipelines do: `.images`, a list of PIL images
  (`output_type="pil"`) or of uint8 [H, W, 3] arrays (`output_type="np"`), prompt-major."""
  images: list[Any]


SAMPLER_SETTINGS = ("num_steps", "guidance_scale", "guidance_parallel", "sampler")


def sampler_settings(sample) -> dict:
  """The `TextToImagePipeline.generate` keyword arguments a `config.sample` section sets."""
  return {name: sample[name] for name in SAMPLER_SETTINGS}


def resolve_sampler_settings(sample, num_steps=None, guidance_scale=None, guidance_parallel=None,
                             sampler=None) -> tuple[int, float, float, str]:
  """(num_steps, guidance_scale, guidance_parallel, sampler): the given values, each None from `config.sample`."""
  return (int(num_steps or sample.num_steps),
          float(sample.guidance_scale if guidance_scale is None else guidance_scale),
          float(sample.guidance_parallel if guidance_parallel is None else guidance_parallel),
          sampler or sample.sampler)


class TextToImagePipeline(sampling_pipeline.SamplingPipeline):
  """Prompts in, images out: the text front end of `ec_dit.inference.pipeline.SamplingPipeline`. Sampling is
  jitted once per batch size and deterministic per seed.

  A latent run (`config.text.encoder = "t5"`) encodes the prompts with T5 (loaded
  once from `config.encoders.t5_path`), samples latents with the text K/V cached,
  and decodes them with the VAE (`config.encoders.vae_path`).

  Args:
    config: the run's config.
    params: the model parameters (a pure dict, normally the EMA weights).
    batch_size: images per jitted call; prompts are padded to it, so any number
      of prompts compiles once.
    encoders: a latent run's `FrozenEncoders` (default: loaded from `config.encoders`).
  """

  conditioning = tasks.TEXT

  def __init__(self, config, params, *, batch_size: int = 16, encoders: FrozenEncoders | None = None):
    super().__init__(config, params, batch_size=batch_size)
    self.latent = config.text.encoder == "t5"
    if self.latent:
      self.encoders = encoders or FrozenEncoders.from_config(config.encoders, context_len=config.model.context_len)
    else:
      self.tokenizer = tokenizer_lib.tokenizer_from_config(config)

  @classmethod
  def from_run(cls, workdir: str, *, step: int | None = None, batch_size: int = 16,
               encoders_config=None) -> "TextToImagePipeline":
    """Loads the EMA weights of the latest (or given) checkpoint of a training run.

    `encoders_config` (a `config.encoders` section) replaces the run's encoder paths,
    e.g. when the checkpoints now sit elsewhere.
    """
    config, params = sampling_pipeline.restore_run(workdir, step=step, encoders_config=encoders_config)
    return cls(config, params, batch_size=batch_size)

  def encode_prompts(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(text input [B, L] ids or [B, L, d] T5 features, mask [B, L]) of the prompts."""
    if self.latent:
      features, mask, _, _ = self.encoders.text_features(prompts)
      return features, mask
    return self.tokenizer.encode_batch(prompts)

  def to_images(self, samples: jax.Array) -> np.ndarray:
    """Samples in the model's space -> uint8 images (VAE-decoded for a latent run)."""
    return self.task.decode(self.config, samples, self.encoders if self.latent else None)

  def generate(self, prompts: Sequence[str], *, num_images_per_prompt: int = 1, seed: int | jax.Array = 0,
               num_steps: int | None = None, guidance_scale: float | None = None,
               guidance_parallel: float | None = None, sampler: str | None = None,
               first_index: int = 0) -> np.ndarray:
    """uint8 images [len(prompts) * num_images_per_prompt, H, W, C], prompt-major order.

    Image j of prompt i depends only on (seed, first_index + i, j), the prompt and
    the weights, not on the batch it was generated in. Sampler settings left as None
    come from `config.sample` (see `diffusion.sample` for their meaning). `seed` may
    also be a JAX key (see `base_key`).
    """
    num_steps, guidance_scale, guidance_parallel, sampler = resolve_sampler_settings(
        self.config.sample, num_steps, guidance_scale, guidance_parallel, sampler)
    allowed = schema.DDPM_SAMPLERS if self.config.model.prediction == "epsilon" else diffusion.SAMPLERS
    if sampler not in allowed:
      raise ValueError(f"sampler must be one of {allowed}, got {sampler!r}")
    null = None
    if self.config.model.prediction == "epsilon" and self.latent:  # PixArt's unconditional text: T5 of ""
      features, null_mask = self.encode_prompts([""])
      null = (jnp.asarray(features[0]), jnp.asarray(null_mask[0]))
    if isinstance(prompts, str):
      prompts = [prompts]
    root = base_key(seed)
    jobs = [(first_index + i, j, p) for i, p in enumerate(prompts) for j in range(num_images_per_prompt)]
    # one noise key per image, from (seed, prompt, sample): independent of batching
    keys = [jax.random.fold_in(jax.random.fold_in(root, i), j) for i, j, _ in jobs]

    def condition(batch_prompts, batch_keys):
      tokens, mask = self.encode_prompts(batch_prompts)
      return (jnp.asarray(tokens), jnp.asarray(mask), null), batch_keys

    settings = dict(num_steps=num_steps, guidance_scale=guidance_scale, guidance_parallel=guidance_parallel,
                    sampler=sampler)
    out = self._generate([p for _, _, p in jobs], keys, settings, condition, self.to_images)
    if not out:
      size = self.config.input.image_size if self.latent else self.image_shape[0]
      return np.zeros((0, size, size, 3 if self.latent else self.image_shape[2]), np.uint8)
    return np.concatenate(out)

  def __call__(self, prompt: Sequence[str] | str, *, num_inference_steps: int | None = None,
               guidance_scale: float | None = None, generator=0, num_images_per_prompt: int = 1,
               output_type: str = "pil", return_dict: bool = True, **kwargs):
    """diffusers' call: `ImagePipelineOutput` with `.images` (or the tuple `(images,)` with `return_dict=False`).

    `num_inference_steps` and `guidance_scale` default to the run's `config.sample`; `generator` is an
    int seed or a JAX key; `output_type` "pil" (PIL images) or "np" (uint8 [H, W, 3] arrays). Other
    keyword arguments (`sampler`, `guidance_parallel`, `seed`, `num_steps`) go to `generate`.
    """
    if output_type not in ("pil", "np"):
      raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
    kwargs.setdefault("num_steps", num_inference_steps)
    kwargs.setdefault("seed", generator)
    images = list(self.generate(prompt, num_images_per_prompt=num_images_per_prompt, guidance_scale=guidance_scale,
                                **kwargs))
    if output_type == "pil":
      images = [Image.fromarray(im) for im in images]
    return ImagePipelineOutput(images) if return_dict else (images,)


def sample_to_files(workdir: str, prompts: list[str], *, num_images: int = 4, seed: int = 0,
                    encoders_config=None, sample=None) -> list[str]:
  """Writes PNGs for prompts from the run's latest checkpoint; returns their paths.

  Files: `samples/{index:03d}_{slug}_{seed}_{j}.png` and `{index:03d}_{slug}_{seed}.json` holding the full
  prompt (`ec_dit.images.prompt_stem`; a slug cut short prints a warning).

  `encoders_config` replaces the run's `config.encoders` (see `TextToImagePipeline.from_run`);
  `sample` (a `config.sample` section) replaces its sampler settings.
  """
  pipe = TextToImagePipeline.from_run(workdir, batch_size=max(1, min(64, len(prompts) * num_images)),
                                      encoders_config=encoders_config)
  settings = {} if sample is None else sampler_settings(sample)
  images = pipe.generate(prompts, num_images_per_prompt=num_images, seed=seed, **settings)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, prompt in enumerate(prompts):  # names unique per prompt (index + slug); the full prompt in a sidecar
    stem = images_lib.prompt_stem(i, prompt, seed)
    names = [f"{stem}_{j}.png" for j in range(num_images)]
    for j, name in enumerate(names):
      images_lib.save_png(images[i * num_images + j], os.path.join(out_dir, name))
      paths.append(os.path.join(out_dir, name))
    images_lib.write_prompt_sidecar(os.path.join(out_dir, stem + ".json"), prompt, index=i, seed=seed, images=names)
  return paths
