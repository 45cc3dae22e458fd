"""Notebooks: clean sources, headless runs of every notebook on tiny settings, the runner's contract
(unknown parameters refused, failing cells exit non-zero), the torchrun launcher, and byte-identical
figure files.

The notebook runs share one tiny pipeline (module-scoped fixtures, all under a tmp dir): notebook 02
trains a feature net, a diffusion model and an AYT run (tiny UNet, 64 images, a few iterations);
an ECT twin is trained with `run_stage`; 03 evaluates both with a tiny shapes evaluator; 04 runs the
disk study (tiny disk-* runs) and the shapes study; 05 and explore read all of that.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
EXPECTED = {"01_feature_network", "02_consistency_training", "03_evaluation", "04_tangent_oscillation",
            "05_paper_figures", "explore"}
PARAM_LINE = re.compile(r"^[A-Za-z_]\w*: (int|float|str|bool) = \S.*?  # \S.*$")
TINY = "net.arch=tiny data.num_images=64 batch=8 log_every=1 sample_every=0 feature.eval_images=32 ckpt_every=1"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# Sources

def test_expected_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_source_notebook_is_clean(path):
    from ayt.nbrun import parse_parameters
    nb = _load(path)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for c in code:
        assert c["outputs"] == [], f"{path.name}: a code cell has outputs"
        assert c["execution_count"] is None, f"{path.name}: a code cell has an execution count"
        assert "injected-parameters" not in c["metadata"].get("tags", []), f"{path.name}: papermill-injected cell"
    for c in nb["cells"]:
        assert "papermill" not in c["metadata"], f"{path.name}: papermill cell metadata"
    assert "papermill" not in nb["metadata"]
    first = code[0]
    assert first["metadata"].get("tags") == ["parameters"], f"{path.name}: first code cell must be tagged parameters"
    assert sum("parameters" in c["metadata"].get("tags", []) for c in nb["cells"]) == 1
    src = "".join(first["source"])
    lines = [l for l in src.splitlines() if l.strip()]
    assert lines and all(PARAM_LINE.match(l) for l in lines), [l for l in lines if not PARAM_LINE.match(l)]
    params = parse_parameters(src)
    assert len(params) == len(lines)
    # conventions: figures and run root are parameters, figures go under runs/notebooks/<notebook>/ unless
    # told otherwise (only `make figures` writes figures/), widgets only behind `interactive`
    assert params["figures_dir"].default == f"runs/notebooks/{path.stem}/figures"
    assert params.get("run_root") is None or params["run_root"].default == "runs"
    if path.stem == "explore":
        assert params["interactive"].default is False and params["interactive"].type == "bool"
    body = "".join("".join(c["source"]) for c in code[1:])
    assert "ipywidgets" not in body or path.stem == "explore"


def test_parse_parameters_rules():
    from ayt.nbrun import NotebookError, Parameter, convert_value, parse_parameters, resolve_parameters
    p = parse_parameters('a: int = -1  # x\n\nb: float = 2  # y\nc: str = "s"  # z\nd: bool = False  # w\n')
    assert p["a"] == Parameter("a", "int", -1, "x")
    assert p["b"].default == 2.0 and isinstance(p["b"].default, float)
    assert (p["c"].default, p["d"].default) == ("s", False)
    for bad in ('a: int = 1', 'a: int = "1"  # wrong type', 'a = 1  # untyped', 'a: list = []  # not a literal type',
                'a: str = "x=y"  # two equals signs', 'a: int = 1 + 1  # an expression'):
        with pytest.raises(NotebookError):
            parse_parameters(bad)
    assert convert_value(p["a"], "1e3") == 1000 and convert_value(p["b"], "3") == 3.0
    assert convert_value(p["d"], "true") is True and convert_value(p["d"], "0") is False
    for param, raw in ((p["a"], "1.5"), (p["a"], "x"), (p["d"], "maybe"), (p["b"], "fast")):
        with pytest.raises(NotebookError):
            convert_value(param, raw)
    with pytest.raises(NotebookError, match=r"unknown parameter\(s\) e; .*a \(int\), b \(float\)"):
        resolve_parameters(p, {"e": "1"})


# ----------------------------------------------------------------------------------------------
# Figures

_FIG_SCRIPT = """
import sys, torch
from ayt import plotting as P
g = torch.Generator().manual_seed(0)
x = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
runs = [{"method": m, "batch": 16, "lr": 5e-4, "seed": s, "curve": {250: 9.0 + s + (m == "ECT"), 500: 5.0 + s}}
        for m in ("ECT", "AYT") for s in range(3)]
P.save_figure(P.metric_vs_iterations(runs, "FID", logx=True, title="mini study, shapes 16px, CPU"), sys.argv[1] + "/fig1")
P.save_figure(P.image_grid(x, title="samples"), sys.argv[1] + "/grid.png")
P.save_figure(P.ablation_bars({"ECT": [3.0, 4.0], "AYT": 2.0}), sys.argv[1] + "/ablation", pdf=False)
"""


def test_save_figure_is_byte_identical_across_processes(tmp_path):
    outs = []
    for k in range(2):
        d = tmp_path / f"run{k}"
        d.mkdir()
        subprocess.run([sys.executable, "-c", _FIG_SCRIPT, str(d)], check=True, env={**os.environ, **ENV})
        outs.append(d)
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == ["ablation.png", "fig1.pdf", "fig1.png", "grid.pdf", "grid.png"]
    for n in names:
        a, b = (outs[0] / n).read_bytes(), (outs[1] / n).read_bytes()
        assert a == b, f"{n} differs between two runs"
    pdf = (outs[0] / "fig1.pdf").read_bytes()
    assert b"CreationDate" not in pdf and b"ModDate" not in pdf
    assert b"Software" not in (outs[0] / "grid.png").read_bytes()


def test_figure_functions_validate_and_summarise():
    import torch
    from ayt import plotting as P
    with pytest.raises(ValueError):
        P.image_grid(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError):
        P.metric_vs_iterations([])
    its, mean, lo, hi = P.seed_band([{1: 1.0, 2: 4.0, 3: 0.0}, {1: 3.0, 2: 2.0}])
    assert its.tolist() == [1.0, 2.0] and mean.tolist() == [2.0, 3.0] and lo.tolist() == [1.0, 2.0]
    assert hi.tolist() == [3.0, 4.0]
    results = {"eval": [
        {"iteration": 10, "sampler": "1step", "metric": "fd_eval", "n": 100, "fd_eval": {"mean": 5.0, "min": 4.0}},
        {"iteration": 10, "sampler": "1step", "metric": "fd_eval", "n": 2000, "fd_eval": {"mean": 3.0, "min": 3.0}},
        {"iteration": 20, "sampler": "2step", "metric": "fd_eval", "n": 2000, "fd_eval": {"mean": 1.0, "min": 1.0}},
        {"iteration": 20, "sampler": "denoise@0.4", "metric": "dfd_eval", "n": 2000,
         "fd_eval": {"mean": 7.0, "min": 7.0}}]}
    assert P.eval_curve(results, "1step") == {10: 3.0}          # the largest n wins
    assert P.eval_curve(results, "1step", n=100) == {10: 5.0}
    assert P.eval_curve(results, "denoise@0.4") == {20: 7.0}
    runs = [{"method": "AYT", "aug_set": a, "mode": "mfd", "batch": 16, "curve": {100: v, 200: v / 2}}
            for a, v in (("deg", 4.0), ("geo", 6.0), ("geo", 8.0))]
    values, it = P.ablation_values(runs, "aug_set")
    assert it == 200 and values == {"deg": [2.0], "geo": [3.0, 4.0]}
    assert P.ablation_values(runs, "distance") == ({}, None)
    sel, note = P.select_scale([{"name": "mini-ayt-lr0.0005-bs16-s0", "data": "shapes", "resolution": 16},
                                {"name": "disk-ayt", "data": "disk", "resolution": 1}])
    assert note == "mini study, shapes 16px" and len(sel) == 1
    sel, note = P.select_scale([{"name": "mini-ayt", "data": "shapes", "resolution": 16},
                                {"name": "cifar10-ayt", "data": "cifar10", "resolution": 32}])
    assert note == "cifar10 32px" and [r["data"] for r in sel] == ["cifar10"]


# ----------------------------------------------------------------------------------------------
# Runner contract (command line)

def _cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "ayt", "notebook", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, **ENV}, timeout=timeout)


def test_runner_refuses_unknown_and_badly_typed_parameters(tmp_path):
    nb = NB_DIR / "01_feature_network.ipynb"
    r = _cli(nb, "-p", "bogus", "1", "--out-dir", tmp_path)
    assert r.returncode == 2
    assert "bogus" in r.stderr and "preset (str)" in r.stderr and "iters (int)" in r.stderr
    r = _cli(nb, "-p", "iters", "many", "--out-dir", tmp_path)
    assert r.returncode == 2 and "iters" in r.stderr and "not a valid int" in r.stderr
    assert not any(tmp_path.iterdir()), "nothing may be executed or written after a refused parameter"


@pytest.fixture(scope="module")
def kernel():
    """The `python3` kernel the runner insists on (installed into this environment once if missing)."""
    pytest.importorskip("papermill")
    from jupyter_client.kernelspec import find_kernel_specs
    if "python3" not in find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], check=True)
    return "python3"


def _notebook(path: Path, *sources: str) -> Path:
    """A notebook of a markdown cell, a parameters cell and code cells."""
    cells = [{"cell_type": "markdown", "id": "m", "metadata": {}, "source": ["# a test notebook"]},
             {"cell_type": "code", "id": "p", "metadata": {"tags": ["parameters"]}, "execution_count": None,
              "outputs": [], "source": ["x: int = 1  # a number"]}]
    cells += [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
               "source": [src]} for i, src in enumerate(sources)]
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                                                            "display_name": "Python 3"}},
                                "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_runner_exits_nonzero_on_failing_cell_and_ends_with_a_one_line_summary(tmp_path, kernel):
    nb = _notebook(tmp_path / "fails.ipynb", "y = x + 1", "raise RuntimeError(f'boom {x * 2}\\nsecond line')",
                   "print('never')")
    r = _cli(nb, "-p", "x", "21", "--out-dir", tmp_path / "out", "--name", "t", "--quiet", cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "RuntimeError" in "\n".join(lines[:-2]) and "second line" in r.stderr     # the traceback comes first
    assert f"{tmp_path / 'out' / 'fails-t.ipynb'}" in lines[-2]
    # cells counted from 1 in the source notebook (markdown included; the injected cell not counted);
    # In [4]: parameters, injected parameters, y = x + 1, then the failing cell
    assert lines[-1] == f"notebook {nb} failed in cell 4 (In [4]): RuntimeError: boom 42"
    executed = _load(tmp_path / "out" / "fails-t.ipynb")
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])
    assert nb.read_text().count("injected") == 0, "the source notebook must not be modified"


def test_failure_summary_names_the_source_cell(tmp_path, kernel):
    from types import SimpleNamespace
    from papermill import PapermillExecutionError
    from ayt.nbrun import failure_summary, run_notebook, source_cell_number
    nb = _notebook(tmp_path / "n.ipynb", "a = 1", "b = 2")
    # executed copy: [markdown, parameters, (injected parameters,) a = 1, b = 2]
    assert [source_cell_number(nb, i) for i in (0, 1, 3, 4)] == [1, 2, 3, 4]
    assert [source_cell_number(nb, i, injected=False) for i in (0, 1, 2, 3)] == [1, 2, 3, 4]
    err = SimpleNamespace(cell_index=4, exec_count=7, ename="ValueError", evalue="\x1b[31mbad value\x1b[0m\nmore",
                          source_cell=4)
    assert failure_summary(nb, err) == f"notebook {nb} failed in cell 4 (In [7]): ValueError: bad value"
    err = SimpleNamespace(cell_index=3, exec_count=3, ename="KeyboardInterrupt", evalue="")
    assert failure_summary(nb, err) == f"notebook {nb} failed in cell index 3 of the executed copy (In [3]): KeyboardInterrupt"
    # without parameters papermill injects no cell: the numbering still names the source cell
    nb = _notebook(tmp_path / "m.ipynb", "raise KeyError('k')")
    with pytest.raises(PapermillExecutionError) as info:
        run_notebook(nb, {}, out_dir=tmp_path / "out", name="t", cwd=tmp_path, log_output=False)
    assert failure_summary(nb, info.value) == f"notebook {nb} failed in cell 3 (In [2]): KeyError: 'k'"
    assert info.value.executed_copy == tmp_path / "out" / "m-t.ipynb"


def test_launch_torchrun_streams_and_raises():
    from ayt.notebook import launch_torchrun
    lines: list[str] = []
    launch_torchrun(["presets"], 1, log=lines.append, env=ENV)
    assert lines[0].startswith("$ ") and "--nproc-per-node=1" in lines[0]
    assert any("mini-ayt" in l for l in lines)
    with pytest.raises(subprocess.CalledProcessError):
        launch_torchrun(["train", "--preset", "no-such-preset"], 1, log=lambda s: None, env=ENV)
    with pytest.raises(ValueError):
        launch_torchrun(["presets"], 0)


# ----------------------------------------------------------------------------------------------
# Headless runs of every notebook

def _run(nb: str, tmp: Path, **params) -> Path:
    from ayt.nbrun import run_notebook
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)  # inherited by the kernel
    try:
        return run_notebook(NB_DIR / f"{nb}.ipynb", params, out_dir=tmp / "executed", name="test", cwd=tmp,
                            log_output=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _numbers(obj, path=""):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


def _check_results(path: Path, min_numbers: int = 1) -> dict:
    """results.json exists and all its numbers are finite (R^2 of a constant label is NaN by definition)."""
    assert path.is_file(), path
    res = json.loads(path.read_text())
    nums = list(_numbers(res))
    assert len(nums) >= min_numbers, nums
    bad = [(p, v) for p, v in nums if not math.isfinite(v) and not ("/r2/" in p or "/relative_mse/" in p)]
    assert not bad, bad
    return res


def _check_figures(figures: Path, stems, pdf: bool = True):
    for stem in stems:
        png = figures / f"{stem}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        if pdf:
            assert (figures / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-", stem


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, kernel):
    """Notebook 02 on tiny settings (feature net, diffusion, AYT), then an ECT twin via run_stage."""
    from ayt.notebook import run_stage
    tmp = tmp_path_factory.mktemp("notebooks")
    executed = _run("02_consistency_training", tmp, overrides=TINY, iters=3, diffusion_iters=2, feature_iters=2,
                    n_samples=4, run_root="runs", figures_dir="figures", out_dir="out/02")
    log: list[str] = []
    ect = run_stage("demo-ayt", TINY.split() + ["iters=3", "ct.mode=ect", f"net.init={tmp / 'runs/demo-diffusion'}"],
                    tmp / "runs", name="demo-ect", log=log.append)
    again = run_stage("demo-ayt", TINY.split() + ["iters=3", "ct.mode=ect", f"net.init={tmp / 'runs/demo-diffusion'}"],
                      tmp / "runs", name="demo-ect", log=log.append)
    assert again == ect and "already trained" in log[-1]
    return {"tmp": tmp, "executed": executed, "ayt": tmp / "runs" / "demo-ayt", "ect": ect}


def test_02_consistency_training(pipeline):
    tmp = pipeline["tmp"]
    executed = _load(pipeline["executed"])
    assert any("injected-parameters" in c["metadata"].get("tags", []) for c in executed["cells"])
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in executed["cells"] if c["cell_type"] == "code" for o in c["outputs"])
    res = _check_results(tmp / "out/02/results.json", min_numbers=6)
    assert res["loss"] == "mfd" and res["train"]["iterations"] == 3
    assert Path(tmp, res["init"]).name == "demo-diffusion" and Path(tmp, res["feature_net"]).name == "demo-feature-net"
    assert {"distance", "loss_ect"} <= set(res["last_logged"])
    _check_figures(tmp / "figures", ["demo-ayt_loss_curves", "demo-ayt_samples_1step", "demo-ayt_samples_2step"])
    for run in ("demo-feature-net", "demo-diffusion", "demo-ayt", "demo-ect"):
        assert (tmp / "runs" / run / "results.json").is_file()


def _tree(root: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_01_feature_network_writes_under_runs_notebooks_by_default(tmp_path, kernel):
    """Run through the command line with the default figures_dir / out_dir, from a directory that has a
    figures/ folder (as the repository does): nothing in figures/ may change; figures, results and the
    executed copy land under runs/notebooks/."""
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "feature_net_augmentations.png").write_bytes(b"committed figure")
    before, repo_before = _tree(tmp_path / "figures"), _tree(ROOT / "figures")
    r = _cli(NB_DIR / "01_feature_network.ipynb", "-p", "iters", "2", "-p", "n_examples", "3", "--name", "t",
             "--quiet", "-p", "overrides", "data.num_images=64 batch=16 feature.eval_images=64 log_every=1 ckpt_every=2",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _tree(tmp_path / "figures") == before and _tree(ROOT / "figures") == repo_before
    out = tmp_path / "runs/notebooks/01_feature_network"
    assert (tmp_path / "runs/notebooks/01_feature_network-t.ipynb").is_file()
    res = _check_results(out / "results.json", min_numbers=30)
    fq = res["feature_net"]
    assert len(fq["labels"]) == 15 and set(fq["r2"]) == set(fq["labels"])
    assert set(res["figure_examples_mean_abs_error"]) == set(fq["labels"])
    _check_figures(out / "figures", ["feature_net_r2", "feature_net_augmentations"])
    assert sorted(res["figures"]) == sorted(str(Path("runs/notebooks/01_feature_network/figures") / f)
                                            for f in ("feature_net_r2.png", "feature_net_r2.pdf",
                                                      "feature_net_augmentations.png", "feature_net_augmentations.pdf"))


@pytest.fixture(scope="module")
def evaluated(pipeline):
    """Notebook 03 over the AYT and ECT runs (every checkpoint, 1- and 2-step, tiny evaluator)."""
    from ayt.data import make_shapes
    from ayt.metrics import train_evaluator
    tmp = pipeline["tmp"]
    images, params = make_shapes(256, 16, seed=5)
    train_evaluator(images, params, steps=5, batch_size=32, seed=0).save(tmp / "evaluator.pt")
    _run("03_evaluation", tmp, runs=f"{pipeline['ayt']},{pipeline['ect']}", n=64, batch=32, evaluator="evaluator.pt",
         metric="fd_eval", figures_dir="figures", out_dir="out/03")  # not auto: FID wherever Inception weights exist
    return tmp / "out/03/results.json"


def test_03_evaluation(pipeline, evaluated):
    res = _check_results(evaluated, min_numbers=20)
    for run in ("demo-ayt", "demo-ect"):
        recs = res["records"][run]
        assert {(r["iteration"], r["sampler"]) for r in recs} == {(i, s) for i in (1, 2, 3) for s in ("1step", "2step")}
        assert all(r["metric"] == "fd_eval" and r["n"] == 64 and r["fd_eval"]["mean"] > 0 for r in recs)
        stored = _load(pipeline["tmp"] / "runs" / run / "results.json")["eval"]
        assert len(stored) == 6  # appended to the run's own results.json
    assert set(res["curves"]["1step"]) == {"demo-ayt", "demo-ect"}
    _check_figures(pipeline["tmp"] / "figures", ["eval_1step_vs_iterations", "eval_2step_vs_iterations"])


@pytest.fixture(scope="module")
def tangents(pipeline):
    """Notebook 04: tangent grid, tiny disk study (presets disk-*), shapes study of the AYT/ECT runs."""
    tmp = pipeline["tmp"]
    _run("04_tangent_oscillation", tmp, ts="0.1,1,10", disk_n=16, shapes_n=4,
         disk_overrides="iters=3 ckpt_every=1 log_every=1 data.num_images=256 batch=32 feature.eval_images=64",
         shapes_runs=f"ect:{pipeline['ect']},ayt:{pipeline['ayt']}", run_root="runs", figures_dir="figures",
         out_dir="out/04")
    return tmp / "out/04"


def test_04_tangent_oscillation(pipeline, tangents):
    res = _check_results(tangents / "results.json", min_numbers=50)
    assert res["ts"] == [0.1, 1.0, 10.0]
    for study in ("disk", "shapes"):
        assert set(res[study]["runs"]) == ({"ect", "ayt"})
        for r in res[study]["runs"].values():
            assert r["iterations"] == [1, 2, 3]
            assert 0 <= r["summary"]["cm_tangent_fraction"] <= 1
            assert abs(r["summary"]["cm_tangent_fraction"] + r["summary"]["cm_normal_fraction"] - 1) < 1e-4
    assert res["tangent_grid"]["iteration"] == 3 and len(res["tangent_grid"]["rs"]) == 3
    assert (tangents / "tangent_grid.pt").is_file()
    _check_figures(pipeline["tmp"] / "figures", ["tangent_grid", "disk_fractions_vs_t", "disk_over_training",
                                                 "shapes_fractions_vs_t", "shapes_over_training"], pdf=False)


def test_05_paper_figures(pipeline, evaluated, tangents):
    tmp = pipeline["tmp"]
    _run("05_paper_figures", tmp, run_root="runs", tangent_dir=str(tangents), figures_dir="paper", out_dir="out/05")
    res = _check_results(tmp / "out/05/results.json", min_numbers=10)
    assert res["1step"]["scale"] == "demo, shapes 16px"   # no paper-scale runs: the title says what the runs are
    assert set(res["1step"]["runs"]) == {"demo-ayt", "demo-ect"}
    assert set(res["tangent_disk"]) == {"ect", "ayt"}
    assert "ablation_distance" not in res and "ablation_aug_set" not in res   # no such runs: skipped with a note
    _check_figures(tmp / "paper", ["fig1_fd_eval_1step_vs_iterations", "fig1_fd_eval_2step_vs_iterations",
                                   "demo-feature-net_r2"])
    _check_figures(tmp / "paper", ["tangent_grid", "disk_fractions_vs_t", "shapes_over_training"], pdf=False)
    assert sorted(res["figures"]) == res["figures"] and all(Path(tmp, f).is_file() for f in res["figures"])


def test_explore(pipeline):
    tmp = pipeline["tmp"]
    _run("explore", tmp, run=str(pipeline["ayt"]), n=3, t=2.0, steps=2, figures_dir="figures", out_dir="out/explore")
    res = _check_results(tmp / "out/explore/results.json", min_numbers=5)
    assert set(res["mean_abs"]) == {"samples (2-step)", "x_t (t=2)", "f(x_t, t)", "CM tangent", "AYT direction"}
    _check_figures(tmp / "figures", ["explore_demo-ayt_t2"])
