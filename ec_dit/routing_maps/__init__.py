"""What the router does: routing maps, the per-token compute spread, expert specialisation.

The figures are here; `routing_maps.trace` records the router through the pipeline's own sampler.

    from ec_dit import routing_maps
    pipe = TextToImagePipeline.from_run("runs/tiny")
    trace = routing_maps.trace_routing(pipe, ["a photo of a red circle"])
    routing_maps.routing_map_figure(trace)      # the image beside experts-per-token maps per MoE layer and step
    routing_maps.compute_spread_figure(trace)   # std / min / max of experts per token against t
    labels, counts = routing_maps.expert_specialisation(pipe, routing_maps.shapes_world_groups("shape"),
                                                        region="objects")
    routing_maps.specialisation_figure(labels, counts)   # how often each expert is chosen per group

Recording (`trace_routing`, `expert_specialisation`, ...) lives in
`ec_dit.routing_maps.trace`, the ShapesWorld prompt groups and object masks in
`ec_dit.data.shapes_world_analysis`; both are re-exported here. Figures are plain matplotlib
`Figure`s drawn with the Agg canvas (no pyplot state, no display needed); in a
notebook, `display(fig)` shows them inline.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ec_dit.images import prompt_stem, save_png, write_prompt_sidecar
from ec_dit.inference import TextToImagePipeline, sampler_settings
from ec_dit.data.shapes_world_analysis import foreground, object_tokens, shapes_world_groups  # noqa: F401
from ec_dit.routing_maps.trace import (REGIONS, RoutingTrace, expert_specialisation,  # noqa: F401
                                  specialisation_counts, trace_routing)

NUM_SHOWN_STEPS = 4  # denoising steps shown by default: evenly spaced from the first to the last


def default_steps(num_steps: int, count: int = NUM_SHOWN_STEPS) -> list[int]:
  """`count` step indices evenly spaced from the first (t = 1) to the last."""
  return sorted({int(round(v)) for v in np.linspace(0, num_steps - 1, min(count, num_steps))})


def upsample(token_map: np.ndarray, patch_size: int) -> np.ndarray:
  """[S] per-token values (row-major token grid) -> [H, W] on the image's pixel grid."""
  side = int(round(np.sqrt(token_map.shape[-1])))
  grid = np.asarray(token_map).reshape(side, side)
  return np.repeat(np.repeat(grid, patch_size, axis=0), patch_size, axis=1)


def _canvas(fig: Figure) -> Figure:
  FigureCanvasAgg(fig)
  return fig


def routing_map_figure(trace: RoutingTrace, index: int = 0, steps: Sequence[int] | None = None,
                       outline: bool = True) -> Figure:
  """Image `index` beside a heatmap of experts per token for every MoE layer (rows) and step (columns).

  Each heatmap is on the image's pixel grid (a token covers patch x patch pixels);
  white lines outline the objects of the final image. One shared colour scale.
  """
  steps = default_steps(len(trace.ts)) if steps is None else list(steps)
  layers = trace.layers
  rows, cols = max(1, len(layers)), len(steps) + 1
  fig = _canvas(Figure(figsize=(1.9 * cols + 0.8, 1.9 * rows + 0.5), layout="constrained"))
  grid = fig.add_gridspec(rows, cols)
  image = trace.images[index]
  ax = fig.add_subplot(grid[0, 0])
  ax.imshow(image, interpolation="nearest")
  ax.set_title(_wrap(trace.prompts[index]), fontsize=8)
  ax.set_axis_off()
  ax.set_label("image")
  vmax = max([1.0] + [float(np.max(trace.experts_per_token[n][steps, index])) for n in layers])
  mappable, fg = None, foreground(image)
  for r, name in enumerate(layers):
    for c, step in enumerate(steps):
      ax = fig.add_subplot(grid[r, c + 1])
      mappable = ax.imshow(upsample(trace.experts_per_token[name][step, index], trace.patch_size),
                           cmap="magma", vmin=0.0, vmax=vmax, interpolation="nearest")
      if outline and fg.any():
        ax.contour(fg, levels=[0.5], colors="white", linewidths=0.6)
      ax.set_xticks([]), ax.set_yticks([])
      ax.set_label(f"{name}@{step}")  # what the panel shows, for tests and tools
      if r == 0:
        ax.set_title(f"step {step}, t={trace.ts[step]:.2f}", fontsize=8)
      if c == 0:
        ax.set_ylabel(name, fontsize=8)
  if mappable is not None:
    label = "experts per token" + (" (k + shared)" if trace.kind == "token_choice" else "")
    fig.colorbar(mappable, ax=fig.axes[1:], shrink=0.8, label=label)
  else:
    fig.axes[0].set_title(f"{_wrap(trace.prompts[index])}\n(no MoE layers: {trace.kind} FFN)", fontsize=8)
  return fig


def compute_spread(trace: RoutingTrace, index: int | None = None) -> dict[str, dict[str, np.ndarray]]:
  """layer -> {"std", "min", "max", "mean"}: [N] per step, over the tokens of an image (averaged over images)."""
  out = {}
  for name, m in trace.experts_per_token.items():
    m = m if index is None else m[:, index:index + 1]
    out[name] = {stat: np.mean(getattr(np, stat)(m, axis=-1), axis=-1) for stat in ("std", "min", "max", "mean")}
  return out


def compute_spread_figure(trace: RoutingTrace, index: int | None = None) -> Figure:
  """How unevenly compute is spread over tokens at each t: std, and min / max, of experts per token."""
  spread = compute_spread(trace, index)
  fig = _canvas(Figure(figsize=(9, 3.2), layout="constrained"))
  ax_std, ax_range = fig.subplots(1, 2)
  for j, (name, s) in enumerate(sorted(spread.items())):
    colour = f"C{j}"
    ax_std.plot(trace.ts, s["std"], color=colour, label=name)
    ax_range.plot(trace.ts, s["max"], color=colour, label=f"{name} max")
    ax_range.plot(trace.ts, s["min"], color=colour, linestyle="--", label=f"{name} min")
  for ax, title in ((ax_std, "std over tokens"), (ax_range, "max (solid) / min (dashed) over tokens")):
    ax.set_xlim(1.0, 0.0)  # denoising runs from t = 1 (noise) to 0
    ax.set_xlabel("t (1 = noise)")
    ax.set_ylabel("experts per token")
    ax.set_title(title, fontsize=9)
  if spread:
    ax_std.legend(fontsize=7)
  fig.suptitle(f"per-token compute spread ({trace.kind})", fontsize=10)
  return fig


def specialisation_figure(labels: Sequence[str], counts: Mapping[str, np.ndarray], title: str = "") -> Figure:
  """DiT-MoE's analysis: per layer, the share of each group's routed tokens that each expert took."""
  layers = sorted(counts)
  fig = _canvas(Figure(figsize=(2.6 * max(1, len(layers)) + 1.4, 0.3 * len(labels) + 1.8), layout="constrained"))
  axes = list(fig.subplots(1, max(1, len(layers)), squeeze=False)[0])
  share = {n: counts[n] / np.maximum(counts[n].sum(axis=1, keepdims=True), 1e-9) for n in layers}
  vmax = max([1e-6] + [float(s.max()) for s in share.values()])
  mappable = None
  for ax, name in zip(axes, layers):
    mappable = ax.imshow(share[name], cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("expert")
    ax.set_xticks(range(share[name].shape[1]))
    ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels), fontsize=8)
  if mappable is not None:
    fig.colorbar(mappable, ax=axes, label="share of the group's choices")
  fig.suptitle(title or "expert choice frequency per group", fontsize=10)
  return fig


def figure_to_array(fig: Figure) -> np.ndarray:
  """uint8 [H, W, 3] RGB rendering of a figure (for TensorBoard)."""
  canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  save_png(figure_to_array(fig), path)
  return path


def _wrap(text: str, width: int = 24) -> str:
  words, lines, line = text.split(), [], ""
  for w in words:
    if line and len(line) + 1 + len(w) > width:
      lines.append(line)
      line = w
    else:
      line = f"{line} {w}".strip()
  return "\n".join(lines + [line]) if line else '""'


def routing_maps_to_files(workdir: str, prompts: Sequence[str], *, steps: Sequence[int] | None = None,
                          seed: int = 0, specialisation_by: Sequence[str] = ("shape", "color"),
                          sample=None) -> list[str]:
  """`--mode=routing_maps`: PNGs in workdir/routing_maps from the run's latest EMA weights; returns their paths.

  `sample` (a `config.sample` section) replaces the run's sampler settings.
  Per prompt: `<index>_<prompt>_<seed>.png` (image + maps), `..._spread.png` and `....json` (the full prompt);
  then `specialisation_<by>_<all|objects>.png` for each ShapesWorld grouping in
  `specialisation_by` (an MoE model only).
  """
  pipe = TextToImagePipeline.from_run(workdir, batch_size=1)
  out_dir = os.path.join(workdir, "routing_maps")
  settings = {} if sample is None else sampler_settings(sample)
  paths = []
  if prompts:
    trace = trace_routing(pipe, prompts, seed=seed, **settings)
    for i, prompt in enumerate(trace.prompts):
      stem = os.path.join(out_dir, prompt_stem(i, prompt, seed))  # unique per prompt; full prompt in the sidecar
      paths.append(save_figure(routing_map_figure(trace, i, steps), stem + ".png"))
      write_prompt_sidecar(stem + ".json", prompt, index=i, seed=seed)
      paths.append(save_figure(compute_spread_figure(trace, i), stem + "_spread.png"))
  if pipe.config.model.ffn.kind != "dense":
    for by in specialisation_by:
      for region in ("all", "objects"):
        labels, counts = expert_specialisation(pipe, shapes_world_groups(by), seed=seed, region=region,
                                               **settings)
        fig = specialisation_figure(labels, counts, f"expert choice frequency per {by} ({region.rstrip('s')} tokens)")
        paths.append(save_figure(fig, os.path.join(out_dir, f"specialisation_{by}_{region}.png")))
  return paths


def write_training_routing_maps(config, params, workdir: str, step: int, writer,
                                pipe: TextToImagePipeline | None = None) -> str | None:
  """During training, beside the sample grids: the routing map of the first sample prompt.

  Writes workdir/routing_maps/step_<step>.png and the TensorBoard images
  `routing_maps` and `routing_spread`. `params` are the weights to sample with
  (the EMA); pass the loop's sample-grid `pipe` to reuse its compiled model. Returns
  the PNG's path, or None for a dense model (nothing is routed).
  """
  if config.model.ffn.kind == "dense":
    return None
  pipe = pipe or TextToImagePipeline(config, params, batch_size=1)
  pipe.params = params
  trace = trace_routing(pipe, list(config.sample.prompts)[:1] or [""], seed=config.sample.seed)
  maps = figure_to_array(routing_map_figure(trace))
  path = os.path.join(workdir, "routing_maps", f"step_{step:07d}.png")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  save_png(maps, path)
  writer.write_image(step, "routing_maps", maps)
  writer.write_image(step, "routing_spread", figure_to_array(compute_spread_figure(trace)))
  return path
