"""Adaptive compute, measured: do the experts pick the tokens (and images) that need them?

EC-DiT's mechanism: with expert choice a token gets between 0 and E experts, and the paper says
compute goes to detailed regions and complex prompts. On the held-out examples
(ec_dit.training.heldout: the same examples, fixed noise, at a grid of t), this measures

  * per token, the Spearman rank correlation between the number of experts it gets in each MoE
    layer of an expert-choice run (and their sum over the layers) and its difficulty:
      - the dense run's per-token loss on the same inputs (the velocity error over the token's
        pixels; same seed: same data, same held-out set),
      - the local image detail: the edge density of the clean image under the token (mean
        absolute finite difference over its pixels);
  * for an expert-choice run with one routing group over the whole batch (ec_batch), the expert
    slots each image receives against the number of objects in it (counting and two-object
    prompts against single-object ones): the mean share of its fair share (cf x tokens) by
    object count, and the Spearman correlation of slots with object count.

Writes OUT/adaptive_compute.{json,png,md}; with --routing_md, the markdown replaces the section
between "<!-- adaptive_compute:start -->" and "<!-- adaptive_compute:end -->" of that file (appended
when absent).

  python experiments/adaptive_compute.py --ec /work/runs32/runs/ec_s0 --dense /work/runs32/runs/dense_s0 \
      --ec_batch /work/runs32/runs/ec_batch_s0 --out docs --routing_md docs/routing.md
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from ec_dit import checkpoint, diffusion, tasks, tokenizer as tokenizer_lib
from ec_dit.data import pipeline, sources
from ec_dit.inference import load_run_config
from ec_dit.training import state as state_lib

T_VALUES = (0.1, 0.3, 0.5, 0.7, 0.9)
START, END = "<!-- adaptive_compute:start -->", "<!-- adaptive_compute:end -->"


def load(workdir: str, initial: bool = False):
  """(config, jitted forward(x_t, t, tokens, mask) -> (v, {layer: experts_per_token [B, S]})) with the run's EMA
  weights, or with `initial` its initial weights (the control: what routing does before any training)."""
  config = load_run_config(workdir)
  graphdef, init = state_lib.init_model(config)
  params = init if initial else jax.tree.map(
      jnp.asarray, checkpoint.restore_ema(workdir, tasks.task_for(config).abstract_params(config)))

  @jax.jit
  def apply(params, x, t, tokens, mask):
    v, aux = nnx.merge(graphdef, params)(x, t, tokens, mask)
    return v, {k: d["experts_per_token"] for k, d in aux["moe"].items()}
  return config, lambda *inputs: apply(params, *inputs)


def held_out(config, n: int):
  """The run's held-out examples (pixels, tokens, mask) and each one's number of objects and task."""
  tokenize = tokenizer_lib.tokenizer_from_config(config).encode
  examples = pipeline.held_out_examples(config.input, n, tokenize=tokenize)
  source, indices = sources.held_out_source(config.input, n)
  meta = [json.loads(source[i]["metadata"]) for i in indices]
  objects = np.array([sum(int(c.get("count", 1)) for c in m["include"]) for m in meta])
  return examples, objects, [m.get("tag", "") for m in meta]


def per_token(x: np.ndarray, p: int) -> np.ndarray:
  """[B, H, W] -> [B, S]: the mean over each p x p patch, in the model's token order (row-major)."""
  b, h, w = x.shape
  return x.reshape(b, h // p, p, w // p, p).mean(axis=(2, 4)).reshape(b, -1)


def edge_density(images: np.ndarray, p: int) -> np.ndarray:
  """Mean absolute horizontal + vertical finite difference of the clean image, per token."""
  g = np.zeros(images.shape[:3])
  g[:, :, :-1] += np.abs(np.diff(images, axis=2)).mean(-1)
  g[:, :-1, :] += np.abs(np.diff(images, axis=1)).mean(-1)
  return per_token(g, p)


def run_model(forward, examples, t: float, noise: np.ndarray, batch: int):
  """Per-token squared velocity error [N, H, W] and experts per token {layer: [N, S]} at time t, in batches."""
  errors, counts = [], {}
  for i in range(0, len(noise), batch):
    x0, eps = examples["image"][i:i + batch], noise[i:i + batch]
    tb = jnp.full((len(x0),), t, jnp.float32)
    v, moe = forward(diffusion.interpolate(x0, eps, tb), tb, examples["tokens"][i:i + batch],
                     examples["mask"][i:i + batch])
    errors.append(np.mean(np.square(np.asarray(v) - (eps - x0)), axis=-1))
    for k, c in moe.items():
      counts.setdefault(k, []).append(np.asarray(c))
  return np.concatenate(errors), {k: np.concatenate(c) for k, c in counts.items()}


def spearman_ci(a: np.ndarray, b: np.ndarray, resamples: int = 200, seed: int = 0) -> tuple[float, float, float]:
  """Spearman of a and b ([N, ...] per image, pooled) and its 95% bootstrap interval, resampling images:
  tokens of one image are not independent draws, images are."""
  rho = float(stats.spearmanr(a.ravel(), b.ravel())[0])
  rng = np.random.default_rng(seed)
  boot = []
  for _ in range(resamples):
    pick = rng.integers(0, len(a), len(a))
    boot.append(stats.spearmanr(a[pick].ravel(), b[pick].ravel())[0])
  low, high = np.nanpercentile(boot, [2.5, 97.5])
  return rho, float(low), float(high)


def measure(args) -> dict:
  ec_config, ec = load(args.ec)
  dense_config, dense = load(args.dense)
  if (ec_config.input.data_seed, ec_config.input.num_examples) != (dense_config.input.data_seed,
                                                                      dense_config.input.num_examples):
    raise SystemExit("--ec and --dense must share the data seed and num_examples (the same held-out set)")
  examples, objects, tags = held_out(ec_config, args.num_examples)
  p, batch = ec_config.model.patch_size, ec_config.batch_size
  edges = edge_density(examples["image"], p)
  key = jax.random.key(args.seed)
  result = {"t": list(T_VALUES), "num_examples": len(objects), "ec": {}, "ec_batch": {}, "ec_initial": {}}
  batched = load(args.ec_batch)[1] if args.ec_batch else None
  _, initial = load(args.ec, initial=True)
  for k, t in enumerate(T_VALUES):
    noise = np.asarray(jax.random.normal(jax.random.fold_in(key, k), examples["image"].shape))
    dense_err, _ = run_model(dense, examples, t, noise, batch)
    difficulty = per_token(dense_err, p)
    _, counts = run_model(ec, examples, t, noise, batch)
    counts["all"] = sum(counts.values())
    for layer, c in counts.items():
      r = result["ec"].setdefault(layer, {"dense_loss": [], "edge_density": []})
      if layer == "all":  # with a bootstrap interval over images
        for what, d in (("dense_loss", difficulty), ("edge_density", edges)):
          rho, low, high = spearman_ci(c, d)
          r[what].append(rho)
          r.setdefault(what + "_ci", []).append([low, high])
        continue
      r["dense_loss"].append(float(stats.spearmanr(c.ravel(), difficulty.ravel())[0]))
      r["edge_density"].append(float(stats.spearmanr(c.ravel(), edges.ravel())[0]))
    _, counts = run_model(initial, examples, t, noise, batch)
    c = sum(counts.values())
    r = result["ec_initial"].setdefault("all", {})
    for what, d in (("dense_loss", difficulty), ("edge_density", edges)):
      rho, low, high = spearman_ci(c, d)
      r.setdefault(what, []).append(rho)
      r.setdefault(what + "_ci", []).append([low, high])
    if batched is not None:
      _, counts = run_model(batched, examples, t, noise, batch)
      counts["all"] = sum(counts.values())
      for layer, c in counts.items():
        fair = c.sum() / len(c)  # slots per image if every image got the same
        share = c.sum(1) / fair
        r = result["ec_batch"].setdefault(layer, {"spearman_objects": [], "share_by_objects": {}})
        rho, low, high = spearman_ci(share, objects)
        r["spearman_objects"].append(rho)
        r.setdefault("spearman_objects_ci", []).append([low, high])
        for n in sorted(set(objects.tolist())):
          r["share_by_objects"].setdefault(str(n), []).append(float(share[objects == n].mean()))
        if layer == "all":
          r2 = result["ec_batch"].setdefault("tokens_all", {"dense_loss": [], "edge_density": []})
          r2["dense_loss"].append(float(stats.spearmanr(c.ravel(), difficulty.ravel())[0]))
          r2["edge_density"].append(float(stats.spearmanr(c.ravel(), edges.ravel())[0]))
  result["objects_histogram"] = {str(n): int((objects == n).sum()) for n in sorted(set(objects.tolist()))}
  result["runs"] = {"ec": args.ec, "dense": args.dense, "ec_batch": args.ec_batch}
  return result


def figure(result: dict, path: str) -> None:
  fig = Figure(figsize=(11, 4), layout="constrained")
  FigureCanvasAgg(fig)
  ax1, ax2 = fig.subplots(1, 2)
  t = result["t"]
  for i, (layer, r) in enumerate(result["ec"].items()):
    ax1.plot(t, r["dense_loss"], color=f"C{i}", marker="o", label=f"{layer}: dense model's loss")
    ax1.plot(t, r["edge_density"], color=f"C{i}", marker="x", linestyle="--", label=f"{layer}: edge density")
  for what, marker in (("dense_loss", "o"), ("edge_density", "x")):
    ax1.plot(t, result["ec_initial"]["all"][what], color="0.6", marker=marker, linestyle=":",
             label=f"all, initial weights (control): {what.replace('_', ' ')}")
  ax1.axhline(0, color="k", linewidth=0.5)
  ax1.set_xlabel("t (1 = pure noise)")
  ax1.set_ylabel("Spearman: experts per token vs difficulty")
  ax1.legend(fontsize=6)
  ax1.set_title("expert choice, per-image groups", fontsize=9)
  if "all" in result["ec_batch"]:
    for i, (n, share) in enumerate(result["ec_batch"]["all"]["share_by_objects"].items()):
      ax2.plot(t, share, marker="o", color=f"C{i}", label=f"{n} object{'s' if n != '1' else ''}")
    ax2.axhline(1, color="k", linewidth=0.5)
    ax2.set_xlabel("t (1 = pure noise)")
    ax2.set_ylabel("expert slots per image / fair share (all MoE layers)")
    ax2.legend(fontsize=8)
    ax2.set_title("expert choice, one group over the batch", fontsize=9)
  fig.savefig(path, dpi=110)


def markdown(result: dict, figure_name: str) -> str:
  t = result["t"]
  head = "| layer | vs | " + " | ".join(f"t={x:g}" for x in t) + " |"
  lines = [f"On {result['num_examples']} held-out examples with fixed noise; Spearman rank correlation over all "
           f"tokens between a token's number of experts and its difficulty (\"all\": summed over the MoE layers, "
           f"with a 95% bootstrap interval over images). The control row is the same expert-choice model at its "
           f"initial weights (before any training): what routing by token statistics alone gives.", "", head,
           "|---|---|" + "---|" * len(t)]
  for layer, r in [*result["ec"].items(), ("all, initial weights (control)", result["ec_initial"]["all"])]:
    for what in ("dense_loss", "edge_density"):
      lines.append(f"| {layer} | {what.replace('_', ' ')} | " + " | ".join(
          f"{v:+.2f}" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
          for v, ci in zip(r[what], r.get(what + "_ci", [None] * len(r[what])))) + " |")
  if "all" in result["ec_batch"]:
    r = result["ec_batch"]["all"]
    lines += ["", "One routing group over the whole batch (ec_batch): expert slots per image over the fair share "
              f"(1 = as per-image groups give every image), all MoE layers; objects per image: "
              f"{result['objects_histogram']}.", "", "| objects | " + " | ".join(f"t={x:g}" for x in t) + " |",
              "|---|" + "---|" * len(t)]
    for n, share in r["share_by_objects"].items():
      lines.append(f"| {n} | " + " | ".join(f"{v:.3f}" for v in share) + " |")
    lines.append("| Spearman(slots, objects) | " + " | ".join(
        f"{v:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]" for v, ci in zip(r["spearman_objects"], r["spearman_objects_ci"]))
                 + " |")
    tok = result["ec_batch"]["tokens_all"]
    for what in ("dense_loss", "edge_density"):
      lines.append(f"| tokens: Spearman vs {what.replace('_', ' ')} | "
                   + " | ".join(f"{v:+.2f}" for v in tok[what]) + " |")
  lines += ["", f"![Adaptive compute]({figure_name})", "", "Runs: " + ", ".join(f"{k} = {os.path.basename(v.rstrip('/'))}" for k, v in result["runs"].items() if v)]
  return "\n".join(lines) + "\n"


def replace_section(path: str, text: str) -> None:
  old = open(path).read() if os.path.exists(path) else ""
  section = f"{START}\n{text}{END}"
  if START in old and END in old:
    new = old[:old.index(START)] + section + old[old.index(END) + len(END):]
  else:
    new = old.rstrip("\n") + "\n\n## Adaptive compute, measured\n\n" + section + "\n"
  with open(path, "w") as f:
    f.write(new)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--ec", required=True, help="workdir of an expert-choice run (per-image groups)")
  parser.add_argument("--dense", required=True, help="workdir of the dense run with the same seed")
  parser.add_argument("--ec_batch", default="", help="workdir of an expert-choice run with whole-batch groups")
  parser.add_argument("--num_examples", type=int, default=256)
  parser.add_argument("--seed", type=int, default=0, help="the fixed noise")
  parser.add_argument("--out", default="docs")
  parser.add_argument("--routing_md", default="", help="markdown file whose adaptive-compute section is replaced")
  args = parser.parse_args()
  result = measure(args)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "adaptive_compute.json"), "w") as f:
    json.dump(result, f, indent=1)
  figure(result, os.path.join(args.out, "adaptive_compute.png"))
  text = markdown(result, "adaptive_compute.png")
  with open(os.path.join(args.out, "adaptive_compute.md"), "w") as f:
    f.write(text)
  if args.routing_md:
    replace_section(args.routing_md, text)
  print(text, flush=True)


if __name__ == "__main__":
  main()
