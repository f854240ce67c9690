"""``shapes_world`` as a TFDS builder (generated locally, no download, no TensorFlow).

Importing this module registers the builder::

  import tensorflow_datasets as tfds
  import ec_dit.data.shapes_world_tfds  # registers 'shapes_world'
  ds = tfds.data_source("shapes_world/size32", data_dir="/tmp/tfds")  # prepares on first use
  ds["train"][0]  # {"image": uint8 (32, 32, 3), "caption": bytes, "metadata": bytes}

Configs: ``size32`` (default), ``size64``, ``size128`` (60k train / 2k test
examples each) and ``tiny`` (32 px, 64 / 16 examples, for tests). Files are
written as ``array_record`` so ``tfds.data_source`` works without
TensorFlow; ``tfds.load`` additionally needs TensorFlow installed. Features
are ``Tensor(uint8, (H, W, 3))`` and ``Text`` (the ``Image`` feature needs
TensorFlow to encode PNG). Example ``i`` of a split equals
``ShapesWorldSource(size, seed=SPLIT_SEEDS[split])[i]``.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

from ec_dit.data.shapes_world import ShapesWorldSource

SPLIT_SEEDS = {"train": 0, "test": 1}


@dataclasses.dataclass(kw_only=True)
class ShapesWorldConfig(tfds.core.BuilderConfig):
  """Canvas size and split sizes of a ``shapes_world`` config."""

  size: int = 32
  num_train: int = 60_000
  num_test: int = 2_000


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
  """ShapesWorld: procedural shapes with GenEval-style captions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ShapesWorldConfig(name="size32", description="32x32 canvas", size=32),
      ShapesWorldConfig(name="size64", description="64x64 canvas", size=64),
      ShapesWorldConfig(name="size128", description="128x128 canvas", size=128),
      ShapesWorldConfig(name="tiny", description="32x32, 64 train / 16 test (tests)", size=32,
                        num_train=64, num_test=16),
  ]
  DEFAULT_CONFIG_NAME = "size32"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS locates a builder's source through `importlib_resources`, which is
    # not a dependency here; the module file is the answer it would find.
    return epath.Path(__file__)

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
            "caption": tfds.features.Text(),
            "metadata": tfds.features.Text(),
        }),
        supervised_keys=("caption", "image"),
        disable_shuffling=True,  # keep example i == ShapesWorldSource(...)[i]
        homepage="https://github.com/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {
        "train": self._generate_examples(ShapesWorldSource(cfg.size, cfg.num_train, SPLIT_SEEDS["train"])),
        "test": self._generate_examples(ShapesWorldSource(cfg.size, cfg.num_test, SPLIT_SEEDS["test"])),
    }

  def _generate_examples(self, source):
    for i in range(len(source)):
      yield i, source[i]
