"""Figures regenerated from results (run directories, results.json, tensors).

Every figure function is a pure function of data (or run directories) that returns a matplotlib
Figure, built with matplotlib's object API (`matplotlib.figure.Figure`, no pyplot state, so any
backend works); rcParams change only inside `style()`.
- general figures (notebooks 01-05), written with `save_figure` (deterministic PNG/PDF bytes):
  `image_grid`, `sample_grid` (pixel-exact, upscaled, titled by `sample_title`), `loss_curves`,
  `metric_vs_iterations` (the paper's Figure 1 layout), `feature_r2_bars`, `augmentation_examples`,
  `ablation_bars`; with the small readers `read_metrics`, `eval_curve`, `describe_run`,
  `collect_runs`, `group_runs`, `seed_band`, `select_scale`, `final_values`, `ablation_values`,
  `feature_run_results`;
- the explorer: `explore_figure` (pixel-exact rows of images), `figure_png`;
- the tangent study (results of ayt.analysis): `tangent_grid_figure`, `tangent_fractions_figure`,
  `tangent_over_training_figure`, and the `plot_tangent_*` wrappers that write them as PNG files and
  return their paths. The tangent figures plot one quantity, the tangent fraction (the share of an
  update's energy in the manifold's tangent space).
Nothing here computes a number that is not already in the results.
"""
from __future__ import annotations

import contextlib
import json
import math
import textwrap
from pathlib import Path
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .config import FEATURE_NET_MODES

PathLike = Union[str, Path]


# ----------------------------------------------------------------------------------------------
# General figures (notebooks 01-05, explore): pure functions of data that return a Figure;
# `save_figure` writes byte-identical PNG/PDF files for identical figures.

@contextlib.contextmanager
def style(**rc) -> Iterator[None]:
    """The figures' matplotlib settings (small fonts, light grid), applied only inside the block."""
    import matplotlib
    base = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
            "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.grid": True, "grid.alpha": 0.3,
            "figure.dpi": 100, "savefig.bbox": "standard"}
    with matplotlib.rc_context({**base, **rc}):
        yield


def _new_figure(nrows: int = 1, ncols: int = 1, figsize: Tuple[float, float] = (5.0, 3.5), **kw):
    """A (Figure, axes array [nrows, ncols]) pair that does not touch pyplot's global figure list."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save_figure(fig, path: PathLike, pdf: bool = True, png: bool = True, dpi: int = 150) -> list[Path]:
    """Write `fig` to <path>.png (and <path>.pdf) with the Agg/PDF backends; returns the paths.

    `path` is given without extension (a trailing .png/.pdf is stripped). The files carry no
    timestamps or software versions, so the same figure gives the same bytes on every run
    (PNG metadata {'Software': None}; PDF without CreationDate / ModDate / Producer / Creator).
    """
    path = Path(path)
    if path.suffix.lower() in (".png", ".pdf"):
        path = path.with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    if png:
        p = path.with_name(path.name + ".png")
        fig.savefig(p, format="png", dpi=dpi, metadata={"Software": None})
        out.append(p)
    if pdf:
        p = path.with_name(path.name + ".pdf")
        fig.savefig(p, format="pdf", metadata={"CreationDate": None, "ModDate": None, "Producer": None,
                                               "Creator": None})
        out.append(p)
    return out


def figure_png(fig, dpi: Optional[int] = None) -> bytes:
    """The PNG bytes of a figure at `dpi` (default: the figure's own), without timestamp or software
    metadata."""
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi or fig.dpi, metadata={"Software": None})
    return buf.getvalue()


def _suptitle(fig, title: Optional[str]) -> None:
    """A figure title wrapped to the figure's width."""
    if title:
        fig.suptitle(textwrap.fill(title, width=max(20, int(fig.get_figwidth() * 13))))


def _hwc(img: torch.Tensor) -> np.ndarray:
    """[C, H, W] in [-1, 1] -> [H, W] (C = 1) or [H, W, 3] in [0, 1] (first three channels)."""
    img = ((img.detach().float().cpu() + 1) / 2).clamp(0, 1)
    return (img[0] if img.shape[0] == 1 else img[:3].permute(1, 2, 0)).numpy()


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"{name} must be an NCHW tensor, got {getattr(images, 'shape', type(images))}")


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, title: Optional[str] = None,
               cell: float = 0.6, labels: Optional[Sequence[str]] = None):
    """A grid of images [N, C, H, W] in [-1, 1] (values outside are clipped); nrow images per row
    (default ceil(sqrt(N))). labels: an optional caption per image. Returns the Figure."""
    _check_images(images)
    n = images.shape[0]
    if n == 0:
        raise ValueError("image_grid needs at least one image")
    ncol = nrow or int(math.ceil(math.sqrt(n)))
    nr = int(math.ceil(n / ncol))
    with style():
        fig, axes = _new_figure(nr, ncol, figsize=(cell * ncol + 0.2, cell * nr + (0.35 if title else 0.1)
                                                   + (0.15 * nr if labels else 0)))
        for i, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if i < n:
                img = _hwc(images[i])
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
                if labels is not None:
                    ax.set_title(str(labels[i]), fontsize=6)
        _suptitle(fig, title)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99 - (0.35 if title else 0.0) / fig.get_figheight(),
                            wspace=0.05, hspace=0.3 if labels else 0.05)
    return fig


def tile_images(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2, pad_value: float = 1.0) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] as one array in [0, 1] with nrow images per row (default
    ceil(sqrt(N))) and `pad` pixels of `pad_value` between and around them:
    [rows (H + pad) + pad, nrow (W + pad) + pad] (C = 1) or [..., 3] (first three channels)."""
    _check_images(images)
    n, _, h, w = images.shape
    if n == 0 or pad < 0:
        raise ValueError(f"tile_images needs at least one image and pad >= 0 (got {n} images, pad {pad})")
    ncol = nrow or int(math.ceil(math.sqrt(n)))
    nr = int(math.ceil(n / ncol))
    cells = [_hwc(img) for img in images]
    out = np.full((nr * (h + pad) + pad, ncol * (w + pad) + pad) + cells[0].shape[2:], pad_value, dtype=np.float32)
    for i, cell in enumerate(cells):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = cell
    return out


def sample_title(run: str, iteration: int, stage: str = "consistency", steps: int = 1, n: Optional[int] = None,
                 seed: Optional[int] = None) -> str:
    """'RUN @ iteration IT: 1-step samples (64, seed 0)' (diffusion runs: EDM Heun sampler)."""
    sampler = f"{steps}-step" if stage == "consistency" else "EDM Heun"
    extra = ", ".join(x for x in (f"{n} images" if n else "", f"seed {seed}" if seed is not None else "") if x)
    return f"{run} @ iteration {iteration}: {sampler} samples" + (f" ({extra})" if extra else "")


def _text_px(chars: int, font_pt: float, dpi: int) -> int:
    """Rough width in pixels of `chars` characters of the figures' sans-serif font."""
    return int(math.ceil(chars * 0.6 * font_pt * dpi / 72))


def pixel_figure(canvas: np.ndarray, title: Optional[str] = None, dpi: int = 150,
                 row_labels: Sequence[tuple[float, str]] = ()):
    """A figure that shows `canvas` ([H, W] or [H, W, 3] in [0, 1]) pixel for pixel at `dpi` (so save
    or render it at that dpi), with a wrapped title above it and, left of it, labels at given canvas
    rows: row_labels [(y in canvas pixels, text)]. One axes, no resampling."""
    from matplotlib.figure import Figure
    h_px, w_px = canvas.shape[:2]
    title_pt, label_pt = 9, 7
    left_px = (_text_px(max(len(t) for _, t in row_labels), label_pt, dpi) + 12) if row_labels else 0
    total_w = w_px + left_px
    text = textwrap.fill(title, width=max(20, int(total_w / _text_px(1, title_pt, dpi)))) if title else ""
    line_px = 1.45 * title_pt * dpi / 72
    title_px = int(math.ceil((text.count("\n") + 1) * line_px + 0.5 * line_px)) if text else 0
    total_h = h_px + title_px
    with style():
        fig = Figure(figsize=(total_w / dpi, total_h / dpi), dpi=dpi)
        ax = fig.add_axes((left_px / total_w, 0, w_px / total_w, h_px / total_h))
        ax.imshow(canvas, cmap="gray" if canvas.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest",
                  resample=False)
        ax.set_axis_off()
        for y, label in row_labels:
            fig.text((left_px - 6) / total_w, (h_px - y) / total_h, label, ha="right", va="center",
                     fontsize=label_pt)
        if text:
            fig.text(0.5, 1 - 0.25 * line_px / total_h, text, ha="center", va="top", fontsize=title_pt)
    return fig


def _upscale(canvas: np.ndarray, min_width: int) -> np.ndarray:
    """`canvas` with every pixel repeated by the smallest integer factor making it >= min_width wide."""
    scale = max(1, int(math.ceil(min_width / canvas.shape[1])))
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else canvas


def sample_grid(images: torch.Tensor, title: str, nrow: Optional[int] = None, min_width: int = 512,
                dpi: int = 150):
    """A sample grid drawn pixel-exact (`pixel_figure`): the tiled images (`tile_images`) upscaled by
    the smallest integer factor that makes the grid at least min_width pixels wide (nearest
    neighbour), under a title (e.g. `sample_title`). Save it at `dpi` (`save_figure`'s default 150)."""
    return pixel_figure(_upscale(tile_images(images, nrow), min_width), title, dpi)


def read_metrics(run_dir: PathLike) -> list[dict]:
    """The records of <run_dir>/metrics.jsonl (one dict per logged step; empty list if absent)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_NON_LOSS_KEYS = ("iteration", "lr", "it_per_s", "time_s")


def loss_curves(runs: Union[PathLike, Sequence[PathLike], dict], keys: Optional[Sequence[str]] = None,
                logy: bool = True, title: Optional[str] = None):
    """Logged training quantities vs iteration, one panel per key (default: every logged key except
    iteration, lr, it_per_s, time_s and eval entries), one line per run; logy: log scale for
    positive quantities that span more than a factor of 10 (those panels' titles say "(log scale)").

    runs: a run directory, a list of them, or {label: run_dir or list of metrics records}."""
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if not isinstance(runs, dict):
        runs = {Path(r).name: r for r in runs}
    records = {label: (r if isinstance(r, list) else read_metrics(r)) for label, r in runs.items()}
    if keys is None:
        found: dict[str, None] = {}
        for recs in records.values():
            for rec in recs:
                for k, v in rec.items():
                    if k not in _NON_LOSS_KEYS and not k.startswith("eval_") and isinstance(v, (int, float)):
                        found[k] = None
        keys = list(found)
    if not keys:
        raise ValueError(f"no logged quantities to plot in {list(runs)} (empty metrics.jsonl?)")
    with style():
        ncol = min(len(keys), 3)
        nr = int(math.ceil(len(keys) / ncol))
        fig, axes = _new_figure(nr, ncol, figsize=(3.3 * ncol, 2.5 * nr))
        for ax, key in zip(axes.flat, keys):
            for i, (label, recs) in enumerate(records.items()):
                pts = [(r["iteration"], r[key]) for r in recs if key in r and r[key] is not None]
                if pts:
                    x, y = zip(*pts)
                    ax.plot(x, y, color=f"C{i}", lw=1, label=label)
                    if logy and min(y) > 0 and max(y) > 10 * min(y):   # log scale only over > 1 decade
                        ax.set_yscale("log")
            ax.set_title(key + (" (log scale)" if ax.get_yscale() == "log" else ""))
            ax.set_xlabel("iteration")
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        for ax in list(axes.flat)[len(keys):]:
            ax.set_axis_off()
        _suptitle(fig, title)
        fig.tight_layout()
    return fig


# -- metric vs iterations (the paper's Figure 1 layout) -----------------------------------------

METHOD_LABELS = {"ect": "ECT", "mfd": "AYT", "ect+mfd": "ECT+AYT", "lpips": "ECT w/ LPIPS",
                 "ect+lpips": "ECT+LPIPS", "ccd": "CCD", "ccd-ayt": "CCD-AYT", "cct": "CT", "cct-ayt": "CT-AYT"}
METHOD_STYLES = {"ECT": dict(color="C0", ls="-"), "AYT": dict(color="C3", ls="-"),
                 "ECT+AYT": dict(color="C2", ls="-"), "ECT w/ LPIPS": dict(color="C4", ls="-"),
                 "ECT+LPIPS": dict(color="C5", ls="-"), "AYT (untrained phi)": dict(color="C7", ls="--"),
                 "CCD": dict(color="C0", ls=":"), "CCD-AYT": dict(color="C3", ls=":"),
                 "CT": dict(color="C0", ls="-."), "CT-AYT": dict(color="C3", ls="-.")}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def eval_curve(results: dict, sampler: str = "1step", metric: Optional[str] = None,
               n: Optional[int] = None) -> dict[int, float]:
    """{iteration: mean} of the evaluation records in a results.json dict (ayt.evaluate) for one
    sampler ('1step', '2step', 'heun18', 'denoise@0.4'); metric: 'fid' | 'fd_eval' | 'dfid' | ...
    (default: any); n: only records with that sample count (default: the largest n per iteration)."""
    best: dict[int, tuple[int, float]] = {}
    for r in results.get("eval", []):
        if r.get("sampler") != sampler or (metric is not None and r.get("metric") != metric):
            continue
        if n is not None and r.get("n") != n:
            continue
        key = r["metric"].lstrip("d") if r["metric"] not in r else r["metric"]
        value = r[key]["mean"] if isinstance(r.get(key), dict) else None
        if value is None:
            continue
        it = int(r["iteration"])
        if it not in best or r["n"] > best[it][0]:
            best[it] = (int(r["n"]), float(value))
    return {it: v for it, (_, v) in sorted(best.items())}


def describe_run(run_dir: PathLike, sampler: str = "1step", metric: Optional[str] = None) -> Optional[dict]:
    """What the figures need to know about one consistency run directory, or None for other runs:
    {'name', 'run_dir', 'method' (ECT, AYT, ...), 'mode', 'batch', 'lr', 'seed', 'data', 'resolution',
    'feature_net', 'aug_set' (of its feature net, when that is a run directory), 'feature_iters',
    'metric', 'curve' {iteration: value}}."""
    run_dir = Path(run_dir)
    cfg = _read_json(run_dir / "config.json")
    if cfg.get("stage") != "consistency":
        return None
    res = _read_json(run_dir / "results.json")
    curve = eval_curve(res, sampler, metric)
    metrics = sorted({r["metric"] for r in res.get("eval", []) if r.get("sampler") == sampler})
    ct = cfg["ct"]
    info = {"name": run_dir.name, "run_dir": str(run_dir), "mode": ct["mode"], "batch": cfg["batch"],
            "lr": cfg["optim"]["lr"], "seed": cfg["seed"], "data": cfg["data"]["name"],
            "resolution": cfg["data"]["resolution"], "iters": cfg["iters"], "feature_net": ct.get("feature_net"),
            "aug_set": None, "feature_iters": None, "metric": metric or (metrics[0] if metrics else None),
            "curve": curve}
    method = METHOD_LABELS.get(ct["mode"], ct["mode"])
    fn = ct.get("feature_net")
    if fn and ct["mode"] in FEATURE_NET_MODES:
        fcfg = _read_json(Path(fn) / "config.json")
        if fcfg:
            info["aug_set"] = fcfg["feature"]["aug_set"]
            info["feature_iters"] = fcfg["iters"]
            if fcfg["iters"] == 0:
                method = "AYT (untrained phi)"
    info["method"] = method
    return info


def collect_runs(run_root: PathLike, sampler: str = "1step", metric: Optional[str] = None) -> list[dict]:
    """`describe_run` of every consistency run directory directly under run_root that has evaluations."""
    out = []
    for d in sorted(Path(run_root).iterdir()) if Path(run_root).is_dir() else []:
        info = describe_run(d, sampler, metric) if d.is_dir() else None
        if info is not None and info["curve"]:
            out.append(info)
    return out


def feature_run_results(run_root: PathLike) -> dict[str, dict]:
    """{run name: results.json['feature_net']} of every trained feature-network run under run_root."""
    out = {}
    for d in sorted(Path(run_root).iterdir()) if Path(run_root).is_dir() else []:
        if d.is_dir() and _read_json(d / "config.json").get("stage") == "feature":
            fq = _read_json(d / "results.json").get("feature_net")
            if fq and _read_json(d / "config.json").get("iters", 0) > 0:
                out[d.name] = fq
    return out


def group_runs(runs: Sequence[dict], keys: Sequence[str] = ("method", "batch", "lr", "aug_set", "data")) -> dict:
    """Runs that differ only in seed (and name) grouped: {(values of keys): [run info, ...]}."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    return groups


def seed_band(curves: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(iterations, mean, min, max) over the iterations every curve {iteration: value} has."""
    if not curves:
        raise ValueError("seed_band needs at least one curve")
    its = sorted(set.intersection(*(set(c) for c in curves)))
    vals = np.array([[c[i] for i in its] for c in curves], dtype=np.float64).reshape(len(curves), len(its))
    return np.array(its, dtype=np.float64), vals.mean(0), vals.min(0), vals.max(0)


def seeds_text(k: int) -> str:
    """'1 seed', '3 seeds'."""
    return f"{k} seed" + ("" if k == 1 else "s")


def metric_vs_iterations(runs: Sequence[dict], metric_label: str = "FID", logx: bool = False,
                         logy: bool = False, title: Optional[str] = None, best_lr: bool = True):
    """The paper's Figure 1 layout: one panel per batch size, the metric vs training iterations for
    each method (ECT, AYT, ...); runs of one group (same method, batch, lr; different seeds) are
    drawn as their mean with a min-max band; every legend entry and panel title names its number of
    seeds ("1 seed" for a single run, no band).

    runs: `describe_run` dicts (or any dicts with method, batch, lr, seed, curve). best_lr: per method
    and batch size, draw only the learning rate with the lowest final mean (the chosen one).
    """
    if not runs:
        raise ValueError("metric_vs_iterations needs at least one run with evaluations")
    groups = group_runs(runs, ("method", "batch", "lr"))
    batches = sorted({k[1] for k in groups})
    if best_lr:
        chosen: dict[tuple, tuple] = {}
        for key, members in groups.items():
            its, mean, _, _ = seed_band([m["curve"] for m in members])
            final = mean[-1] if len(mean) else np.inf
            mk = key[:2]
            if mk not in chosen or final < chosen[mk][1]:
                chosen[mk] = (key, final)
        groups = {v[0]: groups[v[0]] for v in chosen.values()}
    order = list(METHOD_STYLES)
    with style():
        width = max(5.0, 3.6 * len(batches))
        fig, axes = _new_figure(1, len(batches), figsize=(width, 3.2), sharey=True)
        for ax, batch in zip(axes[0], batches):
            keys = sorted((k for k in groups if k[1] == batch),
                          key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[2]))
            for i, key in enumerate(keys):
                members = groups[key]
                its, mean, lo, hi = seed_band([m["curve"] for m in members])
                st = METHOD_STYLES.get(key[0], dict(color=f"C{(i + 6) % 10}", ls="-"))
                label = f"{key[0]} (lr {key[2]:g}, {seeds_text(len(members))})"
                ax.plot(its, mean, marker="o", ms=2.5, lw=1.2, label=label, **st)
                if len(members) > 1:
                    ax.fill_between(its, lo, hi, color=st["color"], alpha=0.18, lw=0)
            counts = {len(groups[k]) for k in keys}
            ax.set_title(f"batch size {batch}" + (f" ({seeds_text(counts.pop())} each)" if len(counts) == 1 else ""))
            ax.set_xlabel("training iterations")
            if logx:
                from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
                ax.set_xscale("log")
                its_all = sorted({it for k in keys for m in groups[k] for it in m["curve"]})
                if len(its_all) <= 12:   # label the evaluated iterations themselves
                    ax.xaxis.set_major_locator(FixedLocator(its_all))
                    ax.xaxis.set_minor_formatter(NullFormatter())
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            if logy:
                ax.set_yscale("log")
            ax.legend()
        axes[0][0].set_ylabel(metric_label)
        if title:
            _suptitle(fig, title)
        fig.tight_layout()
    return fig


# -- feature network -----------------------------------------------------------------------------

R2_CLASSES = {"$R^2 \\geq 0.5$": "C2", "$0 \\leq R^2 < 0.5$": "C1", "$R^2 < 0$": "C3"}   # bar colours


def r2_class(v: float) -> Optional[str]:
    """The colour class (a key of R2_CLASSES) of one R^2 value; None for NaN (a constant label, 'n/a')."""
    if np.isnan(v):
        return None
    names = list(R2_CLASSES)
    return names[0] if v >= 0.5 else names[1] if v >= 0 else names[2]


def feature_r2_bars(r2: dict[str, float], labels: Optional[Sequence[str]] = None, title: Optional[str] = None):
    """Per-label R^2 of a feature network's label regression (results.json['feature_net']['r2']), in
    the order of `labels` (e.g. results.json['feature_net']['labels']; default: r2's order);
    NaN labels (constant targets) are shown as 'n/a'."""
    if not r2:
        raise ValueError("feature_r2_bars needs at least one label")
    names = list(labels) if labels is not None else list(r2)
    missing = [k for k in names if k not in r2]
    if missing:
        raise ValueError(f"labels {missing} have no R^2 value")
    vals = np.array([np.nan if r2[k] is None else float(r2[k]) for k in names])
    with style():
        fig, axes = _new_figure(1, 1, figsize=(max(3.5, 0.38 * len(names) + 1.2), 3.0))
        ax = axes[0][0]
        x = np.arange(len(names))
        shown = np.nan_to_num(vals, nan=0.0)
        classes = [r2_class(v) for v in vals]
        ax.bar(x, shown, color=[R2_CLASSES.get(c, "0.6") for c in classes])
        from matplotlib.patches import Patch
        ax.legend(handles=[Patch(color=R2_CLASSES[c], label=c) for c in R2_CLASSES if c in classes],
                  loc="upper right", fontsize=6)
        for xi, v in zip(x, vals):
            ax.annotate("n/a" if np.isnan(v) else f"{v:.2f}", (xi, max(0.0, 0 if np.isnan(v) else v)),
                        ha="center", va="bottom", fontsize=6, xytext=(0, 1), textcoords="offset points")
        ax.set_xticks(x, names, rotation=60, ha="right")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_ylim(min(-0.05, np.nanmin(vals) - 0.05 if np.isfinite(vals).any() else 0), 1.25)
        ax.set_ylabel("$R^2$ (held-out augmentations)")
        ax.set_title(title or "feature network: per-label regression quality")
        fig.tight_layout()
    return fig


def augmentation_examples(x: torch.Tensor, x_aug: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor,
                          label_names: Sequence[str], title: Optional[str] = None):
    """Columns = examples: the image, its augmentation, and the true vs predicted labels as bars.

    x, x_aug: [N, C, H, W] in [-1, 1]; labels, preds: [N, L] (true parameters of AugmentPipe and the
    feature network's regression); label_names: L names."""
    _check_images(x, "x")
    _check_images(x_aug, "x_aug")
    n, L = labels.shape
    if x.shape != x_aug.shape or preds.shape != labels.shape or x.shape[0] != n or len(label_names) != L:
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, x_aug {tuple(x_aug.shape)}, labels "
                         f"{tuple(labels.shape)}, preds {tuple(preds.shape)}, {len(label_names)} names")
    y, p = labels.detach().float().cpu().numpy(), preds.detach().float().cpu().numpy()
    lim = max(1e-3, float(np.abs(np.concatenate([y, p])).max())) * 1.1
    with style():
        fig, axes = _new_figure(3, n, figsize=(1.25 * n + 0.8, 1.25 * 2 + 0.14 * L + 0.6),
                                gridspec_kw={"height_ratios": [1, 1, 0.11 * L]})
        for j in range(n):
            for i, img in enumerate((x[j], x_aug[j])):
                ax = axes[i][j]
                ax.imshow(_hwc(img), vmin=0, vmax=1, interpolation="nearest",
                          cmap="gray" if img.shape[0] == 1 else None)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
            ax = axes[2][j]
            pos = np.arange(L)
            ax.barh(pos + 0.2, y[j], height=0.4, color="0.55", label="true")
            ax.barh(pos - 0.2, p[j], height=0.4, color="C3", label="predicted")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(L - 0.5, -0.5)
            ax.axvline(0, color="k", lw=0.4)
            ax.set_yticks(pos, label_names if j == 0 else [""] * L, fontsize=5)
            ax.tick_params(axis="x", labelsize=5)
        axes[0][0].set_ylabel("image")
        axes[1][0].set_ylabel("augmented")
        axes[2][n - 1].legend(fontsize=5, loc="lower right")
        _suptitle(fig, title or "augmentations: true parameters vs feature-network predictions")
        fig.tight_layout()
    return fig


# -- ablations -----------------------------------------------------------------------------------

def ablation_bars(values: dict[str, Union[float, Sequence[float]]], ylabel: str = "FID",
                  title: Optional[str] = None):
    """One bar per setting (e.g. 'ECT', 'ECT w/ LPIPS', 'AYT'; or augmentation sets): the mean of its
    values with a min-max error bar and the individual values as dots when there are several."""
    if not values:
        raise ValueError("ablation_bars needs at least one setting")
    names = list(values)
    arrs = [np.atleast_1d(np.asarray(values[k], dtype=np.float64)) for k in names]
    means = np.array([a.mean() for a in arrs])
    with style():
        fig, axes = _new_figure(1, 1, figsize=(max(3.0, 0.75 * len(names) + 1.2), 3.0))
        ax = axes[0][0]
        x = np.arange(len(names))
        ax.bar(x, means, color=[f"C{i}" for i in range(len(names))], alpha=0.8)
        for xi, a, m in zip(x, arrs, means):
            if a.size > 1:
                ax.errorbar([xi], [m], yerr=[[m - a.min()], [a.max() - m]], color="k", capsize=3, lw=0.8)
                ax.plot(np.full(a.size, xi), a, "k.", ms=3)
            ax.annotate(f"{m:.3g}", (xi, m), ha="center", va="bottom", fontsize=6, xytext=(0, 2),
                        textcoords="offset points")
        ax.set_xticks(x, names, rotation=20 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig


def run_family(names: Sequence[str]) -> str:
    """What a set of runs is, from their names' first word: 'mini study' (mini-*), 'demo' (demo-*),
    else the distinct first words joined ('disk', 'my')."""
    words = sorted({str(n).split("-")[0] for n in names})
    return ", ".join({"mini": "mini study"}.get(w, w) for w in words)


def select_scale(runs: Sequence[dict]) -> tuple[list[dict], str]:
    """The runs a paper figure should use, and what they are: paper-scale runs (any data other than
    the built-in shapes / disk) when there are some, else the runs on the shapes data, with a note for
    the figure's title taken from the runs themselves: "<family>, shapes <R>px" (`run_family` of their
    names, e.g. "mini study, shapes 16px" or "demo, shapes 16px") or "<data> <R>px"."""
    paper = [r for r in runs if r["data"] not in ("shapes", "disk")]
    if paper:
        res = sorted({f"{r['data']} {r['resolution']}px" for r in paper})
        return paper, ", ".join(res)
    mini = [r for r in runs if r["data"] == "shapes"]
    res = sorted({r["resolution"] for r in mini})
    return mini, (f"{run_family([r['name'] for r in mini])}, shapes " + "/".join(f"{x}px" for x in res)) if mini else ""


def final_values(runs: Sequence[dict]) -> tuple[Optional[int], list[float]]:
    """(iteration, values): each run's metric at the last iteration that every run has evaluated."""
    if not runs:
        return None, []
    common = set.intersection(*(set(r["curve"]) for r in runs))
    if not common:
        return None, []
    it = max(common)
    return it, [r["curve"][it] for r in runs]


def ablation_values(runs: Sequence[dict], kind: str) -> tuple[dict[str, list[float]], Optional[int]]:
    """Bars of an ablation from `describe_run` dicts, compared at a common iteration; ({} , None) when
    the runs do not hold the ablation.

    kind 'distance': ECT vs ECT w/ LPIPS vs AYT, at the batch size of the LPIPS runs (needs LPIPS runs);
    kind 'aug_set': AYT runs grouped by the augmentation set of their feature net (needs >= 2 sets).
    """
    if kind == "distance":
        lp = [r for r in runs if r["mode"] in ("lpips", "ect+lpips")]
        if not lp:
            return {}, None
        batch = lp[0]["batch"]
        chosen = [r for r in runs if r["batch"] == batch and r["method"] in ("ECT", "ECT w/ LPIPS", "ECT+LPIPS", "AYT")]
        key = "method"
    elif kind == "aug_set":
        chosen = [r for r in runs if r["method"] == "AYT" and r["aug_set"]]
        if len({r["aug_set"] for r in chosen}) < 2:
            return {}, None
        key = "aug_set"
    else:
        raise ValueError(f"unknown ablation kind {kind!r}; expected 'distance' or 'aug_set'")
    it, vals = final_values(chosen)
    if it is None:
        return {}, None
    out: dict[str, list[float]] = {}
    for r, v in zip(chosen, vals):
        out.setdefault(str(r[key]), []).append(v)
    return out, it


# -- explorer ------------------------------------------------------------------------------------

def explore_figure(panels: dict[str, torch.Tensor], title: Optional[str] = None, cell_px: int = 64,
                   dpi: int = 150):
    """Rows of images for the explorer (samples, x_t, f(x_t, t), tangents): panels {row label: [N, C, H, W]},
    drawn pixel-exact as one canvas with the row labels on the left (`pixel_figure`; render or save it
    at `dpi`), each image pixel repeated by the smallest integer factor that makes an image at least
    cell_px pixels high. Rows whose label contains 'tangent' or 'direction' are signed vectors,
    scaled per image by the largest |entry| (grey = 0); the other rows are images in [-1, 1]."""
    if not panels:
        raise ValueError("explore_figure needs at least one row")
    for k, v in panels.items():
        _check_images(v, k)
        if v.shape[0] == 0:
            raise ValueError(f"explore_figure: row {k!r} has no images")
    ncol = max(v.shape[0] for v in panels.values())
    rows, centers, y = [], [], 0
    for label, imgs in panels.items():
        imgs = imgs.detach().float().cpu()
        if "tangent" in label or "direction" in label:
            imgs = imgs / imgs.flatten(1).abs().amax(1).clamp_min(1e-12)[:, None, None, None]
        tile = tile_images(imgs, ncol)              # [H + 4, ncol (W + 2) + 2 (, 3)], whatever N <= ncol
        rows.append(tile)
        centers.append(y + tile.shape[0] / 2)
        y += tile.shape[0]
    canvas = np.concatenate(rows, axis=0)
    height = max(v.shape[2] for v in panels.values())
    scale = max(1, int(math.ceil(cell_px / height)))
    big = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    return pixel_figure(big, title, dpi, [(c * scale, label) for c, label in zip(centers, panels)])


# ----------------------------------------------------------------------------------------------
# The tangent grid (ayt.analysis.tangent_grid)

def _to_rgb(img: torch.Tensor, signed: bool) -> "torch.Tensor":
    """[C, H, W] -> [H, W, 3 or 1] in [0, 1]: images from [-1, 1]; signed vectors scaled by their max |.|."""
    img = img.detach().float().cpu()
    if signed:
        img = 0.5 + 0.5 * img / img.abs().max().clamp_min(1e-12)
    else:
        img = (img + 1) / 2
    img = img.clamp(0, 1)
    if img.shape[0] == 1:
        return img[0]
    return img[:3].permute(1, 2, 0)


def plot_tangent_grid(grid: dict, path: PathLike, sample: int = 0,
                      rows: Sequence[str] = ("x_t", "f", "cm_direction", "ayt_direction"),
                      title: Optional[str] = None) -> Path:
    """`tangent_grid_figure` written to `path` (PNG); returns the path."""
    return _save(tangent_grid_figure(grid, sample, rows, title), path)


def tangent_grid_figure(grid: dict, sample: int = 0,
                        rows: Sequence[str] = ("x_t", "f", "cm_direction", "ayt_direction"),
                        title: Optional[str] = None):
    """The paper's tangent figure: one row per quantity of `ayt.analysis.tangent_grid`, one column per t.

    Images (x_t, f) are shown in [-1, 1]; tangents and update directions are scaled per cell by their
    largest absolute entry (grey = 0). Rows missing from `grid` are skipped.
    """
    rows = [r for r in rows if r in grid]
    ts = [float(t) for t in grid["ts"]]
    labels = {"x_t": "$x_t$", "f": "$f(x_t, t)$", "cm_tangent": "CM tangent", "cm_tangent_jvp": "CM tangent (JVP)",
              "cm_direction": "ECT update", "ayt_direction": "AYT update"}
    fig, axes = _new_figure(len(rows), len(ts), figsize=(1.1 * len(ts), 1.15 * len(rows)))
    for i, row in enumerate(rows):
        for j, t in enumerate(ts):
            ax = axes[i][j]
            img = _to_rgb(grid[row][j, sample], signed=row not in ("x_t", "f"))
            ax.imshow(img.numpy(), cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"t={t:g}", fontsize=7)
            if j == 0:
                ax.set_ylabel(labels.get(row, row), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Tangent studies (ayt.analysis.tangent_study / disk_study / shapes_study)

_DIRS = {"cm": "ECT update", "ayt": "AYT update", "jvp": "-CM tangent (JVP)"}
# Drawn in this order; the JVP tangent last and with its own marker, since it often lies on the ECT line.
_DIR_STYLES = {"cm": dict(ls="-", marker="o", ms=3.5, zorder=2), "ayt": dict(ls="--", marker="s", ms=3, zorder=2),
               "jvp": dict(ls=":", marker="x", ms=5, zorder=3)}
TANGENT_LABEL = "fraction of update energy in the tangent space"
MIN_CHECKPOINTS_OVER_TRAINING = 3     # successive-update cosines need f_{k-1}, f_k, f_{k+1}


def _study_title(res: dict) -> str:
    what = {"disk": f"2-D disk in R^{res.get('dim')}", "shapes": f"shapes ({res.get('dim')} pixels x channels)"}
    return what.get(res.get("study"), "tangent study")


def coincide(a: Sequence[float], b: Sequence[float], tol: float = 0.01) -> bool:
    """Whether two curves lie on each other in a plot (every |a - b| <= tol)."""
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def direction_curves(run: dict, ts: Sequence[float], measure: str, checkpoint: int = -1) -> dict[str, list[float]]:
    """{direction: [value at each t]} of one run of a tangent study at one checkpoint, for the
    directions of _DIRS present (measure: 'tangent_fraction', 'toward_cosine', ...)."""
    per_t = run["per_t"]
    first = per_t[f"{ts[0]:g}"]
    return {k: [per_t[f"{t:g}"][k][measure][checkpoint] for t in ts] for k in _DIRS
            if k in first and measure in first[k]}


def direction_labels(name: str, curves: dict[str, list[float]]) -> dict[str, str]:
    """Legend labels of one run's direction curves; a curve that lies on the ECT curve says so."""
    out = {}
    for k in curves:
        lab = f"{name} run: {_DIRS[k]}"
        if k != "cm" and "cm" in curves and coincide(curves[k], curves["cm"]):
            lab += " (coincides with ECT update)"
        out[k] = lab
    return out


def _run_color(name: str, index: int) -> str:
    """A tangent study run's colour: its method's (METHOD_STYLES: 'ect' as ECT, 'ayt' as AYT), so that a figure
    looks the same whatever order the runs come in (notebook 04's dict or the results.json notebook 05 reads)."""
    return METHOD_STYLES.get(name.upper(), {}).get("color", f"C{(index + 6) % 10}")


def plot_tangent_fractions_vs_t(res: dict, path: PathLike, checkpoint: int = -1) -> Path:
    """`tangent_fractions_figure` written to `path` (PNG); returns the path."""
    return _save(tangent_fractions_figure(res, checkpoint), path)


def tangent_fractions_figure(res: dict, checkpoint: int = -1):
    """Tangent fraction (the share of ||u||^2 in the manifold's tangent space; and, where computed, the
    toward-manifold cosine) of each update direction vs t, at one checkpoint (default: the last); one
    line per (run, direction), each direction with its own line style and marker, and a legend entry
    for every line (a line lying on the ECT line says so)."""
    ts = res["ts"]
    first = next(iter(res["runs"].values()))
    toward = "toward_cosine" in first["per_t"][f"{ts[0]:g}"]["cm"]
    fig, axes = _new_figure(1, 2 if toward else 1, figsize=(11 if toward else 6, 4.6))
    axes = axes[0]
    panels = [("tangent_fraction", axes[0])] + ([("toward_cosine", axes[1])] if toward else [])
    for ri, (name, run) in enumerate(res["runs"].items()):
        for measure, ax in panels:
            curves = direction_curves(run, ts, measure, checkpoint)
            labels = direction_labels(name, curves)
            for k, ys in curves.items():
                ax.plot(ts, ys, color=_run_color(name, ri), label=labels[k], **_DIR_STYLES[k])
    axes[0].set_ylabel(TANGENT_LABEL)
    axes[0].set_ylim(-0.02, 1.02)
    if toward:
        axes[1].set_ylabel("cos(u, proj(f) - f)  (toward the manifold)")
        axes[1].set_ylim(-1.02, 1.02)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("t")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)   # below: hides no line
    fig.suptitle(f"{_study_title(res)}: update directions at iteration {first['iterations'][checkpoint]} "
                 f"({res['which']} weights)", fontsize=9)
    fig.tight_layout()
    return fig


def over_training_note(res: dict) -> Optional[str]:
    """Why the over-training figure of a tangent study cannot be drawn (None when it can): every run
    needs at least MIN_CHECKPOINTS_OVER_TRAINING checkpoints."""
    short = {name: run["iterations"] for name, run in res["runs"].items()
             if len(run["iterations"]) < MIN_CHECKPOINTS_OVER_TRAINING}
    if not short:
        return None
    which = "; ".join(f"run {name!r} has {len(its)} (iterations {its})" for name, its in short.items())
    return (f"{_study_title(res)}: the over-training figure needs at least {MIN_CHECKPOINTS_OVER_TRAINING} "
            f"checkpoints per run (successive output updates f_(k+1) - f_k and f_k - f_(k-1)); {which}. "
            "Train with a smaller ckpt_every (and keep_last=0, which keeps every checkpoint) to draw it.")


def plot_tangent_over_training(res: dict, path: PathLike, ts: Optional[Sequence[float]] = None) -> Path:
    """`tangent_over_training_figure` written to `path` (PNG); returns the path."""
    return _save(tangent_over_training_figure(res, ts), path)


def tangent_over_training_figure(res: dict, ts: Optional[Sequence[float]] = None):
    """Over training: tangent fraction of the ECT and AYT update directions (mean over ts), the
    oscillation cosine of successive output updates, and the tangent fraction of the realised updates.
    ValueError (`over_training_note`) when a run has fewer than 3 checkpoints."""
    note = over_training_note(res)
    if note:
        raise ValueError(note)
    ts = list(res["ts"] if ts is None else ts)
    fig, axes = _new_figure(1, 3, figsize=(13, 3.8))
    axes = axes[0]
    for ri, (name, run) in enumerate(res["runs"].items()):
        color = _run_color(name, ri)
        recs = [run["per_t"][f"{t:g}"] for t in ts]

        def mean_over_t(values):
            return [sum(col) / len(col) for col in zip(*values)]

        for k in ("cm", "ayt"):
            st = {**_DIR_STYLES[k], "marker": None}
            axes[0].plot(run["iterations"], mean_over_t([r[k]["tangent_fraction"] for r in recs]), color=color,
                         label=f"{name} run: {_DIRS[k]}", **st)
        o = recs[0]["oscillation"]
        axes[1].plot(o["iterations"], mean_over_t([r["oscillation"]["cosine"] for r in recs]), color=color,
                     label=f"{name} run")
        axes[2].plot(o["update_iterations"],
                     mean_over_t([r["oscillation"]["update_tangent_fraction"] for r in recs]), color=color,
                     label=f"{name} run")
    axes[0].set_title("update directions")
    axes[0].set_ylabel(TANGENT_LABEL)
    axes[1].set_title("oscillation of the output")
    axes[1].set_ylabel("cos(successive output updates)")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[1].axhline(-0.5, color="k", lw=0.5, ls=":")
    axes[2].set_title("realised updates $f_{k+1} - f_k$")
    axes[2].set_ylabel(TANGENT_LABEL)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{_study_title(res)}: means over t in {ts} ({res['which']} weights; dotted: -1/2, "
                 "independent jitter)", fontsize=8)
    fig.tight_layout()
    return fig


def plot_tangent_study(res: dict, out_dir: PathLike) -> list[Path]:
    """Every figure of a tangent study into out_dir: <study>_fractions_vs_t.png and, when every run has
    at least 3 checkpoints (`over_training_note` says why not), <study>_over_training.png."""
    out_dir = Path(out_dir)
    prefix = res.get("study", "tangent")
    out = [plot_tangent_fractions_vs_t(res, out_dir / f"{prefix}_fractions_vs_t.png")]
    if over_training_note(res) is None:
        out.append(plot_tangent_over_training(res, out_dir / f"{prefix}_over_training.png"))
    return out


def _save(fig, path: PathLike, dpi: int = 150) -> Path:
    """Write a figure to a PNG file (no metadata); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, metadata={"Software": None})
    return path
