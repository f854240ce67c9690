"""The TPU compiler without a TPU: our code paths compiled by libtpu for a small pod slice (v5p:2x2x1).

libtpu is pinned in requirements.txt; when it is missing these tests fail (they are not skipped).
Each compile takes seconds to tens of seconds on a 2-core CPU (small widths, two blocks).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from ec_dit import diffusion, sharding, tasks
from ec_dit.tools import compile_report, hlo_collectives, roofline, tpu_chips, tpu_plan, tpu_report, tpu_topology
from helpers import REPO, micro_config

TOPOLOGY = "v5p:2x2x1"


@pytest.fixture(scope="module")
def devices():
  return tpu_topology.topology_devices(TOPOLOGY)


def _config(mesh=(-1, 1, 1, 1), **ffn):
  config = micro_config(**ffn)
  config.model.depth = 2
  config.batch_size = 8
  config.optimizer = "adamw"  # state = params, EMA and two moments
  config.mesh.data, config.mesh.fsdp, config.mesh.expert, config.mesh.tensor = mesh
  return config


def _compile(config, devices):
  """(report, HLO text) of the train step compiled for the TPU devices."""
  mesh = sharding.make_mesh(config.mesh, devices)
  compiled, info = compile_report.compile_train_step(config, mesh)
  report = tpu_report.analyse(compiled, config, mesh, topology=TOPOLOGY, num_slices=1, info=info,
                              param_dtype="float32")
  return report, compiled.as_text()


def test_topology_gives_tpu_devices_while_the_cpu_stays_default(devices):
  assert len(devices) == 4 and {d.device_kind for d in devices} == {"TPU v5"}
  assert tpu_chips.chip_for(devices[0].device_kind).name == "v5p"
  assert jax.default_backend() == "cpu" and len(jax.devices()) == 8  # conftest's forced host devices
  assert len(tpu_topology.topology_devices("v5p:2x2x1", num_slices=2)) == 8


@pytest.mark.parametrize("name", ["v5p", "v7:2x2", "v5p:2x", "tpu"])
def test_bad_topology_names_the_flag_and_the_form(name):
  with pytest.raises(ValueError, match=r"--topology=.*GENERATION:AxB\[xC\]"):
    tpu_topology.topology_devices(name)


def test_micro_train_step_report(devices):
  config = _config()
  config.batch_size = 16  # not the gather test's program: JAX's cache cannot reload a topology's executable
  report, text = _compile(config, devices)
  assert report["backend"] == "TPU v5" and report["chip"] == "v5p" and report["devices"] == 4
  assert report["fits"] and report["margin_gib"] == pytest.approx(95 - report["total_gib"])
  # data parallel: every device holds params, EMA and two Adam moments in float32, plus a batch shard
  state = 4 * report["num_params"] * 4 / tpu_chips.GiB
  assert state <= report["argument_gib"] < 1.5 * state  # TPU tiles (8 x 128) pad the smallest arrays
  assert report["collectives"]["all-reduce"]["count"] >= 1  # the gradient reduction
  assert report["collectives"]["all-to-all"]["count"] == 0
  # the compiler's FLOPs cover the model's (a quarter of the batch per device), plus elementwise work
  assert report["flops_per_device"] >= 0.9 * report["model_flops_per_step"] / 4
  lines = tpu_report.format_report(report).splitlines()
  assert "TPU compiler" in lines[0] and lines[-1].startswith('{"backend": "TPU v5"')


@pytest.mark.parametrize("dispatch", ["einsum", "gather"])
def test_expert_choice_dispatch_compiles_for_tpu(devices, dispatch):
  report, _ = _compile(_config(dispatch=dispatch), devices)
  assert report["fits"] and report["flops_per_device"] > 0


def test_expert_sharding_emits_all_to_all(devices):
  report, _ = _compile(_config(mesh=(1, 1, 4, 1), dispatch="einsum"), devices)
  assert report["mesh"]["expert"] == 4
  assert report["collectives"]["all-to-all"]["count"] >= 2  # dispatch and combine, forward and backward
  assert report["collectives"]["all-to-all"]["ici_gib"] > 0


@pytest.mark.parametrize("capacity", [2.0, 0.0])
def test_token_choice_with_capacity_and_dropless_compile_for_tpu(devices, capacity):
  config = _config(kind="token_choice", top_k=2, token_capacity_factor=capacity)
  report, text = _compile(config, devices)
  assert report["fits"]
  if capacity == 0.0:  # dropless: "auto" is resolved for the TPU (ragged_dot), not for the CPU backend
    assert "ragged" in text


def test_sampler_compiles_for_tpu(devices):
  config = _config()
  mesh = sharding.make_mesh(config.mesh, devices)
  model = tasks.task_for(config).abstract_model(config)
  model.eval()
  graphdef, params = nnx.split(model, nnx.Param)
  rep = sharding.replicated(mesh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), params)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  m = config.model
  tokens = jax.ShapeDtypeStruct((8, m.context_len), jnp.int32, sharding=batch)
  mask = jax.ShapeDtypeStruct((8, m.context_len), jnp.bool_, sharding=batch)
  key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=rep)

  def sample(params, tokens, mask, key):
    return diffusion.sample(nnx.merge(graphdef, params), tokens, mask, key,
                            image_shape=(m.input_size, m.input_size, m.in_channels), num_steps=2,
                            guidance_scale=3.0, guidance_parallel=0.0, sampler="euler")

  compiled = jax.jit(sample).lower(params, tokens, mask, key).compile()
  assert compiled.memory_analysis().temp_size_in_bytes > 0
  assert "TPU" in compiled.as_text() or compiled.cost_analysis()  # compiled by libtpu


HLO = """
  %all-gather-start.1 = ((f32[4,8]{1,0}, f32[2]{0}), (f32[16,8]{1,0}, f32[8]{0})) all-gather-start(%a, %b), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %all-gather-done.1 = (f32[16,8]{1,0}, f32[8]{0}) all-gather-done(%all-gather-start.1)
  %reduce-scatter.2 = bf16[4,8]{1,0} reduce-scatter(%c), channel_id=2, replica_groups=[2,4]<=[8], dimensions={0}
  %all-reduce-start.3 = f32[10]{0} all-reduce-start(%d), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}
  ROOT %all-to-all.4 = (f32[2,8]{1,0}, f32[2,8]{1,0}) all-to-all(%e, %f), channel_id=4, replica_groups={{0,1}}
  %collective-permute-start.5 = (f32[6]{0}, f32[6]{0}, u32[], u32[]) collective-permute-start(%g), source_target_pairs={{0,1},{1,0}}
  %fusion.6 = f32[4,8]{1,0} fusion(%all-gather-done.1), kind=kLoop, calls=%all-gather.fused
"""


def test_collectives_counted_and_sized_from_hlo_text():
  c = hlo_collectives.collectives(HLO)
  assert c["all-gather"] == {"count": 1, "bytes": (16 * 8 + 8) * 4, "ici_bytes": pytest.approx((16 * 8 + 8) * 4 * 3 / 4)}
  assert c["reduce-scatter"] == {"count": 1, "bytes": 4 * 8 * 2, "ici_bytes": pytest.approx(4 * 8 * 2 * 4 * 3 / 4)}
  assert c["all-reduce"] == {"count": 1, "bytes": 40, "ici_bytes": pytest.approx(40 * 2 * 1 / 2)}
  assert c["all-to-all"] == {"count": 1, "bytes": 2 * 2 * 8 * 4, "ici_bytes": pytest.approx(64 * 1 / 2 * 2)}
  assert c["collective-permute"] == {"count": 1, "bytes": 24, "ici_bytes": pytest.approx(24)}


def test_roofline_estimate_by_hand():
  chip = tpu_chips.CHIPS["v5p"]
  est = roofline.estimate(chip, flops=459e12, bytes_accessed=2765e9 / 2, ici_bytes=1200e9 / 4,
                          model_flops=0.5 * 459e12 * 8, batch_size=16, num_devices=8)
  assert (est["compute_s"], est["hbm_s"], est["collective_s"]) == pytest.approx((1.0, 0.5, 0.25))
  assert est["step_s_overlap"] == pytest.approx(1.0) and est["step_s_serial"] == pytest.approx(1.75)
  assert est["images_per_s_per_chip_overlap"] == pytest.approx(2.0) and est["mfu_overlap"] == pytest.approx(0.5)
  assert est["bound"] == "compute"


def test_dit_xl_anchor():
  """DiT-XL/2: 6 x 675M x 256 = 1.04 TFLOP per training image (~440 images/s per v5p chip at 100% MFU);
  that counts the per-image adaLN weights once per token, so our count of a DiT-XL/2-shaped model (with
  cross-attention to 6 text tokens) lies between DiT's own 3 x 2 x 118.6 GMAC = 0.71 TFLOP and it."""
  config = micro_config()
  m = config.model
  m.input_size, m.in_channels, m.patch_size, m.hidden_size, m.depth, m.num_heads = 32, 4, 2, 1152, 28, 16
  m.ffn.kind, m.ffn.dense_mlp_ratio = "dense", m.mlp_ratio  # DiT's MLP everywhere
  flops = roofline.train_flops_per_image(m)
  assert 3 * 2 * 118.6e9 < flops < 6 * 675e6 * 256
  assert tpu_chips.CHIPS["v5p"].peak_flops / (6 * 675e6 * 256) == pytest.approx(442, abs=1)


def test_plan_prunes_by_state_and_extrapolates_linearly():
  chip = tpu_chips.CHIPS["v5e"]
  lay = tpu_plan.Layout(1, 2, 8, 1, "full", "float32", 1)
  assert tpu_plan.state_bytes(16e9, 8e9, lay) == pytest.approx(5 * 4 * (8e9 / 16 + 8e9 / 2))
  small = {k: 1.0 for k in tpu_plan.LINEAR} | {"collectives": {"all-to-all": {"count": 2, "gib": 1.0, "ici_gib": 0.5}}}
  large = {k: 2.0 for k in tpu_plan.LINEAR} | {"collectives": {"all-to-all": {"count": 4, "gib": 2.0, "ici_gib": 1.0}}}
  out = tpu_plan.extrapolate(small, large, 2, 4, 28)
  assert out["total_gib"] == pytest.approx(14.0) and out["collectives"]["all-to-all"]["count"] == pytest.approx(28)
  assert chip.hbm_bytes == 16 * tpu_chips.GiB


def test_plan_table_and_command_from_reports():
  chip = tpu_chips.CHIPS["v5p"]
  config = _config()
  colls = {k: {"count": 1, "gib": 0.5, "ici_gib": 0.25} for k in hlo_collectives.KINDS}
  base = {"devices": 4, "backend": "TPU v5", "argument_gib": 1.0, "temp_gib": 1.0, "total_gib": 2.0,
          "flops_per_device": 1e12, "bytes_accessed_per_device": 1e9, "collectives": colls}
  fast = tpu_plan.Layout(1, 1, 4, 1, "full", "bfloat16", 2)
  slow = tpu_plan.Layout(4, 1, 1, 1, "dots", "float32", 2)
  big = tpu_plan.Layout(1, 4, 1, 1, "full", "float32", 2)
  ranked = [(fast, tpu_plan.with_roofline(base, config, chip)),
            (slow, tpu_plan.with_roofline(dict(base, flops_per_device=2e12), config, chip)),
            (big, tpu_plan.with_roofline(dict(base, total_gib=200.0), config, chip))]
  assert ranked[0][1]["fits"] and not ranked[2][1]["fits"]
  assert ranked[0][1]["step_s_overlap"] == pytest.approx(1e12 / chip.peak_flops)
  text = tpu_plan.format_plan(ranked, "tests/micro_config.py", TOPOLOGY, 1)
  lines = text.splitlines()
  assert "(1 more tried that do not fit)" in text
  command = [x for x in lines if x.strip().startswith("python -m ec_dit.main")][0]
  assert fast.flags(4) in command and "--topology=v5p:2x2x1" in command
  assert "--config.batch_size=8 --param_dtype=bfloat16" in command
  assert lines[-1].startswith('{"topology": "v5p:2x2x1"')


@pytest.mark.parametrize("args, message", [
    (["--mode=plan"], "error: --mode=plan needs --topology=NAME"),
    (["--mode=compile", "--topology=v5p-64"], "error: --topology='v5p-64': expected GENERATION:AxB[xC]"),
])
def test_cli_topology_errors_are_one_line(args, message):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # the CLI picks the CPU itself
  out = subprocess.run([sys.executable, "-m", "ec_dit.main", "--config=tests/micro_config.py", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
  assert out.stderr.startswith(message) and "libtpu" not in out.stderr and "TPU_" not in out.stderr
