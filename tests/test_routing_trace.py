"""One sampler loop: a routing trace samples through `diffusion.sample` (its `record` hook), so its images are
the pipeline's, bit for bit, and what it records is the router's choice at each step's first evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ec_dit import diffusion, model as model_lib
from ec_dit.routing_maps import trace as routing_trace
from ec_dit.inference import TextToImagePipeline
from helpers import micro_config, perturbed

PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


def _pipeline():
  config = micro_config()
  _, params = nnx.split(model_lib.TextToImage(config, rngs=nnx.Rngs(0)), nnx.Param)
  # batch_size = len(PROMPTS): the pipeline's batch has the trace's shape (no padding), so the two programs
  # differ only by the recorded outputs and the images must agree bit for bit
  # (perturbed: a fresh model's zero-initialised output layer would make every image flat grey)
  return TextToImagePipeline(config, perturbed(nnx.to_pure_dict(params)), batch_size=len(PROMPTS))


@pytest.mark.parametrize("sampler,scale,parallel", [("euler", 3.0, 1.0), ("heun", 1.0, 1.0),
                                                    ("ancestral", 3.0, 0.5)])
def test_the_trace_and_the_pipeline_sample_the_same_images(sampler, scale, parallel):
  pipe = _pipeline()
  settings = dict(num_steps=3, guidance_scale=scale, guidance_parallel=parallel, sampler=sampler)
  trace = routing_trace.trace_routing(pipe, PROMPTS, seed=5, **settings)
  images = pipe.generate(PROMPTS, seed=5, **settings)  # diffusion.sample through the pipeline
  assert images.std() > 0
  np.testing.assert_array_equal(trace.images, images)
  assert trace.layers == ["layer_01", "layer_03"]
  assert trace.expert_choices["layer_01"].shape == (3, 2, 64, 4)  # [steps, images, tokens, experts]


def test_record_keeps_the_samples_and_the_conditional_rows_of_each_step():
  pipe = _pipeline()
  model = nnx.merge(pipe._graphdef, pipe.params)
  tokens, mask = (jnp.asarray(a) for a in pipe.encode_prompts(PROMPTS))
  keys = jnp.stack([jax.random.key(1), jax.random.key(2)])
  kwargs = dict(image_shape=pipe.image_shape, num_steps=2, guidance_scale=3.0, sampler="heun")
  plain = jax.jit(lambda p: diffusion.sample(nnx.merge(pipe._graphdef, p), tokens, mask, keys, **kwargs))(pipe.params)
  x, records = jax.jit(lambda p: diffusion.sample(nnx.merge(pipe._graphdef, p), tokens, mask, keys,
                                                  record=routing_trace.routing_record, **kwargs))(pipe.params)
  np.testing.assert_array_equal(x, plain)
  # step 0 evaluates the initial noise at t = 1; the conditional prompts' routing, without the unconditional rows
  x_T = jax.vmap(lambda k: jax.random.normal(k, pipe.image_shape, jnp.float32))(keys)
  _, aux = model(x_T, jnp.ones((2,)), tokens, mask)
  for name, d in aux["moe"].items():
    assert records[name]["expert_choices"].shape == (2, 2, 64, 4)  # Heun's final Euler step recorded too
    np.testing.assert_array_equal(records[name]["expert_choices"][0], np.asarray(d["expert_choices"], np.uint8))
    np.testing.assert_array_equal(records[name]["experts_per_token"][0], d["experts_per_token"])
