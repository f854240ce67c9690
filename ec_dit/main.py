"""Command-line entry point: parses flags and hands over to the library.

  python -m ec_dit.main --config=configs/ec_dit_xl.py --mode=summary
  python -m ec_dit.main --config=configs/ec_dit_tiny.py --workdir=runs/tiny
"""

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: file.py:VARIANT.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "summary", ["summary"], "What to do.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from ec_dit import config_lib  # imported late so --help stays fast
  config = FLAGS.config
  config_lib.validate(config)
  if FLAGS.mode == "summary":
    from ec_dit import summary
    summary.print_summary(config)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
