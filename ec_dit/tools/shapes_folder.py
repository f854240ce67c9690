"""A folder of captioned ShapesWorld images (`NNNNN.png` + `NNNNN.txt`), the `folder:PATH` source layout.

    python -m ec_dit.tools.shapes_folder --out DIR --n 512 --size 64

For trying `python -m ec_dit.prepare` and the latent path on images without a dataset at hand
(docs/latent_data.md); any folder of images with same-stem `.txt` captions works the same way.
"""

from __future__ import annotations

import argparse
import pathlib

from tqdm import tqdm

from ec_dit.data.shapes_world import ShapesWorldSource
from ec_dit.images import save_png
from ec_dit.schema import TASKS


def write_folder(out, n: int, size: int = 64, seed: int = 0) -> pathlib.Path:
  """Writes n ShapesWorld images with GenEval-template captions; returns the folder."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  source = ShapesWorldSource(size, n, seed=seed, tasks=TASKS)
  for i in tqdm(range(n), desc="images", unit="image"):
    example = source[i]
    save_png(example["image"], str(out / f"{i:05d}.png"))
    (out / f"{i:05d}.txt").write_text(example["caption"])
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ec_dit.tools.shapes_folder", description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="folder to write the images and captions into")
  parser.add_argument("--n", type=int, default=512, help="number of images")
  parser.add_argument("--size", type=int, default=64, help="image height = width in pixels")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  print(f"wrote {args.n} captioned images to {write_folder(args.out, args.n, args.size, args.seed)}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
