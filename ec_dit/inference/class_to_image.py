"""Class-conditional sampling (DiT-MoE): load a run, give class labels, get latents or images.

    from ec_dit.inference.class_to_image import ClassToImagePipeline
    pipe = ClassToImagePipeline.from_run("runs/dit_moe_s_8E2A")       # e.g. from `python -m ec_dit.convert`
    latents = pipe.generate([207, 360, 387], seed=0)                  # [3, 32, 32, 4] float32
    vae = FrozenEncoders.from_config(config.encoders, context_len=1, need_t5=False)
    pipe = ClassToImagePipeline.from_run("runs/dit_moe_s_8E2A", encoders=vae)
    images = pipe.generate([207, 360], seed=0)                        # uint8 [2, 256, 256, 3]

Without a decoder the pipeline returns latents. With one (`FrozenEncoders`, or any
object whose `.decode(scaled latents)` returns uint8 images), the latents are decoded:
the VAE's own scaling factor (0.18215 for the SD VAE, as DiT's sample.py uses) is applied there.

`sample_to_files(workdir, [207], num_images=4)` is `python -m ec_dit.main --mode=sample
--class_label=207`: PNGs decoded by the VAE of `config.encoders.vae_path` (which
scales latents itself), or, without a VAE path, the latents as `.npy` files.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ec_dit import images as images_lib, tasks
from ec_dit.inference import pipeline as sampling_pipeline
from ec_dit.encoders.frozen import FrozenEncoders

class ClassToImagePipeline(sampling_pipeline.SamplingPipeline):
  """Class labels in, latents (or decoded images) out: the class-label front end of
  `ec_dit.inference.pipeline.SamplingPipeline`; jitted once per batch size, deterministic per seed.

  Args:
    config: the run's config (a class-conditional task: `config.model.arch == "dit_moe"`).
    params: the network parameters (a pure dict, normally the EMA weights).
    encoders: optional decoder (`FrozenEncoders` with a VAE); without it `generate` returns latents.
    batch_size: images per jitted call (labels are padded to it).
  """

  conditioning = tasks.CLASS_LABEL

  def __init__(self, config, params, *, encoders: FrozenEncoders | None = None, batch_size: int = 16):
    super().__init__(config, params, batch_size=batch_size)
    self.encoders = encoders
    self.latent_shape = self.image_shape

  @classmethod
  def from_run(cls, workdir: str, *, step: int | None = None, encoders: FrozenEncoders | None = None,
               batch_size: int = 16) -> "ClassToImagePipeline":
    """Loads the EMA weights of a run directory (a training run or an imported checkpoint)."""
    config, params = sampling_pipeline.restore_run(workdir, step=step)
    return cls(config, params, encoders=encoders, batch_size=batch_size)

  def generate(self, class_labels: Sequence[int], *, seed: int = 0, sampler: str | None = None,
               num_steps: int | None = None, guidance_scale: float | None = None, first_index: int = 0):
    """Latents [N, H, W, C] float32, or uint8 images [N, H', W', 3] when the pipeline has a VAE.

    Image i depends only on (seed, first_index + i), its label and the weights.
    Settings left as None come from `config.class_diffusion`.
    """
    d = self.config.class_diffusion
    sampler = sampler or d.sampler
    num_steps = int(num_steps or d.num_sampling_steps)
    guidance_scale = float(d.guidance_scale if guidance_scale is None else guidance_scale)
    labels = [int(y) for y in class_labels]
    n = self.config.model.class_cond.num_classes
    bad = [y for y in labels if not 0 <= y <= n]
    if bad:
      raise ValueError(f"class labels must be in [0, {n}] ({n} = the null class), got {bad[:5]}")
    keys = [jax.random.fold_in(jax.random.key(seed), first_index + i) for i in range(len(labels))]

    def condition(batch_labels, batch_keys):  # per image: the initial noise from fold_in(key, 0), the sampler's from 1
      x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), self.latent_shape))(batch_keys)
      step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(batch_keys)
      return (jnp.asarray(batch_labels, jnp.int32), x_T), step_keys

    settings = dict(sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale)
    out = self._generate(labels, keys, settings, condition, np.asarray)
    latents = np.concatenate(out) if out else np.zeros((0,) + self.latent_shape, np.float32)
    return self.task.decode(self.config, latents, self.encoders)


def sample_to_files(workdir: str, class_labels: Sequence[int], *, num_images: int = 4, seed: int = 0,
                    encoders_config=None, report=None, class_diffusion=None) -> list[str]:
  """Samples `num_images` per class label from a run's EMA weights into `workdir/samples`; returns the paths.

  PNGs (`class_<label>_<seed>_<j>.png`) when `config.encoders.vae_path` is set
  (`encoders_config`, e.g. the command line's, replaces the run's `config.encoders`),
  decoded by that VAE (the SD VAE for DiT-MoE's checkpoints); otherwise the latents
  as `.npy` files, and `report` says so. `class_diffusion` (a `config.class_diffusion` section)
  replaces the run's sampler, number of steps and guidance scale.
  """
  report = report or (lambda text: print(text, file=sys.stderr, flush=True))
  labels = [int(y) for y in class_labels for _ in range(num_images)]
  if not labels:
    raise ValueError("--class_label: give at least one class label for a class-conditional run")
  pipe = ClassToImagePipeline.from_run(workdir, batch_size=max(1, min(64, len(labels))))
  d = class_diffusion
  settings = {} if d is None else {"sampler": d.sampler, "num_steps": d.num_sampling_steps,
                                   "guidance_scale": d.guidance_scale}
  latents = pipe.generate(labels, seed=seed, **settings)
  enc = encoders_config if encoders_config is not None else pipe.config.encoders
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  names = [f"class_{y}_{seed}_{j % num_images}" for j, y in enumerate(labels)]
  if not enc.vae_path:
    report(f"config.encoders.vae_path is not set: wrote latents as .npy to {out_dir} (set "
           f"--config.encoders.vae_path=VAE_FOLDER, e.g. the SD VAE, for PNGs)")
    paths = [os.path.join(out_dir, n + ".npy") for n in names]
    for path, z in zip(paths, latents):
      np.save(path, z)
    return paths
  vae = FrozenEncoders.from_config(enc, context_len=pipe.config.model.context_len, need_t5=False)
  images = vae.decode(latents)  # scaled latents -> uint8 (divides by the VAE's scaling_factor itself)
  paths = [os.path.join(out_dir, n + ".png") for n in names]
  for path, image in zip(paths, images):
    images_lib.save_png(image, path)
  return paths
