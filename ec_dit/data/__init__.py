"""Training data: sources (ShapesWorld, TFDS, folders, JSONL), preprocessing and the grain pipeline.

    from ec_dit import data
    ds = data.create_dataset(config.input, batch_size=32, tokenize=tokenizer.encode, seed=0)

Modules: :mod:`~ec_dit.data.sources` (what ``config.input.source`` names),
:mod:`~ec_dit.data.preprocess` (per example), :mod:`~ec_dit.data.pipeline`
(the grain graph, iterator checkpoints, global batches),
:mod:`~ec_dit.data.shapes_world` (the embedded domain).
"""

from ec_dit.data.pipeline import create_dataset, global_batch, iterator_restore_args, iterator_save_args
from ec_dit.data.preprocess import Preprocess, center_crop_resize, load_image, to_rgb
from ec_dit.data.sources import ImageCaptionFiles, check_input_and_source, check_source, make_source
from ec_dit.schema import input_defaults, parse_source

__all__ = ["ImageCaptionFiles", "Preprocess", "center_crop_resize", "check_input_and_source", "check_source",
           "create_dataset", "global_batch", "input_defaults", "iterator_restore_args", "iterator_save_args",
           "load_image", "make_source", "parse_source", "to_rgb"]
