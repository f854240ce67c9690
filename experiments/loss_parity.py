"""Bit-for-bit loss hashes of three short training runs, for refactors that must not change numbers.

    python experiments/loss_parity.py --out /tmp/parity            # prints one JSON line per run

Runs, each through the real command line (`python -m ec_dit.main --mode=train`, seed 0, loss logged
every step):
  tiny      configs/ec_dit_tiny.py, the first 30 steps (ShapesWorld pixels, text-to-image);
  class     a DiT-MoE micro config (configs/dit_moe.py:S-8E2A at width 64, 2 blocks, 3 classes), 30
            class-conditional steps on latents of ShapesWorld images in 3 class folders;
  latents   configs/ec_dit_latent_demo.py, 20 steps on `latents:DIR` prepared with random encoders.
The hash is the SHA-256 of the (step, loss) pairs of metrics.jsonl, the floats written with repr.
Run it before and after a change on the same machine: equal hashes mean equal losses bit for bit.
"""

import argparse
import hashlib
import json
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

MICRO_CLASS = ["--config.model.input_size=8", "--config.model.hidden_size=64", "--config.model.depth=2",
               "--config.model.num_heads=4", "--config.model.mlp_ratio=2.0",
               "--config.model.class_cond.num_classes=3", "--config.model.ffn.num_experts=4",
               "--config.batch_size=8", "--config.input.image_size=64",
               "--config.class_diffusion.class_labels=(0, 1, 2)"]
QUIET = ["--config.log_every_steps=1", "--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000"]


def _run(args: list[str]) -> None:
  print("+ python " + " ".join(args), file=sys.stderr, flush=True)
  subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def _loss_hash(workdir: pathlib.Path) -> tuple[str, int, float]:
  pairs = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      pairs.append((record["step"], repr(record["loss"])))
  return hashlib.sha256(json.dumps(pairs).encode()).hexdigest(), len(pairs), float(pairs[-1][1])


def _class_folders(images: pathlib.Path, out: pathlib.Path, num_classes: int = 3) -> pathlib.Path:
  """ImageNet-style class subfolders from a captioned folder (image i goes to class i mod num_classes)."""
  for i, png in enumerate(sorted(images.glob("*.png"))):
    d = out / f"class_{i % num_classes}"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(png, d / png.name)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="scratch folder (emptied first)")
  parser.add_argument("--runs", nargs="+", default=["tiny", "class", "latents"], choices=["tiny", "class", "latents"])
  args = parser.parse_args(argv)
  root = pathlib.Path(args.out).resolve()
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  enc = ["--config.encoders.t5_path=" + str(root / "encoders/t5"), "--config.encoders.vae_path=" + str(root / "encoders/vae")]
  if {"class", "latents"} & set(args.runs):
    _run(["-m", "ec_dit.tools.random_encoders", "--out", str(root / "encoders")])
    _run(["-m", "ec_dit.tools.shapes_folder", "--out", str(root / "images"), "--n", "48", "--size", "64"])
  for name in args.runs:
    workdir = root / name
    if name == "tiny":
      _run(["-m", "ec_dit.main", "--config=configs/ec_dit_tiny.py", f"--workdir={workdir}", "--mode=train",
            "--config.num_train_steps=30", *QUIET])
    elif name == "class":
      classes = _class_folders(root / "images", root / "classes")
      cfg = "--config=configs/dit_moe.py:S-8E2A"
      _run(["-m", "ec_dit.prepare", cfg, f"--source=folder:{classes}", f"--out={root / 'prepared_class'}",
            "--examples_per_shard=16", enc[1], *MICRO_CLASS])
      _run(["-m", "ec_dit.main", cfg, f"--workdir={workdir}", "--mode=train", "--config.num_train_steps=30",
            f"--config.input.source=latents:{root / 'prepared_class'}", enc[1], *MICRO_CLASS, *QUIET])
    else:
      cfg = "--config=configs/ec_dit_latent_demo.py"
      _run(["-m", "ec_dit.prepare", cfg, f"--source=folder:{root / 'images'}", f"--out={root / 'prepared'}",
            "--examples_per_shard=16", *enc])
      _run(["-m", "ec_dit.main", cfg, f"--workdir={workdir}", "--mode=train", "--config.num_train_steps=20",
            f"--config.input.source=latents:{root / 'prepared'}", *enc, *QUIET])
    digest, n, last = _loss_hash(workdir)
    print(json.dumps({"run": name, "steps_logged": n, "last_loss": last, "sha256": digest}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
