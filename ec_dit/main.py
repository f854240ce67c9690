"""Command-line entry point: parses flags and hands over to the library.

  python -m ec_dit.main --config=configs/ec_dit_tiny.py --workdir=runs/tiny          # train, then GenEval
  python -m ec_dit.main --config=configs/ec_dit_xl.py --mode=summary                 # params and FLOPs
  python -m ec_dit.main --config=configs/ec_dit_tiny.py --workdir=runs/tiny \\
      --mode=sample --prompt="a photo of two red circles" --num_images=4
"""

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: file.py:VARIANT.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train_and_evaluate", ["train_and_evaluate", "train", "evaluate", "sample", "summary"],
                  "train_and_evaluate: train, then score the GenEval-style prompt set; train: only train; "
                  "evaluate: score the latest checkpoint; sample: write PNGs for --prompt; "
                  "summary: parameter and FLOP counts from shapes only.")
flags.DEFINE_multi_string("prompt", [], "Prompt(s) for --mode=sample.")
flags.DEFINE_integer("num_images", 4, "Images per prompt for --mode=sample.")
flags.DEFINE_integer("seed", 0, "Sampling seed for --mode=sample.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; the progress bar says enough
  from ec_dit import config_lib  # imported late so --help stays fast
  config = FLAGS.config
  config_lib.validate(config)
  if FLAGS.mode == "summary":
    from ec_dit import summary
    summary.print_summary(config)
    return
  if not FLAGS.workdir:
    raise app.UsageError(f"--workdir is required for --mode={FLAGS.mode}")
  from ec_dit import train
  if FLAGS.mode == "train_and_evaluate":
    train.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == "train":
    train.train(config, FLAGS.workdir)
  elif FLAGS.mode == "evaluate":
    train.evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == "sample":
    if not FLAGS.prompt:
      raise app.UsageError("--mode=sample needs at least one --prompt")
    paths = train.sample_to_files(FLAGS.workdir, FLAGS.prompt, num_images=FLAGS.num_images, seed=FLAGS.seed)
    print("\n".join(paths))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
