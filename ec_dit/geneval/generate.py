"""Generating a GenEval prompt set from a trained run, and scoring it (`--mode=evaluate`)."""

from __future__ import annotations

import json
import os
from typing import Any

from tqdm import tqdm

from ec_dit import inference
from ec_dit.geneval import harness, layout, prompts as prompts_lib, reference, scores as scores_lib
from ec_dit.inference import TextToImagePipeline


def geneval_command(images: str, results: str) -> str:
  """The commands that score a folder with GenEval's own detector (Mask2Former), then summarise it here."""
  return (f"cd geneval && python evaluation/evaluate_images.py {os.path.abspath(images)} "
          f"--outfile {os.path.abspath(results)} --model-path <MASK2FORMER_FOLDER>\n"
          f"python -m ec_dit.geneval summary {os.path.abspath(results)}")


def evaluate_run(config, workdir: str, *, encoders_config=None) -> dict[str, Any]:
  """Generates the config's GenEval prompt set into workdir/geneval, and scores it when it can.

  ShapesWorld (`geneval.domain = "shapes"`): scored here with the exact detector;
  prints the table with its JSON line last and returns the summary. COCO (the
  paper configs: GenEval's official 553 prompts): the images are written in
  GenEval's layout and the command that scores them with GenEval's detector is
  printed (it needs a GPU and mmdet); returns {"images": folder, "command": ...}.
  `encoders_config` replaces the run's `config.encoders` (a latent run).
  """
  g = config.geneval
  out = os.path.join(workdir, "geneval")
  suite = prompts_lib.suite_from_config(g)
  pipe = TextToImagePipeline.from_run(workdir, batch_size=g.batch_size, encoders_config=encoders_config)  # fails first on a missing run: writes nothing
  os.makedirs(out, exist_ok=True)
  prompts_lib.write_prompts(suite, os.path.join(out, "prompts.jsonl"))
  # The sampler settings come from the config given now (the run's weights and model from its workdir),
  # so `--mode=evaluate --config.sample.guidance_scale=...` compares samplers on one run.
  generate_into(pipe, suite, os.path.join(out, "images"), n=g.images_per_prompt, seed=config.sample.seed,
                sample=config.sample)
  if g.domain != "shapes":
    command = geneval_command(os.path.join(out, "images"), os.path.join(out, "results.jsonl"))
    print(f"wrote {len(suite)} prompts x {g.images_per_prompt} images in GenEval's layout to "
          f"{os.path.join(out, 'images')}; score them with GenEval's detector:\n{command}", flush=True)
    return {"images": os.path.join(out, "images"), "command": command}
  rows = harness.evaluate_images(os.path.join(out, "images"), os.path.join(out, "results.jsonl"), prompts=suite)
  scores = scores_lib.summarize(rows)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(scores, f, indent=2)
  print(scores_lib.format_summary(scores), flush=True)
  return scores


def generate_into(pipe, prompts: list[dict], out_dir: str, *, n: int = 4, seed: int = 0, progress: bool = True,
                  sample=None):
  """Writes n samples per GenEval prompt in GenEval's folder layout.

  `sample` (a config.sample section) overrides the pipeline's sampler, steps and guidance settings.
  """
  kwargs = {} if sample is None else inference.sampler_settings(sample)
  texts = [p["prompt"] for p in prompts]
  per_call = max(1, pipe.batch_size // n)
  with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not progress) as bar:
    for start in range(0, len(prompts), per_call):
      images = pipe.generate(texts[start:start + per_call], num_images_per_prompt=n, seed=seed, first_index=start,
                             **kwargs)
      for i, meta in enumerate(prompts[start:start + per_call]):
        layout.write_prompt_folder(out_dir, start + i, meta, list(images[i * n:(i + 1) * n]))
      bar.update(len(images) // n)
  if prompts:
    first = [layout.load_image(os.path.join(layout.prompt_dir(out_dir, i), "grid.png"))
             for i in range(min(len(prompts), 16))]
    widths = {im.shape for im in first}
    if len(widths) == 1:
      layout.save_png(layout.make_grid(first, cols=1), os.path.join(out_dir, "grid.png"))
  reference.write_beside(prompts, out_dir)  # what `evaluate` scores against (ec_dit.geneval.reference)
