"""Tokenizer edge cases, the rectified-flow pieces, and samplers (determinism, text K/V cache)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ec_dit import diffusion, model as model_lib, tokenizer
from ec_dit.inference import TextToImagePipeline
from ec_dit.model import text_encoder
from helpers import train_config


def test_tokenizer_empty_long_and_non_ascii():
  tok = tokenizer.Tokenizer("words", vocab_size=512, max_len=8)
  ids, mask = tok.encode("")
  assert ids.shape == (8,) and not mask.any()  # the empty prompt is unconditional
  with pytest.warns(UserWarning, match="truncated"):
    ids, mask = tok.encode("one two three four five six seven eight nine ten")
  assert mask.all()
  ids, mask = tok.encode("ein roter Kreis — 赤い円 🟥")
  assert mask.sum() >= 4 and (ids[mask] > 0).all() and (ids < 512).all()
  # deterministic and case-insensitive for words
  np.testing.assert_array_equal(tok.encode("A Red Circle")[0], tok.encode("a red circle")[0])
  assert not np.array_equal(tok.encode("a red circle")[0], tok.encode("a blue circle")[0])


def test_byte_tokenizer_round_trips_unicode():
  tok = tokenizer.Tokenizer("bytes", vocab_size=259, max_len=64)
  prompt = "ü 猫 🟥"
  ids, mask = tok.encode(prompt)
  assert bytes(int(i) - 1 for i in ids[mask]).decode("utf-8") == prompt
  with pytest.raises(ValueError, match="config.text.tokenizer"):
    tokenizer.Tokenizer("sentencepiece")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tok.encode("short")  # no warning when it fits


def test_text_encoder_sees_word_order_from_initialisation():
  """Attribute binding needs word order: the same word at two positions must get different
  features before any training (positions initialised at 2% of a token's scale did not)."""
  enc = text_encoder.TextEncoder(vocab_size=64, max_len=16, width=128, depth=2, num_heads=4, rngs=nnx.Rngs(0))
  tokens = jnp.asarray([[5, 9, 7, 9, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
  feats = np.asarray(enc(tokens, tokens > 0))[0]
  cos = feats[1] @ feats[3] / (np.linalg.norm(feats[1]) * np.linalg.norm(feats[3]))
  assert cos < 0.9, cos  # word 9 at positions 1 and 3
  # Swapping two words changes each slot's features: "red square, blue circle" is not
  # "blue square, red circle".
  swapped = jnp.asarray([[5, 9, 8, 9, 7] + [0] * 11])
  feats2 = np.asarray(enc(swapped, swapped > 0))[0]
  assert np.abs(feats[2] - feats2[4]).max() > 0.5
  pos = np.asarray(enc.pos[...])
  assert 0.8 < np.sqrt(np.mean(pos ** 2)) < 1.2  # the tokens' scale


def test_logit_normal_timesteps_and_interpolation():
  t = diffusion.sample_timesteps(jax.random.key(0), 20000)
  assert 0 < float(t.min()) and float(t.max()) < 1
  logits = np.log(np.asarray(t) / (1 - np.asarray(t)))
  assert abs(logits.mean()) < 0.05 and abs(logits.std() - 1) < 0.05
  x0, eps = jnp.ones((2, 4, 4, 3)), -jnp.ones((2, 4, 4, 3))
  xt = diffusion.interpolate(x0, eps, jnp.array([0.0, 1.0]))
  np.testing.assert_allclose(xt[0], x0[0]) and np.testing.assert_allclose(xt[1], eps[1])


def test_loss_weight_caps_the_near_clean_examples():
  """loss_t_min = 0 is velocity matching; 1 is the clean-image MSE of an x0-predicting net."""
  images = jax.random.normal(jax.random.key(0), (64, 4, 4, 3))
  x0_hat = images + 0.1 * jax.random.normal(jax.random.key(1), images.shape)

  def x0_model(x_t, t, tokens, mask):  # predicts x0_hat and returns its velocity, as the DiT does
    return (x_t - x0_hat) / t[:, None, None, None], {"aux_loss": jnp.zeros(())}

  tokens, mask = jnp.zeros((64, 4), jnp.int32), jnp.ones((64, 4), bool)
  key = jax.random.key(2)
  loss = lambda t_min: diffusion.rectified_flow_loss(x0_model, images, tokens, mask, key, loss_t_min=t_min)[0]
  t = diffusion.sample_timesteps(jax.random.split(key, 3)[0], 64)
  per_example_x0 = jnp.mean(jnp.square(x0_hat - images), axis=(1, 2, 3))
  np.testing.assert_allclose(loss(0.0), jnp.mean(per_example_x0 / t ** 2), rtol=1e-5)
  np.testing.assert_allclose(loss(1.0), jnp.mean(per_example_x0), rtol=1e-5)
  np.testing.assert_allclose(loss(0.3), jnp.mean(per_example_x0 / jnp.maximum(t, 0.3) ** 2), rtol=1e-5)
  np.testing.assert_array_equal(diffusion.loss_weight(jnp.array([0.1, 0.5, 0.9]), 0.0), 1.0)


def _trained_looking_model(config):
  model = model_lib.TextToImage(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [0.05 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
  model.eval()
  return model


@pytest.mark.parametrize("sampler,parallel", [("euler", 1.0), ("heun", 1.0), ("ancestral", 1.0), ("euler", 0.0)])
def test_cached_and_uncached_text_kv_sampling_agree(sampler, parallel):
  config = train_config()
  model = _trained_looking_model(config)
  tok = tokenizer.tokenizer_from_config(config)
  tokens, mask = tok.encode_batch(["a photo of a red circle", "a photo of two blue squares", ""])
  kwargs = dict(image_shape=(16, 16, 3), num_steps=3, guidance_scale=3.0, guidance_parallel=parallel,
                sampler=sampler)
  a = diffusion.sample(model, tokens, mask, jax.random.key(0), cache_text=True, **kwargs)
  b = diffusion.sample(model, tokens, mask, jax.random.key(0), cache_text=False, **kwargs)
  assert float(jnp.abs(a).max()) > 0
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_projected_guidance():
  """guidance_parallel = 1 is standard CFG; 0 removes the update's part along x0 = x - t v_cond."""
  kx, kc, ku = jax.random.split(jax.random.key(0), 3)
  x, v_cond, v_uncond = (jax.random.normal(k, (3, 4, 4, 3)) for k in (kx, kc, ku))
  t, s = 0.7, 3.0
  cfg = diffusion.guide(x, t, v_cond, v_uncond, s, 1.0)
  np.testing.assert_array_equal(cfg, v_uncond + s * (v_cond - v_uncond))
  x0 = x - t * v_cond
  dot = lambda a, b: jnp.sum(a * b, axis=(1, 2, 3))
  full_update = cfg - v_cond
  orth = diffusion.guide(x, t, v_cond, v_uncond, s, 0.0) - v_cond
  np.testing.assert_allclose(dot(orth, x0), 0.0, atol=1e-4)  # per image, not over the batch
  parallel = full_update - orth
  coef = dot(parallel, x0) / dot(x0, x0)
  np.testing.assert_allclose(parallel, coef[:, None, None, None] * x0, atol=1e-5)  # a multiple of x0
  half = diffusion.guide(x, t, v_cond, v_uncond, s, 0.5) - v_cond
  np.testing.assert_allclose(half, orth + 0.5 * parallel, atol=1e-5)
  # an unconditional prediction that differs only in "how much of the image" has no guidance left
  v_less = v_cond + 0.4 * x0
  np.testing.assert_allclose(diffusion.guide(x, t, v_cond, v_less, s, 0.0), v_cond, atol=1e-5)
  assert float(jnp.abs(diffusion.guide(x, t, v_cond, v_less, s, 1.0) - v_cond).max()) > 0.1
  with pytest.raises(ValueError, match=r"guidance_parallel must be a number in \[0, 1\], got 1.5"):
    diffusion.guide(x, t, v_cond, v_uncond, s, 1.5)


@pytest.mark.parametrize("sampler", ["euler", "ancestral"])
def test_pipeline_is_deterministic_and_independent_of_batching(sampler):
  config = train_config()
  config.sample.sampler = sampler
  model = _trained_looking_model(config)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  prompts = ["a photo of a red circle", "a photo of a blue square", "a photo of three triangles"]
  small = TextToImagePipeline(config, params, batch_size=2)
  big = TextToImagePipeline(config, params, batch_size=8)
  a = small.generate(prompts, num_images_per_prompt=2, seed=7, num_steps=2)
  b = small.generate(prompts, num_images_per_prompt=2, seed=7, num_steps=2)
  c = big.generate(prompts, num_images_per_prompt=2, seed=7, num_steps=2)
  d = small.generate(prompts, num_images_per_prompt=2, seed=8, num_steps=2)
  assert a.shape == (6, 16, 16, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)  # the same computation at the same shapes: bit for bit
  # Batch 8 vs batch 2: XLA:CPU tiles the matmuls by batch, so the floats differ in the last bits and a pixel
  # near a rounding boundary may land one level off (seen on Sapphire Rapids, not on EPYC). Within 1 level.
  assert np.abs(a.astype(int) - c).max() <= 1
  assert np.abs(a.astype(int) - d).max() > 1
  with pytest.raises(ValueError, match="sampler must be one of"):
    small.generate(prompts, sampler="ddim")


def test_pipeline_call_takes_diffusers_arguments_and_returns_images():
  config = train_config()
  params = nnx.to_pure_dict(nnx.state(_trained_looking_model(config), nnx.Param))
  pipe = TextToImagePipeline(config, params, batch_size=4)
  prompt = "a photo of a red circle"
  want = pipe.generate([prompt], num_images_per_prompt=2, seed=3, num_steps=2, guidance_scale=1.5)
  out = pipe(prompt, num_inference_steps=2, guidance_scale=1.5, generator=3, num_images_per_prompt=2)
  assert len(out.images) == 2 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in out.images)
  np.testing.assert_array_equal(np.stack([np.asarray(im) for im in out.images]), want)  # same shapes: bitwise
  for key in (jax.random.key(3), jax.random.PRNGKey(3)):  # a JAX key as the generator: the seed's noise
    out = pipe([prompt], num_inference_steps=2, guidance_scale=1.5, generator=key, num_images_per_prompt=2,
               output_type="np")
    np.testing.assert_array_equal(np.stack(out.images), want)
  (images,) = pipe(prompt, num_inference_steps=2, guidance_scale=1.5, generator=4, output_type="np",
                   return_dict=False)
  assert len(images) == 1 and images[0].dtype == np.uint8 and not np.array_equal(images[0], want[0])
  with pytest.raises(ValueError, match="generator must be an int seed or a single JAX key"):
    pipe(prompt, generator=jax.random.split(jax.random.key(0), 2))
  with pytest.raises(ValueError, match="output_type must be 'pil' or 'np'"):
    pipe(prompt, output_type="latent")


def test_samplers_integrate_a_known_flow_to_its_data_point():
  """For data that is a single point x0 the exact velocity is (x - x0) / t and the ODE
  path is a straight line: both samplers must land on x0 from any noise."""
  x0 = jnp.full((1, 2, 2, 1), 0.5)

  class PointMassModel:
    def encode_prompt(self, tokens, mask):
      return None

    def dit(self, x, t, context_cache=None):
      return (x - x0) / t.reshape(-1, 1, 1, 1), {}

  tokens, mask = jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), bool)
  for sampler in diffusion.SAMPLERS:
    out = diffusion.sample(PointMassModel(), tokens, mask, jax.random.key(0), image_shape=(2, 2, 1),
                           num_steps=4, sampler=sampler)
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_ancestral_steps_sample_a_gaussian_with_its_variance():
  """Data N(0, s0^2): the exact velocity is linear in x. Ancestral steps from noise must
  return samples with standard deviation s0 (a wrong mix of predicted and fresh noise
  inflates or shrinks it), and, unlike the ODE, forget most of their starting noise."""
  s0, n, steps = 0.5, 40000, 200

  def velocity(x, t):  # v = (x - E[x0 | x_t]) / t for Gaussian data
    shrink = (1 - t) * s0 ** 2 / ((1 - t) ** 2 * s0 ** 2 + t ** 2)
    return (x - shrink * x) / t

  ts = jnp.linspace(1.0, 0.0, steps + 1)

  def ancestral(x, i):
    z = jax.random.normal(jax.random.fold_in(jax.random.key(1), i), x.shape)
    return diffusion.ancestral_step(x, velocity(x, ts[i]), ts[i], ts[i + 1], z), None

  def euler(x, i):
    return x + (ts[i + 1] - ts[i]) * velocity(x, ts[i]), None

  start = jax.random.normal(jax.random.key(0), (n,))
  x, _ = jax.lax.scan(ancestral, start, jnp.arange(steps))
  ode, _ = jax.lax.scan(euler, start, jnp.arange(steps))
  assert abs(float(jnp.std(x)) - s0) < 0.02 and abs(float(jnp.mean(x))) < 0.02
  assert abs(float(jnp.std(ode)) - s0) < 0.02
  corr = float(jnp.corrcoef(x, ode)[0, 1])
  assert corr < 0.5, corr
