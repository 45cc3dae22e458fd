"""Figures (ayt.plotting): legends that match the lines drawn, axis labels that match the axis
scales, one tangent quantity, seed counts, the R^2 colour legend, labels taken from the runs, and
pixel-exact upscaled sample grids."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from ayt import plotting as P

PNG = b"\x89PNG\r\n\x1a\n"


def _png_array(fig, dpi=None) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(P.figure_png(fig, dpi))).convert("RGB"), dtype=np.float32) / 255


def _legend_matches_lines(ax) -> list[str]:
    """Every legend entry names a line drawn in the axes with the same style, and every labelled line
    has an entry; the drawn (colour, line style, marker) combinations are distinct. Returns the labels."""
    legend = ax.get_legend()
    assert legend is not None, ax.get_title()
    entries = [t.get_text() for t in legend.get_texts()]
    lines = [l for l in ax.get_lines() if not l.get_label().startswith("_")]
    assert sorted(entries) == sorted(l.get_label() for l in lines)
    styles = [(str(l.get_color()), l.get_linestyle(), str(l.get_marker())) for l in lines]
    assert len(set(styles)) == len(styles), f"two lines drawn alike in {ax.get_title()!r}: {styles}"
    for handle, text in zip(legend.legend_handles, entries):
        line = next(l for l in lines if l.get_label() == text)
        assert (handle.get_linestyle(), str(handle.get_marker())) == (line.get_linestyle(), str(line.get_marker()))
    return entries


def _labels_match_scales(fig) -> int:
    """No axis says "log" unless it is log-scaled (titles speak for the y axis). Returns the axes checked."""
    n = 0
    for ax in fig.axes:
        for label, scale in ((ax.get_xlabel(), ax.get_xscale()), (ax.get_ylabel(), ax.get_yscale()),
                             (ax.get_title(), ax.get_yscale())):
            if "log" in label.lower():
                assert scale == "log", f"{label!r} on a {scale} axis"
        n += 1
    return n


def _study(n_ckpt: int = 3, coincide: bool = True, toward: bool = True) -> dict:
    """A tangent-study result (ayt.analysis.tangent_study's layout) with known numbers."""
    ts = [0.1, 1.0, 10.0]
    its = [100 * (k + 1) for k in range(n_ckpt)]

    def rec(base: float) -> dict:
        tf = [base + 0.01 * k for k in range(n_ckpt)]
        out = {"tangent_fraction": tf, "normal_fraction": [1 - v for v in tf]}
        if toward:
            out["toward_cosine"] = [0.1 * base] * n_ckpt
        return out

    runs = {}
    for name, shift in (("ect", 0.0), ("ayt", 0.2)):
        per_t = {}
        for i, t in enumerate(ts):
            cm = rec(0.5 + shift + 0.05 * i)
            jvp = {k: list(v) for k, v in cm.items()} if coincide else rec(0.1 + 0.05 * i)
            per_t[f"{t:g}"] = {"cm": cm, "ayt": rec(0.05 + 0.02 * i), "jvp": jvp, "cm_ayt_cosine": [0.5] * n_ckpt}
            if n_ckpt >= 3:
                per_t[f"{t:g}"]["oscillation"] = {"iterations": its[1:-1], "cosine": [-0.4] * (n_ckpt - 2),
                                                  "update_iterations": its[1:],
                                                  "update_tangent_fraction": [0.3] * (n_ckpt - 1)}
        runs[name] = {"run_dir": f"runs/{name}", "mode": name, "iterations": its, "per_t": per_t, "summary": {}}
    return {"study": "disk", "dim": 16, "ts": ts, "which": "model", "runs": runs}


# ----------------------------------------------------------------------------------------------
# Tangent figures

def test_tangent_fractions_legend_matches_lines_and_says_when_they_coincide():
    fig = P.tangent_fractions_figure(_study(coincide=True))
    assert len(fig.axes) == 2
    for ax in fig.axes:
        entries = _legend_matches_lines(ax)
        assert len(entries) == 6                       # 2 runs x (ECT, AYT, JVP)
    jvp = [e for e in _legend_matches_lines(fig.axes[0]) if "JVP" in e]
    assert len(jvp) == 2 and all("coincides with ECT update" in e for e in jvp)
    for run in ("ect", "ayt"):       # the coinciding line stays visible: its own marker, drawn on top
        lines = {l.get_label().split(" (")[0]: l for l in fig.axes[0].get_lines() if l.get_label().startswith(run)}
        cm, tan = lines[f"{run} run: ECT update"], lines[f"{run} run: -CM tangent"]
        assert np.allclose(cm.get_ydata(), tan.get_ydata())
        assert tan.get_marker() != cm.get_marker() and tan.get_zorder() > cm.get_zorder()
    fig = P.tangent_fractions_figure(_study(coincide=False, toward=False))
    assert len(fig.axes) == 1
    assert not any("coincides" in e for e in _legend_matches_lines(fig.axes[0]))


def test_tangent_figures_plot_the_tangent_fraction_under_one_label():
    res = _study()
    fig = P.tangent_fractions_figure(res)
    ax = fig.axes[0]
    assert ax.get_ylabel() == P.TANGENT_LABEL == "fraction of update energy in the tangent space"
    ect_cm = next(l for l in ax.get_lines() if l.get_label() == "ect run: ECT update")
    expected = [res["runs"]["ect"]["per_t"][f"{t:g}"]["cm"]["tangent_fraction"][-1] for t in res["ts"]]
    assert np.allclose(ect_cm.get_ydata(), expected)        # the tangent (not the normal) fraction
    over = P.tangent_over_training_figure(res)
    assert [a.get_ylabel() for a in over.axes] == [P.TANGENT_LABEL, "cos(successive output updates)", P.TANGENT_LABEL]
    for a in over.axes:
        _legend_matches_lines(a)
    assert _labels_match_scales(fig) == 2 and _labels_match_scales(over) == 3


def test_tangent_figures_colour_a_run_by_its_method_whatever_the_order():
    res = _study()
    flipped = {**res, "runs": dict(reversed(list(res["runs"].items())))}
    for make in (P.tangent_fractions_figure, P.tangent_over_training_figure):
        colours = [{l.get_label(): l.get_color() for a in make(r).axes for l in a.get_lines()} for r in (res, flipped)]
        assert colours[0] == colours[1]
        assert colours[0]["ect run: ECT update"] == P.METHOD_STYLES["ECT"]["color"]
        assert colours[0]["ayt run: ECT update"] == P.METHOD_STYLES["AYT"]["color"]


def test_over_training_needs_three_checkpoints(tmp_path):
    res = _study(n_ckpt=2)
    note = P.over_training_note(res)
    assert "at least 3 checkpoints" in note and "'ect' has 2 (iterations [100, 200])" in note
    with pytest.raises(ValueError, match="at least 3 checkpoints"):
        P.tangent_over_training_figure(res)
    paths = P.plot_tangent_study(res, tmp_path)
    assert [p.name for p in paths] == ["disk_fractions_vs_t.png"]     # no figure of empty panels
    assert P.over_training_note(_study(n_ckpt=3)) is None
    assert [p.name for p in P.plot_tangent_study(_study(n_ckpt=3), tmp_path)] == \
        ["disk_fractions_vs_t.png", "disk_over_training.png"]


def test_coincide():
    assert P.coincide([0.5, 0.6], [0.505, 0.6]) and not P.coincide([0.5, 0.6], [0.5, 0.62])
    assert not P.coincide([0.5], [0.5, 0.5])


# ----------------------------------------------------------------------------------------------
# Loss curves, Figure 1, R^2

def test_loss_curves_say_log_scale_only_on_log_axes():
    recs = [{"iteration": i, "loss": 100.0 / (i + 1), "distance": 2.0 + 0.1 * i} for i in range(50)]
    fig = P.loss_curves({"run": recs})
    titles = {ax.get_title(): ax.get_yscale() for ax in fig.axes if ax.get_title()}
    assert titles == {"loss (log scale)": "log", "distance": "linear"}
    assert _labels_match_scales(fig) >= 2
    fig = P.loss_curves({"run": recs}, logy=False)
    assert {ax.get_title() for ax in fig.axes if ax.get_title()} == {"loss", "distance"}


def _fig1_runs(seeds_bs64: int) -> list[dict]:
    runs = [{"method": m, "batch": 16, "lr": 5e-4, "seed": s, "curve": {250: 9.0 + s + (m == "ECT"), 500: 5.0 + s}}
            for m in ("ECT", "AYT") for s in range(3)]
    runs += [{"method": m, "batch": 64, "lr": 1e-4, "seed": s, "curve": {250: 8.0 + s, 500: 4.0 + (m == "ECT")}}
             for m in ("ECT", "AYT") for s in range(seeds_bs64)]
    return runs


def test_metric_vs_iterations_names_the_seed_count_of_every_line_and_panel():
    fig = P.metric_vs_iterations(_fig1_runs(1), "FD", logx=True)
    bs16, bs64 = fig.axes
    assert bs16.get_title() == "batch size 16 (3 seeds each)"
    assert bs64.get_title() == "batch size 64 (1 seed each)"
    assert sorted(_legend_matches_lines(bs64)) == ["AYT (lr 0.0001, 1 seed)", "ECT (lr 0.0001, 1 seed)"]
    assert sorted(_legend_matches_lines(bs16)) == ["AYT (lr 0.0005, 3 seeds)", "ECT (lr 0.0005, 3 seeds)"]
    assert len(bs64.collections) == 0 and len(bs16.collections) == 2       # min-max bands only over seeds
    assert _labels_match_scales(fig) == 2
    mixed = _fig1_runs(2) + [{"method": "AYT (untrained phi)", "batch": 64, "lr": 1e-4, "seed": 0,
                              "curve": {250: 9.0, 500: 9.0}}]
    bs64 = P.metric_vs_iterations(mixed, "FD").axes[1]
    assert bs64.get_title() == "batch size 64"
    assert "AYT (untrained phi) (lr 0.0001, 1 seed)" in _legend_matches_lines(bs64)


def test_select_scale_takes_the_label_from_the_runs():
    shapes = lambda name: {"name": name, "data": "shapes", "resolution": 16}
    assert P.select_scale([shapes("demo-ayt"), shapes("demo-ect")])[1] == "demo, shapes 16px"
    assert P.select_scale([shapes("mini-ayt-lr0.0005-bs16-s0")])[1] == "mini study, shapes 16px"
    assert P.select_scale([shapes("mini-ect-lr1e-04-bs16-s0"), shapes("demo-ayt")])[1] == "demo, mini study, shapes 16px"
    assert P.select_scale([shapes("demo-ayt"), {"name": "c", "data": "cifar10", "resolution": 32}])[1] == "cifar10 32px"


def test_r2_bars_have_a_legend_for_their_colours():
    r2 = {"a": 0.9, "b": 0.2, "c": -0.3, "d": float("nan")}
    fig = P.feature_r2_bars(r2)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == list(P.R2_CLASSES)
    from matplotlib.colors import to_rgba
    colours = [to_rgba(p.get_facecolor()) for p in ax.patches]
    assert colours[:3] == [to_rgba(c) for c in P.R2_CLASSES.values()]
    fig = P.feature_r2_bars({"a": 0.9, "b": 0.7})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [next(iter(P.R2_CLASSES))]


# ----------------------------------------------------------------------------------------------
# Sample grids and the explorer's figure: pixel-exact, upscaled, titled

def test_sample_grid_is_upscaled_pixel_exact_and_titled():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 16, 16, generator=g) * 2 - 1
    title = P.sample_title("mini-ayt-lr0.0005-bs16-s0", 2000, "consistency", 2, 64, 0)
    assert title == "mini-ayt-lr0.0005-bs16-s0 @ iteration 2000: 2-step samples (64 images, seed 0)"
    fig = P.sample_grid(x, title, nrow=8)
    img = _png_array(fig)
    tile = P.tile_images(x, 8)
    assert tile.shape == (146, 146, 3)
    scale = img.shape[1] // tile.shape[1]
    assert img.shape[1] == 4 * 146 >= 400 and scale == 4
    big = tile.repeat(scale, 0).repeat(scale, 1)
    assert np.abs(img[-big.shape[0]:] - big).max() <= 1 / 255 + 1e-6           # every pixel a 4x4 block
    assert [t.get_text().replace("\n", " ") for t in fig.texts] == [title]
    grey = P.tile_images(torch.zeros(3, 1, 4, 4), nrow=2)
    assert grey.shape == (2 * 6 + 2, 2 * 6 + 2) and grey[2, 2] == 0.5 and grey[0, 0] == 1.0
    assert P.sample_title("d", 5, "diffusion") == "d @ iteration 5: EDM Heun samples"


def test_explore_figure_rows_are_labelled_and_pixel_exact():
    g = torch.Generator().manual_seed(1)
    panels = {"samples (1-step)": torch.rand(4, 3, 8, 8, generator=g) * 2 - 1,
              "AYT direction": torch.randn(4, 3, 8, 8, generator=g) * 1e-3}
    fig = P.explore_figure(panels, title="run @ iteration 3")
    texts = [t.get_text() for t in fig.texts]
    assert texts == ["samples (1-step)", "AYT direction", "run @ iteration 3"]
    img = _png_array(fig)
    tile = P.tile_images(panels["samples (1-step)"], 4)                # 8 px images drawn 8x: 64 px
    assert img.shape[1] > 8 * tile.shape[1] and P.figure_png(fig)[:8] == PNG
    big = tile.repeat(8, 0).repeat(8, 1)
    top = img.shape[0] - 2 * big.shape[0]                               # the title's height
    assert np.abs(img[top:top + big.shape[0], -big.shape[1]:] - big).max() <= 1 / 255 + 1e-6
    # the signed row is scaled per image: the largest |entry| of each image reaches 0 or 1
    ayt = panels["AYT direction"]
    tile = P.tile_images(ayt / ayt.flatten(1).abs().amax(1)[:, None, None, None], 4)
    assert tile.min() == 0.0 or tile.max() == 1.0
    with pytest.raises(ValueError):
        P.explore_figure({})


def test_study_sample_figures_are_upscaled_labelled_grids(tmp_path):
    """`python -m ayt study --sample-figures` (what `make figures` writes to figures/) draws the chosen
    runs' samples (AYT and the better ECT at their selected lr, seed 0, then the family arms that have run)
    with `sample_grid`: at least 400 px wide, titled with run, iteration and sampler."""
    import json
    from PIL import Image
    from ayt import study
    from ayt.config import make_config
    from ayt.train import train
    ds = tmp_path / "shapes"
    for arm, score in (("ayt", 4.0), ("ect-fine", 6.0), ("ect-official", 7.0)):  # finished selection runs
        sel = ds / study.run_name(arm, 5e-4, 16, study.SELECTION_SEED)
        sel.mkdir(parents=True)
        (sel / "results.json").write_text(json.dumps({"train": {}, "eval": [
            {"iteration": study.ITERS, "sampler": "1step", "n": study.N_EVAL, "metric": study.METRIC,
             study.METRIC: {"mean": score}}]}))
    for arm in ("ayt", "ect-fine", "ccd-ayt"):  # a family arm's run (its name is what counts here)
        train(make_config(None, {"run_root": str(ds), "name": study.run_name(arm, 5e-4, 16, 0), "stage": "consistency",
                                 "ct.mode": "ect", "ct.feature_net": "", "data.name": "shapes", "data.resolution": 8,
                                 "data.num_images": 32, "net.arch": "tiny", "device": "cpu", "batch": 8, "iters": 1,
                                 "log_every": 1, "sample_every": 0}))
    paths = study.sample_figures(tmp_path, tmp_path / "figures", n=16)
    assert [p.name for p in paths] == [f"samples_study_shapes_{m}_{s}step.png" for m in ("ect", "ayt", "ccd-ayt")
                                       for s in (1, 2)]
    for p in paths:
        w, h = Image.open(p).size        # 2 rows of 8 images of 8 px, padded: 82 x 22 px, drawn 7x
        assert (w, h - 22 * 7) == (82 * 7, 68)             # with a 68 px title above the grid
