"""The explorer (ayt.explorer) through what it shows: a PNG in its output area after each simulated
widget change, exactly one redraw per change, networks loaded once per (run, checkpoint), widgets
starting from the notebook's parameters, and the same rows as the notebook's static figure."""
from __future__ import annotations

import base64
import io

import pytest
import torch

pytest.importorskip("ipywidgets")

from ayt.config import make_config
from ayt.explorer import Explorer, LRUCache, explore_panels
from ayt.notebook import load_checkpoint
from ayt.train import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny consistency runs on 8 px shapes with 3 checkpoints each: AYT (with a feature net) and
    ECT (without one), plus the feature run and a run directory without checkpoints."""
    root = tmp_path_factory.mktemp("explorer")
    common = {"run_root": str(root), "data.name": "shapes", "data.resolution": 8, "data.num_images": 64,
              "device": "cpu", "batch": 8, "iters": 3, "log_every": 1, "ckpt_every": 1, "sample_every": 0,
              "ema_decay": 0.0,              # EMA = model: every checkpoint draws differently
              "keep_last": 1, "snapshot_every": 1}  # iterations 1, 2 from EMA snapshots, 3 also a full checkpoint
    feat = train(make_config(None, {**common, "name": "feat", "stage": "feature", "feature.arch": "mini-vgg",
                                    "feature.eval_images": 16, "iters": 1}))
    ct = {**common, "stage": "consistency", "net.arch": "tiny", "ct.feature_arch": "mini-vgg"}
    ayt = train(make_config(None, {**ct, "name": "ayt", "ct.mode": "mfd", "ct.feature_net": str(feat)}))
    ect = train(make_config(None, {**ct, "name": "ect", "ct.mode": "ect", "ct.feature_net": ""}))
    empty = root / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    return {"ayt": str(ayt), "ect": str(ect), "feat": str(feat), "empty": str(empty)}


def _png(ex: Explorer) -> bytes:
    """The one output of the explorer's output area, which must be a PNG image."""
    outs = ex.out.outputs
    assert len(outs) == 1 and outs[0]["output_type"] == "display_data", outs
    png = base64.b64decode(outs[0]["data"]["image/png"])
    assert png[:8] == PNG
    return png


def _text(ex: Explorer) -> str:
    outs = ex.out.outputs
    assert len(outs) == 1 and outs[0]["output_type"] == "stream", outs
    return outs[0]["text"]


def _counting_loader(calls: list):
    def loader(run, iteration, which="ema", device=None):
        calls.append((run, iteration))
        return load_checkpoint(run, iteration, which, device)
    return loader


def test_explorer_shows_a_png_once_per_change_and_loads_each_checkpoint_once(runs):
    calls: list = []
    ex = Explorer([runs["ayt"], runs["ect"]], n=2, t=2.5, seed=3, steps=2, iteration=2,
                  loader=_counting_loader(calls))
    # widgets start from the notebook's parameters (t = 2.5 is added to the slider's choices)
    assert (ex.run_w.value, ex.ckpt_w.value, ex.t_w.value, ex.seed_w.value, ex.steps_w.value) == \
        (runs["ayt"], 2, 2.5, 3, 2)
    assert 2.5 in ex.t_w.options and list(ex.ckpt_w.options) == [1, 2, 3]
    assert ex.redraws == 1
    pngs = [_png(ex)]
    from PIL import Image
    assert Image.open(io.BytesIO(pngs[0])).size[0] >= 2 * 64    # two images, each at least 64 px
    for widget, value in ((ex.t_w, 10.0), (ex.seed_w, 4), (ex.steps_w, 1), (ex.t_w, 0.1), (ex.ckpt_w, 3),
                          (ex.ckpt_w, 2)):
        before = ex.redraws
        widget.value = value                    # what a user's click does
        assert ex.redraws == before + 1, widget.description
        pngs.append(_png(ex))
    assert len(set(pngs[:6])) == 6              # every change drew something new ...
    assert pngs[6] == pngs[4]                   # ... and the same values draw the same figure
    assert calls == [(runs["ayt"], 2), (runs["ayt"], 3)]   # checkpoint 2 loaded once, then served from the cache
    # switching runs: the checkpoint list follows, and the figure is drawn once
    before = ex.redraws
    ex.run_w.value = runs["ect"]
    assert ex.redraws == before + 1 and ex.ckpt_w.value == 3 and list(ex.ckpt_w.options) == [1, 2, 3]
    _png(ex)
    ex.run_w.value = runs["ayt"]
    assert ex.redraws == before + 2
    _png(ex)
    assert calls[2:] == [(runs["ect"], 3)]      # (ayt, 3) was still cached
    assert "drawn in" in ex.status.value


def test_explorer_rows_equal_the_static_figure(runs):
    ex = Explorer([runs["ect"]], n=3, t=1.0, seed=5, steps=1, iteration=1)
    rows = ex.panels()
    static = explore_panels(runs["ect"], 1, 1.0, 5, 1, 3)
    assert list(rows) == list(static) == ["samples (1-step)", "x_t (t=1)", "f(x_t, t)", "CM tangent",
                                          "CM tangent (JVP)"]            # no feature net: the JVP tangent
    for k in rows:
        assert torch.equal(rows[k], static[k]), k
    assert list(explore_panels(runs["ayt"], None, 1.0, 5, 2, 3))[-1] == "AYT direction"


def test_explorer_reports_bad_input_and_unusable_runs(runs):
    with pytest.raises(ValueError, match=r"no checkpoint at iteration 7; available: \[1, 2, 3\]"):
        Explorer([runs["ayt"]], iteration=7)
    with pytest.raises(ValueError, match="steps"):
        Explorer([runs["ayt"]], steps=3)
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        Explorer([runs["ayt"], "no-such-run"])
    ex = Explorer([runs["ayt"], runs["empty"], runs["feat"]], n=2)
    ex.run_w.value = runs["empty"]
    assert ex.redraws == 2 and "no checkpoints" in _text(ex)
    ex.run_w.value = runs["feat"]               # a feature-network run: the error is shown, not lost
    assert ex.redraws == 3 and "consistency run" in _text(ex) and ex.status.value.startswith("error")
    ex.run_w.value = runs["ayt"]
    _png(ex)


def test_lru_cache():
    c = LRUCache(2)
    made = []
    get = lambda k: c.get(k, lambda: made.append(k) or k * 10)
    assert [get(1), get(2), get(1), get(3), get(1), get(2)] == [10, 20, 10, 30, 10, 20]
    assert made == [1, 2, 3, 2] and c.misses == 4 and len(c) == 2     # 2 was evicted by 3 (1 was used later)
    with pytest.raises(ValueError):
        LRUCache(0)


def test_tangent_grid_without_jvp_has_the_same_rows():
    from ayt.analysis import tangent_grid
    from ayt.data import make_shapes
    from ayt.networks import build_network
    torch.manual_seed(0)
    net = build_network("tiny", img_resolution=8, img_channels=3).eval()
    x_0 = make_shapes(2, 8)[0]
    eps = torch.randn_like(x_0)
    full = tangent_grid(net, x_0, eps, [0.5, 2.0])
    lean = tangent_grid(net, x_0, eps, [0.5, 2.0], jvp=False)
    assert set(full) - set(lean) == {"cm_tangent_jvp"}
    for k in lean:
        assert torch.equal(full[k], lean[k]), k
