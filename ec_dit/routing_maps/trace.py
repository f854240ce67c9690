"""Recording what the router does while sampling: the data behind `ec_dit.routing_maps`.

A trace runs the sampler of `TextToImagePipeline.generate` (`ec_dit.diffusion.sample`:
same noise, same guidance, same steps) with its `record` hook, which returns each MoE
layer's diagnostics at every step for the conditional half of the guided batch:
`experts_per_token` [B, S] (expert choice: 0 to E; token choice: k, recorded plus the
shared experts) and `expert_choices` [B, S, E].
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
from ec_dit.data.shapes_world_analysis import object_tokens
from ec_dit.inference import TextToImagePipeline, base_key, resolve_sampler_settings


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


def routing_record(aux) -> dict[str, dict[str, jax.Array]]:
  """`diffusion.sample`'s `record` hook for a trace: layer -> {experts_per_token [B, S], expert_choices uint8
  [B, S, E]} from a model evaluation's MoE diagnostics (`aux["moe"]`)."""
  return {name: {"experts_per_token": d["experts_per_token"], "expert_choices": d["expert_choices"].astype(jnp.uint8)}
          for name, d in aux["moe"].items()}


def _recording_sampler(pipe: TextToImagePipeline, num_steps: int, guidance_scale: float, guidance_parallel: float,
                       sampler: str):
  """`diffusion.sample` with `record=routing_record`, jitted once per pipeline and sampler setting."""
  cache = pipe.__dict__.setdefault("_recording_samplers", {})
  key = (num_steps, guidance_scale, guidance_parallel, sampler)
  if key not in cache:
    graphdef = pipe._graphdef  # the pipeline's model, in eval mode (evaluation capacity factor)

    @jax.jit
    def run(params, tokens, mask, keys):
      return diffusion.sample(nnx.merge(graphdef, params), tokens, mask, keys, image_shape=pipe.image_shape,
                              num_steps=num_steps, guidance_scale=guidance_scale,
                              guidance_parallel=guidance_parallel, sampler=sampler, record=routing_record)
    cache[key] = run
  return cache[key]


def trace_routing(pipe: TextToImagePipeline, prompts: Sequence[str] | str, *, seed: int = 0,
                  num_steps: int | None = None, guidance_scale: float | None = None,
                  guidance_parallel: float | None = None, sampler: str | None = None) -> RoutingTrace:
  """Samples `prompts` (one image each) and records every MoE layer's routing at every step.

  The noise is `pipe.generate`'s (image 0 of prompt i from (seed, i)) and the sampler
  is the same, so the images match it. Sampler settings left None come from the run's
  `config.sample`.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  f = pipe.config.model.ffn
  num_steps, scale, parallel, sampler = resolve_sampler_settings(pipe.config.sample, num_steps, guidance_scale,
                                                                 guidance_parallel, sampler)
  tokens, mask = pipe.encode_prompts(list(prompts))
  root = base_key(seed)
  keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(root, i), 0) for i in range(len(prompts))])
  run = _recording_sampler(pipe, num_steps, scale, parallel, sampler)
  samples, records = run(pipe.params, jnp.asarray(tokens), jnp.asarray(mask), keys)
  records = jax.device_get(records)
  shared = f.num_shared_experts if f.kind == "token_choice" else 0
  return RoutingTrace(
      prompts=prompts, images=pipe.to_images(samples),
      ts=np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float32)[:num_steps],
      experts_per_token={n: np.asarray(r["experts_per_token"], np.float32) + shared for n, r in records.items()},
      expert_choices={n: np.asarray(r["expert_choices"], np.uint8) for n, r in records.items()},
      kind=f.kind, num_experts=f.num_experts, patch_size=pipe.config.model.patch_size)


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
