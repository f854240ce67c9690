"""Recording what the router does while sampling: the data behind `ec_dit.routing_maps`.

The sampler is re-run step by step (same noise as `TextToImagePipeline.generate`,
same guidance), recording each MoE layer's diagnostics for the conditional half of
the guided batch: `experts_per_token` [B, S] (expert choice: 0 to E; token choice: k,
recorded plus the shared experts) and `expert_choices` [B, S, E].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ec_dit import diffusion
from ec_dit.data.shapes_world import BACKGROUND, COLOR_NAMES
from ec_dit.inference import TextToImagePipeline
from ec_dit.vocabulary import SHAPES, with_article


@dataclasses.dataclass
class RoutingTrace:
  """Routing of every MoE layer at every denoising step of one sampling run.

  Attributes:
    prompts: [B] prompts; images: uint8 [B, H, W, C] the generated images.
    ts: [N] the t of each step's (first) model evaluation, from 1 (noise) down.
    experts_per_token: layer -> [N, B, S] routed experts per token (token choice: k + shared).
    expert_choices: layer -> uint8 [N, B, S, E], 1 where expert e processed token s.
    kind, num_experts, patch_size: the FFN kind, experts per layer, pixels per token side.
  """
  prompts: list[str]
  images: np.ndarray
  ts: np.ndarray
  experts_per_token: dict[str, np.ndarray]
  expert_choices: dict[str, np.ndarray]
  kind: str
  num_experts: int
  patch_size: int

  @property
  def layers(self) -> list[str]:
    return sorted(self.experts_per_token)


def _routing_fns(pipe: TextToImagePipeline, guidance_scale: float, guidance_parallel: float):
  """Jitted (encode, velocity-with-diagnostics), cached on the pipeline per guidance setting."""
  cache = pipe.__dict__.setdefault("_routing_fns", {})
  key = (guidance_scale, guidance_parallel)
  if key in cache:
    return cache[key]
  graphdef = pipe._graphdef  # the pipeline's model, in eval mode (evaluation capacity factor)

  @jax.jit
  def encode(params, tokens, mask):
    return nnx.merge(graphdef, params).encode_prompt(tokens, mask)

  @jax.jit
  def velocity(params, context, x, t):
    model = nnx.merge(graphdef, params)
    b = x.shape[0]
    if guidance_scale == 1.0:
      v, aux = model.dit(x, jnp.full((b,), t), context_cache=context)
    else:  # conditional and unconditional in one batch, as diffusion.sample does
      both = context._replace(
          kv=jax.tree.map(lambda a: jnp.concatenate([a, a]), context.kv),
          mask=jnp.concatenate([context.mask, jnp.zeros_like(context.mask)]),
          pooled=None if context.pooled is None else jnp.concatenate([context.pooled,
                                                                      jnp.zeros_like(context.pooled)]))
      v2, aux = model.dit(jnp.concatenate([x, x]), jnp.full((2 * b,), t), context_cache=both)
      v_cond, v_uncond = jnp.split(v2, 2)
      v = diffusion.guide(x, t, v_cond, v_uncond, guidance_scale, guidance_parallel)
    diag = {name: {k: d[k][:b] for k in ("experts_per_token", "expert_choices")}
            for name, d in aux["moe"].items()}
    return v, diag

  cache[key] = (encode, velocity)
  return cache[key]


def trace_routing(pipe: TextToImagePipeline, prompts: Sequence[str] | str, *, seed: int = 0,
                  num_steps: int | None = None, guidance_scale: float | None = None,
                  guidance_parallel: float | None = None, sampler: str | None = None) -> RoutingTrace:
  """Samples `prompts` (one image each) and records every MoE layer's routing at every step.

  The noise is `pipe.generate`'s (image 0 of prompt i from (seed, i)), so the images
  match it. Sampler settings left None come from the run's `config.sample`.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  s, f = pipe.config.sample, pipe.config.model.ffn
  num_steps = int(num_steps or s.num_steps)
  scale = float(s.guidance_scale if guidance_scale is None else guidance_scale)
  parallel = float(s.guidance_parallel if guidance_parallel is None else guidance_parallel)
  sampler = sampler or s.sampler
  encode, velocity = _routing_fns(pipe, scale, parallel)
  tokens, mask = pipe.encode_prompts(list(prompts))
  context = encode(pipe.params, jnp.asarray(tokens), jnp.asarray(mask))
  keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), i), 0)
                    for i in range(len(prompts))])
  normal = jax.vmap(lambda k: jax.random.normal(k, pipe.image_shape, jnp.float32))
  x = normal(keys)
  ts = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)
  records = []
  for i in range(num_steps):
    t, t_next = float(ts[i]), float(ts[i + 1])
    v, diag = velocity(pipe.params, context, x, t)
    records.append(jax.device_get(diag))
    if sampler == "ancestral":
      z = normal(jax.vmap(jax.random.fold_in, (0, None))(keys, i))
      x = diffusion.ancestral_step(x, v, t, t_next, z)
    elif sampler == "heun" and i < num_steps - 1:
      x_euler = x + (t_next - t) * v
      x = x + (t_next - t) * 0.5 * (v + velocity(pipe.params, context, x_euler, t_next)[0])
    else:
      x = x + (t_next - t) * v
  shared = f.num_shared_experts if f.kind == "token_choice" else 0
  layers = sorted(records[0]) if records else []
  stack = lambda name, key, dtype: np.stack([np.asarray(r[name][key]).astype(dtype) for r in records])
  return RoutingTrace(
      prompts=prompts, images=pipe.to_images(x), ts=ts[:num_steps],
      experts_per_token={n: stack(n, "experts_per_token", np.float32) + shared for n in layers},
      expert_choices={n: stack(n, "expert_choices", np.uint8) for n in layers},
      kind=f.kind, num_experts=f.num_experts, patch_size=pipe.config.model.patch_size)


def foreground(image: np.ndarray) -> np.ndarray:
  """1 where a pixel differs from ShapesWorld's grey background (for the objects' outlines)."""
  return (np.max(np.abs(image[..., :3].astype(np.int32) - np.array(BACKGROUND)), axis=-1) > 40).astype(float)


REGIONS = ("all", "objects", "background")


def specialisation_counts(model, x_t, t, tokens, mask, groups: Sequence[int], num_groups: int):
  """One forward of a `TextToImage`: layer -> [num_groups, E] times each expert took a token of each group.

  `groups[b]` is image b's group. Sums the `expert_choices` diagnostic over the
  tokens and the images of a group.
  """
  _, aux = model(x_t, t, tokens, mask)
  onehot = np.eye(num_groups, dtype=np.float32)[np.asarray(groups)]  # [B, G]
  return {name: onehot.T @ np.asarray(d["expert_choices"], np.float32).sum(axis=1)
          for name, d in aux["moe"].items()}


def object_tokens(images: np.ndarray, patch_size: int) -> np.ndarray:
  """[B, S] 1 for tokens whose patch holds any object pixel (ShapesWorld: not the grey background)."""
  fg = np.stack([foreground(im) for im in images])
  b, h, w = fg.shape
  patches = fg.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size)
  return (patches.max(axis=(2, 4)) > 0).reshape(b, -1).astype(np.float32)


def expert_specialisation(pipe: TextToImagePipeline, grouped_prompts: Mapping[str, Sequence[str]], *,
                          seed: int = 0, steps: Sequence[int] | None = None, region: str = "all", **sampler):
  """(labels, layer -> [groups, E] counts): how often each expert took a token of each group's images.

  Summed over the sampling run's steps (all, or `steps`), the tokens in `region`
  ("all"; "objects" or "background": by the final image's object pixels) and the
  group's prompts (one image each). With expert choice and one routing group per
  image every expert takes exactly C tokens of every image, so "all" is uniform by
  construction; the region shows which experts go to the objects.
  """
  if region not in REGIONS:
    raise ValueError(f"region must be one of {REGIONS}, got {region!r}")
  labels = list(grouped_prompts)
  prompts = [p for label in labels for p in grouped_prompts[label]]
  groups = [g for g, label in enumerate(labels) for _ in grouped_prompts[label]]
  trace = trace_routing(pipe, prompts, seed=seed, **sampler)
  steps = slice(None) if steps is None else list(steps)
  # Token weights on the model's token grid, which for a latent run is coarser than the decoded pixels: the
  # grid comes from the recorded choices [N, B, S, E], and a token covers images.shape[1] / sqrt(S) pixels.
  tokens = next(iter(trace.expert_choices.values())).shape[2] if trace.expert_choices else \
      trace.images.shape[1] * trace.images.shape[2] // trace.patch_size ** 2
  weight = np.ones((trace.images.shape[0], tokens), np.float32)
  if region != "all":
    objects = object_tokens(trace.images, trace.images.shape[1] // math.isqrt(tokens))
    weight = objects if region == "objects" else 1.0 - objects
  onehot = np.eye(len(labels), dtype=np.float32)[groups]  # [B, G]
  counts = {}
  for name, choices in trace.expert_choices.items():
    per_image = np.einsum("nbse,bs->be", choices[steps].astype(np.float32), weight)
    counts[name] = onehot.T @ per_image
  return labels, counts


def shapes_world_groups(by: str = "shape") -> dict[str, list[str]]:
  """ShapesWorld single-object prompts "a photo of a {colour} {shape}", grouped by shape or by colour."""
  if by not in ("shape", "color"):
    raise ValueError(f"by must be 'shape' or 'color', got {by!r}")
  groups: dict[str, list[str]] = {}
  for shape in SHAPES:
    for colour in COLOR_NAMES:
      groups.setdefault(shape if by == "shape" else colour, []).append(f"a photo of {with_article(colour)} {shape}")
  return groups
