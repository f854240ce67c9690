"""Speed of the pretrained encoders on this machine's CPU, with random weights in the real shapes.

What is measured (one JSON line each)
  t5        T5-v1.1 encoder tokens/s at 120 tokens per prompt (`--t5_batch` prompts per call),
            float32, jitted, median of `--repeats` calls after a warm-up.
            base: the whole encoder (12 layers).
            xxl: 4.7B parameters do not fit this machine in float32 (19 GB) next to the
            activations, and bf16 matmuls are slow on XLA's CPU backend. So the real-width
            encoder is timed with `--xxl_layers` (default 1 and 3) layers, the time per call
            is fitted as a + b * layers, and the 24-layer time is extrapolated from the fit
            (reported with the measured points: "extrapolated": true).
  vae       SD VAE (sd-vae-ft-ema shapes: 128/256/512/512 channels, 2 layers per block) encode
            (to latents, posterior mean) and decode images/s at 256x256, batch `--vae_batch`.
  t5_xxl_memory
            per-device memory of the T5-XXL encoder with bf16 parameters and compute on 8
            devices (mesh fsdp=4, tensor=2; a batch of `--aot_batch` prompts of 120 tokens)
            from an ahead-of-time compile of ShapeDtypeStructs: no weights are allocated.
            Runs in a subprocess with 8 forced host devices.

Usage
  python experiments/benchmark_encoders.py               # everything, ~10 min on 2 cores
  python experiments/benchmark_encoders.py --only t5_base,aot

This is a benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ec_dit import schema, sharding
from ec_dit.encoders import t5
from ec_dit.encoders import vae as vae_lib

CONTEXT_LEN = 120


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default="t5_base,t5_xxl,vae,aot", help="comma-separated parts")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--t5_batch", type=int, default=4)
  p.add_argument("--xxl_layers", default="1,3")
  p.add_argument("--vae_batch", type=int, default=1)
  p.add_argument("--aot_batch", type=int, default=32)
  p.add_argument("--aot_child", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def emit(record: dict) -> None:
  print(json.dumps(record), flush=True)


def timed(fn, *args, repeats: int) -> tuple[float, float]:
  """(compile + first call seconds, median seconds of `repeats` calls)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return first, statistics.median(times)


def t5_seconds(config, batch: int, repeats: int) -> tuple[float, float]:
  model = t5.T5Encoder(config, rngs=nnx.Rngs(0))
  ids = np.random.default_rng(0).integers(0, config.vocab_size, (batch, CONTEXT_LEN)).astype(np.int32)
  mask = np.ones((batch, CONTEXT_LEN), bool)
  fn = t5.encode_fn(model)
  result = timed(fn, ids, mask, repeats=repeats)
  del model, fn
  jax.clear_caches()
  return result


def bench_t5(size: str, args) -> None:
  config = t5.T5Config.v1_1(size)
  tokens = args.t5_batch * CONTEXT_LEN
  if size == "base":
    compile_s, seconds = t5_seconds(config, args.t5_batch, args.repeats)
    emit(dict(benchmark="t5", model="t5-v1_1-base", dtype="float32", layers=config.num_layers, batch=args.t5_batch,
              context_len=CONTEXT_LEN, seconds_per_call=round(seconds, 4), tokens_per_s=round(tokens / seconds, 1),
              compile_and_first_s=round(compile_s, 2), extrapolated=False))
    return
  points = {}
  for layers in [int(n) for n in args.xxl_layers.split(",")]:
    points[layers] = t5_seconds(dataclasses.replace(config, num_layers=layers), args.t5_batch, args.repeats)[1]
  xs, ys = list(points), [points[n] for n in points]
  slope = (ys[-1] - ys[0]) / (xs[-1] - xs[0]) if len(xs) > 1 else ys[0] / xs[0]
  fixed = ys[0] - slope * xs[0]
  seconds = fixed + slope * config.num_layers
  emit(dict(benchmark="t5", model="t5-v1_1-xxl", dtype="float32", layers=config.num_layers, batch=args.t5_batch,
            context_len=CONTEXT_LEN, seconds_per_call=round(seconds, 3), tokens_per_s=round(tokens / seconds, 2),
            extrapolated=True, measured_seconds_by_layers={str(k): round(v, 4) for k, v in points.items()},
            seconds_per_layer=round(slope, 4)))


def bench_vae(args) -> None:
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig(), rngs=nnx.Rngs(0))  # sd-vae-ft-ema's shapes
  b = args.vae_batch
  images = np.random.default_rng(0).uniform(-1, 1, (b, 256, 256, 3)).astype(np.float32)
  latents = np.random.default_rng(1).normal(size=(b, 32, 32, 4)).astype(np.float32)
  for op, fn, x in (("encode", vae.latents_from_images, images), ("decode", vae.images_from_latents, latents)):
    compile_s, seconds = timed(lambda v: fn(v, batch_size=b), x, repeats=args.repeats)
    emit(dict(benchmark="vae", model="sd-vae-ft-ema", op=op, dtype="float32", resolution=256, batch=b,
              seconds_per_call=round(seconds, 3), images_per_s=round(b / seconds, 3),
              compile_and_first_s=round(compile_s, 2)))


def aot_memory(args) -> None:
  config = t5.T5Config.v1_1("xxl")
  mesh_config = schema.mesh_defaults()
  mesh_config.data, mesh_config.fsdp, mesh_config.tensor = 1, 4, 2
  mesh = sharding.make_mesh(mesh_config)
  rules = sharding.DEFAULT_RULES
  abstract = nnx.eval_shape(lambda: t5.T5Encoder(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                 param_dtype=jnp.bfloat16))
  graphdef, state = nnx.split(abstract)

  def placed(var):  # the abstract parameter, carrying its sharding from its logical axes
    where = sharding.named_sharding(var.get_metadata()["out_sharding"], var.shape, mesh, rules)
    return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=where))

  params = jax.tree.map(placed, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  batch = sharding.batch_sharding(mesh, rules, args.aot_batch, 2)
  ids = jax.ShapeDtypeStruct((args.aot_batch, CONTEXT_LEN), jnp.int32, sharding=batch)
  mask = jax.ShapeDtypeStruct((args.aot_batch, CONTEXT_LEN), jnp.bool_, sharding=batch)

  compiled = jax.jit(lambda st, i, m: nnx.merge(graphdef, st)(i, m)).lower(params, ids, mask).compile()
  mem = compiled.memory_analysis()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  gib = lambda b: round(b / 2**30, 3)
  emit(dict(benchmark="t5_xxl_memory", model="t5-v1_1-xxl", dtype="bfloat16", devices=len(jax.devices()),
            mesh=dict(fsdp=4, tensor=2), batch=args.aot_batch, context_len=CONTEXT_LEN, parameters=int(n_params),
            per_device_gib=dict(arguments=gib(mem.argument_size_in_bytes), outputs=gib(mem.output_size_in_bytes),
                                temporaries=gib(mem.temp_size_in_bytes),
                                total=gib(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                          + mem.temp_size_in_bytes)),
            all_parameters_one_device_gib=gib(2 * n_params)))


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.aot_child:
    aot_memory(args)
    return
  parts = set(args.only.split(","))
  if "aot" in parts:  # first, in a subprocess with 8 host devices, so the timings below see one device
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, __file__, "--aot_child", f"--aot_batch={args.aot_batch}"], env=env, check=True)
  if "t5_base" in parts:
    bench_t5("base", args)
  if "t5_xxl" in parts:
    bench_t5("xxl", args)
  if "vae" in parts:
    bench_vae(args)


if __name__ == "__main__":
  main()
