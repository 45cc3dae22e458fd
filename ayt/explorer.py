"""The interactive explorer of notebooks/explore.ipynb: samples, noisy inputs and tangents of runs.

    from ayt.explorer import Explorer
    Explorer(["runs/demo-ayt"], t=1.0, seed=0, steps=1).widget      # display it in JupyterLab

Rows (`explore_panels`): samples (1- or 2-step), x_t = x_0 + t eps for training images, f(x_t, t),
the discrete CM tangent and AYT's update direction (the JVP tangent when the run has no feature net),
drawn by `ayt.plotting.explore_figure` and shown as a PNG (an `image/png` output of an ipywidgets
Output, so it renders with any matplotlib backend and in the saved notebook).

Interaction: one redraw per widget change (switching runs updates the checkpoint list without
redrawing in between); loaded networks are kept per (run, checkpoint) in a small LRU cache, the
run's training data and feature-net distance per run, and the samples and tangent rows per widget
values, so after the first load a change costs at most one sampling pass, one tangent grid and one
figure (a change of t no sampling, a change of steps no tangents).
"""
from __future__ import annotations

import base64
import time
import traceback
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator, Optional, Sequence, Union

from .notebook import LoadedCheckpoint, load_checkpoint, run_distance, samples_from, tangent_grid_at
from .runs import build_dataset

PathLike = Union[str, Path]
T_CHOICES = (0.01, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 40.0, 80.0)   # the paper's tangent figure's t
STEPS = (1, 2)


class LRUCache:
    """At most `size` values, least recently used evicted first; `get(key, make)` calls make() on a miss
    (counted in `misses`)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"cache size must be >= 1, got {size}")
        self.size, self.misses = size, 0
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self.misses += 1
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


def sample_rows(loaded: LoadedCheckpoint, seed: int = 0, steps: int = 1, n: int = 8) -> dict:
    """{'samples (k-step)': [n, C, H, W]}: the explorer's first row."""
    return {f"samples ({steps}-step)": samples_from(loaded, n, seed, steps)}


def tangent_rows(loaded: LoadedCheckpoint, dataset, distance, t: float = 1.0, seed: int = 0, n: int = 8) -> dict:
    """The explorer's other rows for n training images at noise level t: x_t, f(x_t, t), the discrete CM
    tangent, and AYT's update direction (the JVP tangent when `distance` is None). {label: [n, C, H, W]}."""
    grid = tangent_grid_at(loaded, dataset, distance, [t], n=n, seed=seed, jvp=distance is None)
    second = "ayt_direction" if "ayt_direction" in grid else "cm_tangent_jvp"
    return {f"x_t (t={t:g})": grid["x_t"][0], "f(x_t, t)": grid["f"][0], "CM tangent": grid["cm_tangent"][0],
            ("AYT direction" if second == "ayt_direction" else "CM tangent (JVP)"): grid[second][0]}


def explore_panels_from(loaded: LoadedCheckpoint, dataset, distance, t: float = 1.0, seed: int = 0,
                        steps: int = 1, n: int = 8) -> dict:
    """The explorer's rows for a loaded consistency network: {label: [n, C, H, W]} (see the module doc).
    dataset: the run's training data (`ayt.runs.build_dataset`); distance: `ayt.notebook.run_distance`."""
    return {**sample_rows(loaded, seed, steps, n), **tangent_rows(loaded, dataset, distance, t, seed, n)}


def explore_panels(run_dir: PathLike, iteration: Optional[int] = None, t: float = 1.0, seed: int = 0,
                   steps: int = 1, n: int = 8, device: Optional[str] = None) -> dict:
    """`explore_panels_from` for a run directory at checkpoint `iteration` (None or < 0: the latest)."""
    loaded = load_checkpoint(run_dir, iteration, "ema", device)
    if loaded.cfg.stage != "consistency":
        raise ValueError(f"{run_dir} is a {loaded.cfg.stage!r} run; the explorer needs a consistency run")
    return explore_panels_from(loaded, build_dataset(loaded.cfg),
                               run_distance(loaded.cfg, loaded.img_channels, loaded.device), t, seed, steps, n)


def panel_title(run_dir: PathLike, iteration: int, t: float, seed: int, steps: int) -> str:
    return f"{Path(run_dir).name} @ iteration {iteration}: t = {t:g}, seed {seed}, {steps}-step samples"


def png_output(png: bytes, text: str = "") -> dict:
    """A Jupyter display_data output (nbformat) holding one PNG image."""
    return {"output_type": "display_data", "metadata": {},
            "data": {"image/png": base64.b64encode(png).decode("ascii"), "text/plain": text or "<PNG image>"}}


def text_output(text: str, name: str = "stdout") -> dict:
    return {"output_type": "stream", "name": name, "text": text if text.endswith("\n") else text + "\n"}


class Explorer:
    """ipywidgets explorer over (run, checkpoint, t, seed, sampler steps); `.widget` is what to display.

    run_dirs: consistency run directories (the first one is shown first); n: images per row; t, seed,
    steps, iteration (-1: the latest checkpoint): the initial widget values (a notebook's parameters).
    cache_size: networks kept loaded (per run and checkpoint). loader: how a checkpoint is loaded,
    `ayt.notebook.load_checkpoint`'s signature. After every redraw, `redraws` counts them and
    `last_redraw_s` is its wall time.
    """

    def __init__(self, run_dirs: Sequence[PathLike], n: int = 8, t: float = 1.0, seed: int = 0, steps: int = 1,
                 iteration: int = -1, device: Optional[str] = None, cache_size: int = 4,
                 loader: Callable[..., LoadedCheckpoint] = load_checkpoint):
        import ipywidgets as W
        from . import checkpoint as ck
        self._list_checkpoints = lambda run: ck.list_weights(run, "ema")  # checkpoints and snapshots
        runs = [str(r) for r in run_dirs]
        if not runs:
            raise ValueError("the explorer needs at least one run directory")
        missing = [r for r in runs if not Path(r).is_dir()]
        if missing:
            raise FileNotFoundError(f"explorer: no such run directory: {', '.join(missing)}")
        if steps not in STEPS:
            raise ValueError(f"explorer: steps must be one of {STEPS}, got {steps}")
        if t <= 0:
            raise ValueError(f"explorer: t must be > 0, got {t}")
        self.n, self.device, self.loader = n, device, loader
        self.models = LRUCache(cache_size)         # (run, iteration) -> LoadedCheckpoint
        self.run_data = LRUCache(2)                # run -> (training data, feature-net distance or None)
        self.rows = LRUCache(16)                   # the two halves of the figure, so that a change of t
                                                   # does not resample and one of steps does not redo tangents
        self.redraws, self.last_redraw_s = 0, float("nan")
        self._quiet = False
        its = self._iterations(runs[0])
        if iteration >= 0 and iteration not in its:
            raise ValueError(f"explorer: {runs[0]} has no checkpoint at iteration {iteration}; available: {its}")
        self.run_w = W.Dropdown(options=runs, value=runs[0], description="run")
        self.ckpt_w = W.Dropdown(options=its, value=(iteration if iteration >= 0 else its[-1]) if its else None,
                                 description="checkpoint")
        self.t_w = W.SelectionSlider(options=sorted(set(T_CHOICES) | {float(t)}), value=float(t), description="t",
                                     continuous_update=False)
        self.seed_w = W.IntText(value=seed, description="seed")
        self.steps_w = W.ToggleButtons(options=list(STEPS), value=steps, description="steps")
        self.status = W.Label()
        self.out = W.Output()
        self.widget = W.VBox([W.HBox([self.run_w, self.ckpt_w]), W.HBox([self.t_w, self.seed_w, self.steps_w]),
                              self.status, self.out])
        self.run_w.observe(self._on_run, "value")
        for w in (self.ckpt_w, self.t_w, self.seed_w, self.steps_w):
            w.observe(self._on_change, "value")
        self.redraw()

    # -- widget callbacks ------------------------------------------------------------------------

    def _iterations(self, run: str) -> list[int]:
        return [it for it, _ in self._list_checkpoints(run)]

    @contextmanager
    def _held(self) -> Iterator[None]:
        """Widget updates made inside the block do not redraw."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def _on_run(self, change) -> None:
        its = self._iterations(change["new"])
        with self._held():
            self.ckpt_w.options = its
            self.ckpt_w.value = its[-1] if its else None
        self.redraw()

    def _on_change(self, change) -> None:
        if not self._quiet:
            self.redraw()

    # -- drawing ---------------------------------------------------------------------------------

    def _loaded(self, run: str, iteration: int) -> tuple[LoadedCheckpoint, Any, Any]:
        key = (str(Path(run).resolve()), int(iteration))
        loaded = self.models.get(key, lambda: self.loader(run, iteration, "ema", self.device))
        if loaded.cfg.stage != "consistency":
            raise ValueError(f"{run} is a {loaded.cfg.stage!r} run; the explorer needs a consistency run")
        data, distance = self.run_data.get(key[0], lambda: (
            build_dataset(loaded.cfg), run_distance(loaded.cfg, loaded.img_channels, loaded.device)))
        return loaded, data, distance

    def panels(self) -> dict:
        """The rows for the widgets' current values (`explore_panels_from`, with its two halves cached)."""
        run, it, t, seed, steps = (self.run_w.value, self.ckpt_w.value, self.t_w.value, self.seed_w.value,
                                   self.steps_w.value)
        loaded, data, distance = self._loaded(run, it)
        key = (str(Path(run).resolve()), int(it), seed, self.n)
        samples = self.rows.get(("samples", *key, steps), lambda: sample_rows(loaded, seed, steps, self.n))
        tangents = self.rows.get(("tangents", *key, t), lambda: tangent_rows(loaded, data, distance, t, seed, self.n))
        return {**samples, **tangents}

    def render(self) -> bytes:
        """The PNG of the figure for the widgets' current values."""
        from .plotting import explore_figure, figure_png
        title = panel_title(self.run_w.value, self.ckpt_w.value, self.t_w.value, self.seed_w.value,
                            self.steps_w.value)
        return figure_png(explore_figure(self.panels(), title=title))

    def redraw(self) -> None:
        """Draw the figure for the current values into the output area (errors are shown there too)."""
        self.redraws += 1
        run, it = self.run_w.value, self.ckpt_w.value
        t0 = time.perf_counter()
        if it is None:
            self.out.outputs = (text_output(f"{run}: no checkpoints"),)
            self.status.value = ""
            return
        cached = (str(Path(run).resolve()), int(it)) in self.models
        self.status.value = f"drawing {Path(run).name} @ {it}" + ("" if cached else " (loading the checkpoint)") + " ..."
        try:
            png = self.render()
        except Exception as e:   # shown in the output area: a callback's exception would be lost
            self.out.outputs = (text_output("".join(traceback.format_exception(e)), "stderr"),)
            self.status.value = f"error: {type(e).__name__}: {e}"
            return
        self.last_redraw_s = time.perf_counter() - t0
        self.out.outputs = (png_output(png, panel_title(run, it, self.t_w.value, self.seed_w.value,
                                                        self.steps_w.value)),)
        self.status.value = f"drawn in {self.last_redraw_s:.2f} s"


def explorer(run_dirs: Sequence[PathLike], n: int = 8, t: float = 1.0, seed: int = 0, steps: int = 1,
             iteration: int = -1, device: Optional[str] = None):
    """The explorer's widget (display it): `Explorer(...).widget`."""
    return Explorer(run_dirs, n, t, seed, steps, iteration, device).widget
