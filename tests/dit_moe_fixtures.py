"""Shared by the DiT-MoE tests: the tiny config of the committed fixtures and loaders.

The fixtures (`tests/fixtures/dit_moe/`) are made by hand with the reference PyTorch
code (`make_fixtures.py` there); CI reads them without torch.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ec_dit.convert import dit_moe as convert
from ec_dit.model import dit_moe
from ec_dit.prepare import dataset
from helpers import load_config, set_fields
from latent_fixtures import write_image_folder, write_vae

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "dit_moe"
CHECKPOINT = FIXTURES / "tiny.pt"


def tiny_config(kind: str = "token_choice", *, qk_norm: bool = False, num_experts: int = 4):
  """The fixtures' model: 8x8x4 latents, patch 2, width 64, 2 blocks, 4 heads, mlp_ratio 2, 10 classes, top-2."""
  config = load_config("dit_moe", "S-8E2A")
  m = config.model
  m.input_size, m.hidden_size, m.depth, m.num_heads, m.mlp_ratio = 8, 64, 2, 4, 2.0
  m.class_cond.num_classes, m.class_cond.qk_norm = 10, qk_norm
  m.ffn.num_experts, m.ffn.kind = num_experts, kind
  config.class_diffusion.class_labels = (1, 5)
  return config


def reference():
  return np.load(FIXTURES / "reference.npz")


def nhwc(a):
  """PyTorch's NCHW (or [T, B, C, H, W]) as our channels-last."""
  a = np.asarray(a)
  return jnp.asarray(np.moveaxis(a, -3, -1))


def nchw(a):
  return np.moveaxis(np.asarray(a), -1, -3)


def state_dict():
  return convert.load_state_dict(str(CHECKPOINT))


def model_from(params, config):
  model = dit_moe.DiTMoE(config.model, rngs=nnx.Rngs(0))
  nnx.update(model, params)
  return model


@nnx.jit
def apply(model, x, t, labels, drop_mask=None):
  """model(x, t, labels, drop_mask=...) compiled once (eager op-by-op dispatch is slow on a busy CPU)."""
  return model(x, t, labels, drop_mask=drop_mask)


def tiny_model(config=None):
  """The fixtures' weights in our network (training mode)."""
  config = config or tiny_config()
  return model_from(convert.convert_state_dict(state_dict(), config), config)


CLASSES = ("cat", "dog", "fox")


def write_class_folder(root, per_class: int = 4):
  """ImageNet-style: one subfolder per class (labels by sorted name: cat 0, dog 1, fox 2), no captions."""
  for name in CLASSES:
    write_image_folder(root / name, n=per_class, corrupt=(-1, -1), empty_caption=-1, size=16)
    for txt in (root / name).glob("*.txt"):
      txt.unlink()
  return root


def class_config(**fields):
  """The fixtures' tiny DiT-MoE (8x8x4 latents of 16x16 images, 10 classes) set up to train 2 steps."""
  config = tiny_config(fields.pop("kind", "token_choice"))
  config.input.image_size, config.input.read_threads = 16, 0
  config.encoders.batch_size = 8
  config.batch_size, config.num_train_steps = 4, 2
  config.log_every_steps, config.checkpoint_every_steps, config.eval_every_steps = 1, 2, 0
  config.class_diffusion.num_sampling_steps = 3
  set_fields(config, fields)
  return config


def prepare_class_latents(root):
  """(prepared folder, vae folder) under `root`: latents and labels of 12 16x16 images in 3 class subfolders,
  encoded by a tiny random VAE with `ec_dit.prepare` (a class-conditional config: no T5 features)."""
  vae = write_vae(root / "vae")
  config = class_config(input__source=f"folder:{write_class_folder(root / 'images')}", encoders__vae_path=str(vae))
  manifest = dataset.prepare_dataset(config, str(root / "prepared"), examples_per_shard=8)
  assert manifest["num_examples"] == 12 and manifest["feature_dim"] == 0 and "t5" not in manifest["encoders"]
  return root / "prepared", vae
