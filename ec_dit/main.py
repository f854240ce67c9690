"""Command-line entry point: parses flags and hands over to the library.

  python -m ec_dit.main --config=configs/ec_dit_tiny.py --workdir=runs/tiny          # train, then GenEval
  python -m ec_dit.main --config=configs/ec_dit_xl.py --mode=summary                 # params and FLOPs
  python -m ec_dit.main --config=configs/ec_dit_tiny.py --workdir=runs/tiny \\
      --mode=sample --prompt="a photo of two red circles" --num_images=4
  python -m ec_dit.main --config=configs/dit_moe.py:S-8E2A --workdir=runs/dit_moe_s_8E2A \\
      --mode=sample --class_label=207 --num_images=4                  # class-conditional (DiT-MoE)
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m ec_dit.main \\
      --config=configs/ec_dit_xl.py --mode=compile --config.mesh.expert=8  # per-device memory, no weights
  python -m ec_dit.main --config=configs/ec_dit_xl.py --mode=compile --topology=v5p:4x4x4 \\
      --config.mesh.fsdp=2 --config.mesh.expert=32  # the TPU compiler's memory, collectives, roofline
  python -m ec_dit.main --config=configs/ec_dit_m.py --mode=plan --topology=v5p:4x8x8  # search layouts

Multi-host: run the same command on every host. On TPU VM pod slices (and SLURM / Open MPI
clusters) jax.distributed is initialised automatically; elsewhere (e.g. several CPU or GPU
machines, or processes on one machine) pass --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (CPU processes use the gloo collectives).
"""

import difflib
import os

from absl import app, flags
from ml_collections import config_flags

from ec_dit import (checkpoint, command_line, configs, errors, evaluators, host_memory, inference, routing_maps,
                    schema, tasks)
from ec_dit.inference import class_to_image as inference_class
from ec_dit.data import sources
from ec_dit.geneval import generate
from ec_dit.tools import compile_report, model_summary, tpu_plan, tpu_topology
from ec_dit.training import workdir as workdir_lib

# Errors that carry a complete message for the user: printed as one line, exit code 2 (ec_dit.errors).
USER_ERRORS = (errors.EcDitError, ValueError, FileNotFoundError, FloatingPointError, workdir_lib.WorkdirError,
               checkpoint.RestoreError, checkpoint.SaveError)

config_flags.DEFINE_config_file("config", None, "Config file, optionally with a variant: file.py:VARIANT.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train_and_evaluate",
                  ["train_and_evaluate", "train", "evaluate", "sample", "routing_maps", "summary", "compile", "plan"],
                  "train_and_evaluate: train, then score the GenEval-style prompt set; train: only train; "
                  "evaluate: score the latest checkpoint; sample: write PNGs for --prompt (for DiT-MoE: "
                  "--class_label); "
                  "routing_maps: PNGs of where the experts go for --prompt (and expert specialisation per "
                  "ShapesWorld shape and colour) in WORKDIR/routing_maps; "
                  "summary: parameter and FLOP counts from shapes only; "
                  "compile: compile the train step for the configured mesh from abstract inputs and "
                  "print per-device memory (no weights allocated); with --topology, by the TPU compiler, "
                  "with collectives and a roofline estimate; "
                  "plan: search mesh layouts for --topology (ec_dit/tools/tpu_plan.py).")
flags.DEFINE_string("topology", None, "--mode=compile/plan: compile for this TPU pod slice with the real TPU "
                    "compiler (libtpu), e.g. v5p:4x4x4, v6e:16x16, v5e:2x2; no TPU needed.")
flags.DEFINE_integer("num_slices", 1, "--topology: number of such slices (multi-slice).")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index in [0, num_processes).")
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"],
                  "--mode=compile only: parameter / optimizer-state dtype for the memory analysis.")
flags.DEFINE_multi_string("prompt", [], "Prompt(s) for --mode=sample.")
flags.DEFINE_multi_integer("class_label", [], "Class label(s) for --mode=sample of a class-conditional "
                           "(config.model.arch='dit_moe') run.")
flags.DEFINE_integer("num_images", 4, "Images per prompt (or class label) for --mode=sample.")
flags.DEFINE_integer("seed", 0, "Sampling seed for --mode=sample and --mode=routing_maps.")
flags.DEFINE_list("routing_steps", None, "--mode=routing_maps: denoising step indices to show "
                  "(default: 4 evenly spaced).")
FLAGS = flags.FLAGS


def _encoders_given(config):
  """The command line's `config.encoders` when it names a path (it then replaces the run's), else None."""
  e = config.encoders
  return e if (e.t5_path or e.vae_path) else None


def unknown_override(argv) -> str | None:
  """The one-line message for the first `--config.KEY=...` whose KEY is not in the schema, else None."""
  known = schema.flatten(schema.base_config().to_dict())
  sections = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    if key not in known and key not in sections:
      close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.0)
      return f"--config.{key}: unknown config key; closest known: {', '.join(close)}"
  return None


# Modes that read a finished run: without --config they use the run's own (WORKDIR/config.json).
RUN_MODES = ("evaluate", "sample", "routing_maps")


def with_run_config(argv):
  """argv with `--config=ec_dit/configs.py:WORKDIR` (the run's own config) added for a `RUN_MODES` command
  that names no --config, so its `--config.sample.*` overrides apply to the run's config."""
  if command_line.flag_value(argv, "mode") in RUN_MODES and command_line.flag_value(argv, "config") is None:
    workdir = command_line.flag_value(argv, "workdir")
    if workdir:
      return argv[:1] + [f"--config={configs.__file__}:{workdir}"] + argv[1:]
  return argv


def parse_flags(argv):
  """Flag parsing with one-line errors (`ec_dit.command_line`), an unknown `--config.KEY` override included."""
  message = unknown_override(argv)
  if message:
    command_line.exit_with(message)
  return command_line.parse_flags(with_run_config(argv))


def main(argv):
  tpu_topology.cpu_unless_accelerator()  # no libtpu start-up noise on a machine without TPU or GPU
  host_memory.reuse_freed_memory()  # before JAX's first computation (ec_dit/host_memory.py)
  command_line.run_main(run, argv, expected=USER_ERRORS)  # an expected failure: one line, exit code 2


def run(argv):
  """Validates the config and dispatches on --mode (after `command_line.run_main`'s checks)."""
  if FLAGS.mode in RUN_MODES and FLAGS.workdir and not os.path.isdir(FLAGS.workdir):
    _missing_run()
  config = FLAGS.config
  if config is None:
    raise errors.UsageError(f"--config is required for --mode={FLAGS.mode} (e.g. --config=configs/ec_dit_tiny.py)"
                            + (" or --workdir of a finished run" if FLAGS.mode in RUN_MODES else ""))
  tasks.validate(config)
  if FLAGS.mode in ("train", "train_and_evaluate"):  # before anything is written or compiled
    try:
      schema.check_paths(config, FLAGS.mode)
    except ValueError as e:
      raise errors.UsageError(str(e)) from None
    sources.check_source(config.input)
  if FLAGS.mode == "summary":
    model_summary.print_summary(config)
    return
  if FLAGS.mode == "plan" or (FLAGS.mode == "compile" and FLAGS.topology):
    tpu_plan.run_cli(config, FLAGS.mode, FLAGS.topology, num_slices=FLAGS.num_slices, param_dtype=FLAGS.param_dtype,
                     config_arg=config_flags.get_config_filename(FLAGS["config"]))
    return
  command_line.initialize_distributed()  # JAX's multi-controller runtime when launched as several processes
  if FLAGS.mode == "compile":
    print(compile_report.format_report(compile_report.memory_report(config, param_dtype=FLAGS.param_dtype)),
          flush=True)
    return
  if not FLAGS.workdir:
    raise errors.UsageError(f"--workdir is required for --mode={FLAGS.mode}")
  if FLAGS.mode in RUN_MODES:  # a finished run: sampler settings may change, its model may not
    if not os.path.isdir(FLAGS.workdir):
      _missing_run()
    configs.check_applies_to_run(FLAGS.workdir, config, FLAGS.mode)
  if FLAGS.mode == "train_and_evaluate":
    evaluators.train_and_evaluate(config, FLAGS.workdir)  # the loop with sample grids, routing maps, GenEval
  elif FLAGS.mode == "train":
    evaluators.train(config, FLAGS.workdir)
  elif FLAGS.mode == "evaluate":
    generate.evaluate_run(config, FLAGS.workdir, encoders_config=_encoders_given(config))
  elif FLAGS.mode == "sample" and tasks.task_for(configs.from_run(FLAGS.workdir)).conditioning == tasks.CLASS_LABEL:
    print("\n".join(inference_class.sample_to_files(FLAGS.workdir, FLAGS.class_label, num_images=FLAGS.num_images,
                                                   seed=FLAGS.seed, encoders_config=_encoders_given(config),
                                                   class_diffusion=config.class_diffusion)))
  elif FLAGS.mode == "sample":
    if not FLAGS.prompt:
      raise errors.UsageError("--mode=sample needs at least one --prompt")
    _check_prompts(FLAGS.prompt)
    paths = inference.sample_to_files(FLAGS.workdir, FLAGS.prompt, num_images=FLAGS.num_images, seed=FLAGS.seed,
                                      encoders_config=_encoders_given(config), sample=config.sample)
    print("\n".join(paths))
  elif FLAGS.mode == "routing_maps":
    _check_prompts(FLAGS.prompt)
    steps = [int(s) for s in FLAGS.routing_steps] if FLAGS.routing_steps else None
    print("\n".join(routing_maps.routing_maps_to_files(FLAGS.workdir, FLAGS.prompt, steps=steps, seed=FLAGS.seed,
                                                        sample=config.sample)))


def _missing_run():
  raise FileNotFoundError(f"--workdir={FLAGS.workdir} does not exist: --mode={FLAGS.mode} needs a trained run "
                          f"(train first with --mode=train)")


def _check_prompts(prompts):
  """An empty --prompt is refused: it would sample the unconditional model into files named unconditional_*."""
  if any(not p.strip() for p in prompts):
    raise ValueError("--prompt: empty prompt; give the text to draw, e.g. --prompt=\"a photo of a red circle\" "
                     "(the model's unconditional samples are its guidance baseline, not a prompt)")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)
