"""Routing maps and expert specialisation (ec_dit.routing_maps) on a micro model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ec_dit import model as model_lib
from ec_dit.moe import layers as moe_layers
from ec_dit.moe import routing
from ec_dit.inference import TextToImagePipeline
from ec_dit import routing_maps
from helpers import micro_config

PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


def _pipeline(variant=None, **ffn):
  config = micro_config(variant, **ffn)
  _, params = nnx.split(model_lib.TextToImage(config, rngs=nnx.Rngs(0)), nnx.Param)
  return TextToImagePipeline(config, nnx.to_pure_dict(params), batch_size=2)


def test_routing_map_figure_panels_and_expert_choice_invariant():
  pipe = _pipeline()
  f = pipe.config.model.ffn
  trace = routing_maps.trace_routing(pipe, PROMPTS, num_steps=3, seed=1)
  assert trace.images.shape == (2, 16, 16, 3) and trace.images.dtype == np.uint8
  same = pipe.generate(PROMPTS, num_steps=3, seed=1)  # same noise and sampler: the same images (up to rounding)
  assert np.abs(trace.images.astype(int) - same).max() <= 1
  layers = ["layer_01", "layer_03"]  # micro config: depth 4, MoE every other layer
  assert trace.layers == layers
  tokens = (16 // 2) ** 2
  expected = f.num_experts * routing.capacity(tokens, f.eval_capacity_factor, f.num_experts)  # E x C
  assert expected == f.eval_capacity_factor * tokens
  for name in layers:
    assert trace.experts_per_token[name].shape == (3, 2, tokens)
    np.testing.assert_allclose(trace.experts_per_token[name].sum(-1), expected)
    np.testing.assert_array_equal(trace.expert_choices[name].sum(-1), trace.experts_per_token[name])

  steps = [0, 2]
  for index in range(2):
    fig = routing_maps.routing_map_figure(trace, index, steps)
    panels = {ax.get_label(): ax for ax in fig.axes if ax.get_label() in
              ["image"] + [f"{n}@{s}" for n in layers for s in steps]}
    assert len(panels) == 1 + len(layers) * len(steps)  # the image + one per MoE layer per step
    np.testing.assert_array_equal(panels["image"].images[0].get_array(), trace.images[index])
    for name in layers:
      for s in steps:
        heat = np.asarray(panels[f"{name}@{s}"].images[0].get_array())
        assert heat.shape == (16, 16)  # on the image's pixel grid: 2x2 pixels per token
        assert heat.sum() / 2 ** 2 == pytest.approx(expected)  # per image: capacity_factor x tokens
        assert 0 <= heat.min() and heat.max() <= f.num_experts
  assert routing_maps.figure_to_array(fig).ndim == 3

  spread = routing_maps.compute_spread(trace)
  assert set(spread) == set(layers) and spread["layer_01"]["std"].shape == (3,)
  np.testing.assert_allclose(spread["layer_01"]["mean"], f.eval_capacity_factor)
  assert routing_maps.compute_spread_figure(trace).axes

  labels, counts = routing_maps.expert_specialisation(pipe, {"circle": PROMPTS[:1], "square": PROMPTS[1:]},
                                                      num_steps=2, region="all")
  assert labels == ["circle", "square"]
  np.testing.assert_allclose(counts["layer_01"], expected / f.num_experts * 2)  # EC per image: C per expert per step
  fig = routing_maps.specialisation_figure(labels, counts)
  assert len([ax for ax in fig.axes if ax.images]) >= len(layers)


class _Writer:
  def __init__(self):
    self.images = {}

  def write_image(self, step, tag, image):
    self.images[tag] = (step, image.shape)


def test_training_hook_writes_png_and_tensorboard_images(tmp_path):
  pipe = _pipeline()
  pipe.config.sample.num_steps = 2
  writer = _Writer()
  path = routing_maps.write_training_routing_maps(pipe.config, pipe.params, str(tmp_path), 7, writer, pipe=pipe)
  assert path == str(tmp_path / "routing_maps" / "step_0000007.png") and (tmp_path / "routing_maps").is_dir()
  assert set(writer.images) == {"routing_maps", "routing_spread"}
  assert writer.images["routing_maps"][0] == 7 and writer.images["routing_maps"][1][-1] == 3


def test_token_choice_maps_show_k_plus_shared():
  pipe = _pipeline("dit_moe")
  f = pipe.config.model.ffn
  trace = routing_maps.trace_routing(pipe, PROMPTS[:1], num_steps=1, guidance_scale=1.0)
  for name in trace.layers:
    np.testing.assert_allclose(trace.experts_per_token[name], f.top_k + f.num_shared_experts)
  assert routing_maps.routing_map_figure(trace).axes


def _recording_router_logits(monkeypatch):
  """Every router call (the model runs eagerly) appends its logits [G, S', E] to the returned list."""
  seen = []
  original = moe_layers.Router.__call__

  def record(self, x):
    out = original(self, x)
    seen.append(np.asarray(out))
    return out

  monkeypatch.setattr(moe_layers.Router, "__call__", record)
  return seen


@pytest.mark.parametrize("variant", ["ec", "tc"])
def test_specialisation_counts_equal_router_choices_by_hand(variant, monkeypatch):
  # Expert choice over groups of two images, so that the counts per image vary.
  tokens_per_image = (16 // 2) ** 2
  config = micro_config(variant, routing_group_size=2 * tokens_per_image if variant == "ec" else 0)
  model = model_lib.TextToImage(config, rngs=nnx.Rngs(3))
  model.eval()
  b, m, f = 4, config.model, config.model.ffn
  k = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k[0], (b, m.input_size, m.input_size, m.in_channels))
  t = jax.random.uniform(k[1], (b,))
  tokens = jax.random.randint(k[2], (b, m.context_len), 1, config.text.vocab_size)
  mask = jnp.ones((b, m.context_len), bool)
  groups = [0, 1, 1, 0]
  logits = _recording_router_logits(monkeypatch)
  counts = routing_maps.specialisation_counts(model, x, t, tokens, mask, groups, num_groups=2)
  assert len(logits) == len(counts) == 2

  for name, lg in zip(sorted(counts), logits):
    probs = np.exp(lg - lg.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    g, s, e = probs.shape
    by_hand = np.zeros((b, e))
    for gi in range(g):
      if variant == "ec":
        c = routing.capacity(s, f.eval_capacity_factor, e)
        for ei in range(e):
          for token in np.argsort(-probs[gi, :, ei], kind="stable")[:c]:
            by_hand[(gi * s + token) // tokens_per_image, ei] += 1
      else:
        for token in range(s):
          for ei in np.argsort(-probs[gi, token], kind="stable")[:f.top_k]:
            by_hand[(gi * s + token) // tokens_per_image, ei] += 1
    per_group = np.stack([by_hand[[i for i in range(b) if groups[i] == gr]].sum(0) for gr in range(2)])
    np.testing.assert_array_equal(counts[name], per_group)
    assert len(np.unique(by_hand)) > 1  # not uniform: the test would pass for any routing otherwise
