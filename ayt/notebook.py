"""Running the notebooks headless (papermill), and the small glue the notebooks call.

    python -m ayt notebook notebooks/02_consistency_training.ipynb -p loss ect -p iters 500
    python -m ayt notebook NOTEBOOK [-p NAME VALUE ...] [--name NAME] [--out-dir runs/notebooks] [--cwd DIR]

The runner (ARCHITECTURE.md "Notebook conventions") executes a copy of the notebook with the kernel
named `python3`, writes it to <out-dir>/<stem>-<name or timestamp>.ipynb (never over the source),
accepts only the names of the notebook's `parameters` cell (anything else is an error that lists
them), converts each value to the type declared there (`steps: int = 200  # comment`), and exits
with status 1 when a cell fails (printing that cell's error) and 2 for bad arguments.

Glue for the notebooks (each a thin wrapper over the package, so that no logic lives only in a
notebook): `goto_repo_root`, `run_stage` (train one preset in-process, or with `launch_torchrun`
when nproc > 1), `sample_images`, `augmentation_predictions`, `tangent_grid_for_run`,
`explore_panels` / `explorer`, `eval_table` / `format_table`, `show`, `write_results`.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import math
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

PathLike = Union[str, Path]
KERNEL = "python3"
PARAM_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


class NotebookError(ValueError):
    """A notebook or a parameter given to it is invalid."""


# ----------------------------------------------------------------------------------------------
# The parameters cell

@dataclass(frozen=True)
class Parameter:
    name: str
    type: str          # int | float | str | bool
    default: Any
    comment: str


def parameters_cell(nb: dict) -> tuple[int, dict]:
    """(index, cell) of the first code cell tagged `parameters`; NotebookError when there is none."""
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return i, cell
    raise NotebookError("the notebook has no code cell tagged 'parameters'")


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def parse_parameters(source: str) -> dict[str, Parameter]:
    """The declarations of a parameters cell: every non-blank line must read
    `name: type = literal  # comment` with type int, float, str or bool, a literal of that type, and
    no other '=' on the line (papermill's own parser skips such lines)."""
    out: dict[str, Parameter] = {}
    lines = source.splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            tree = ast.parse(line)
        except SyntaxError as e:
            raise NotebookError(f"parameters cell line {lineno}: not valid Python: {line!r} ({e.msg})") from None
        stmt = tree.body[0] if len(tree.body) == 1 else None
        literal = stmt.value if isinstance(stmt, ast.AnnAssign) else None
        if isinstance(literal, ast.UnaryOp) and isinstance(literal.op, (ast.USub, ast.UAdd)):
            literal = literal.operand           # -1, +0.5
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(stmt.annotation, ast.Name) and stmt.annotation.id in PARAM_TYPES
                and isinstance(literal, ast.Constant)):
            raise NotebookError(f"parameters cell line {lineno}: expected `name: int|float|str|bool = literal  "
                                f"# comment`, got {line!r}")
        tp, value = stmt.annotation.id, ast.literal_eval(stmt.value)
        ok = (type(value) is PARAM_TYPES[tp]) or (tp == "float" and type(value) is int)
        if not ok:
            raise NotebookError(f"parameters cell line {lineno}: {stmt.target.id} is declared {tp} but its value "
                                f"is {value!r}")
        if line.count("=") != 1:
            raise NotebookError(f"parameters cell line {lineno}: {line!r} has more than one '=' (papermill's parameter "
                                "parser reads only lines with exactly one; reword the comment or the default)")
        rest = line[stmt.end_col_offset:].strip()
        if not rest.startswith("#") or not rest[1:].strip():
            raise NotebookError(f"parameters cell line {lineno}: {stmt.target.id} needs a comment (`# what it is`)")
        name = stmt.target.id
        if name in out:
            raise NotebookError(f"parameters cell line {lineno}: {name} is declared twice")
        out[name] = Parameter(name, tp, float(value) if tp == "float" else value, rest[1:].strip())
    return out


def read_parameters(notebook: PathLike) -> dict[str, Parameter]:
    """The declared parameters of a notebook file (see `parse_parameters`)."""
    nb = json.loads(Path(notebook).read_text())
    return parse_parameters(_source(parameters_cell(nb)[1]))


def convert_value(param: Parameter, raw: Any) -> Any:
    """A command-line string (or a Python value) converted to the parameter's declared type."""
    tp = param.type
    if not isinstance(raw, str):
        if tp == "float" and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if type(raw) is PARAM_TYPES[tp]:
            return raw
        raise NotebookError(f"parameter {param.name}: expected {tp}, got {raw!r}")
    try:
        if tp == "str":
            return raw
        if tp == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp == "int":
            try:
                return int(raw)
            except ValueError:
                f = float(raw)          # 1e3 -> 1000
                if not f.is_integer():
                    raise
                return int(f)
        value = float(raw)
        if not math.isfinite(value) and raw.strip().lower() not in ("inf", "-inf", "nan"):
            raise ValueError
        return value
    except ValueError:
        raise NotebookError(f"parameter {param.name}: {raw!r} is not a valid {tp}") from None


def resolve_parameters(declared: dict[str, Parameter], given: dict[str, Any]) -> dict[str, Any]:
    """Check names against the declarations (unknown -> NotebookError listing the known ones) and convert."""
    unknown = [k for k in given if k not in declared]
    if unknown:
        known = ", ".join(f"{p.name} ({p.type})" for p in declared.values())
        raise NotebookError(f"unknown parameter(s) {', '.join(unknown)}; this notebook's parameters are: {known}")
    return {k: convert_value(declared[k], v) for k, v in given.items()}


# ----------------------------------------------------------------------------------------------
# Kernel and execution

def check_kernel(name: str = KERNEL) -> list[str]:
    """The argv of kernel `name`; NotebookError when it is not installed. A spec that names another
    interpreter than this one (e.g. a user-level python3 kernel shadowing the environment's) is
    reported on stderr, since that interpreter may not import ayt."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise NotebookError(f"no Jupyter kernel named {name!r}; install it with "
                            f"`{sys.executable} -m ipykernel install --sys-prefix --name {name}`") from None
    exe = spec.argv[0] if spec.argv else ""
    generic = {"python", f"python{sys.version_info[0]}", "python%d.%d" % sys.version_info[:2]}
    if exe not in generic and Path(exe).is_absolute() and Path(exe).resolve() != Path(sys.executable).resolve():
        print(f"warning: kernel {name!r} runs {exe}, not this interpreter ({sys.executable}); "
              f"reinstall it with `{sys.executable} -m ipykernel install --sys-prefix --name {name}`", file=sys.stderr)
    return list(spec.argv)


def output_path(notebook: PathLike, out_dir: PathLike = "runs/notebooks", name: Optional[str] = None) -> Path:
    """<out_dir>/<stem>-<name or UTC timestamp>.ipynb."""
    tag = name or datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(out_dir) / f"{Path(notebook).stem}-{tag}.ipynb"


def run_notebook(notebook: PathLike, parameters: Optional[dict[str, Any]] = None,
                 out_dir: PathLike = "runs/notebooks", name: Optional[str] = None, cwd: Optional[PathLike] = None,
                 log_output: bool = True, kernel_name: str = KERNEL) -> Path:
    """Execute a copy of `notebook` with papermill and return the executed copy's path.

    parameters: {name: value}; strings are converted to the declared types, unknown names raise
    NotebookError. cwd: the kernel's working directory (default: the current one). A failing cell
    raises papermill's PapermillExecutionError (the executed copy, with the error, is still written).
    """
    try:
        import papermill
    except ImportError:
        raise NotebookError("running notebooks needs papermill and ipykernel: pip install -e '.[notebooks]'") from None
    notebook = Path(notebook)
    if not notebook.is_file():
        raise FileNotFoundError(f"no such notebook: {notebook}")
    values = resolve_parameters(read_parameters(notebook), dict(parameters or {}))
    check_kernel(kernel_name)
    out = output_path(notebook, out_dir, name)
    if out.resolve() == notebook.resolve():
        raise NotebookError(f"refusing to write the executed notebook over its source {notebook}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if log_output:
        _stream_papermill_log()
    papermill.execute_notebook(str(notebook), str(out), parameters=values, kernel_name=kernel_name,
                               cwd=str(cwd or os.getcwd()), log_output=log_output, progress_bar=False)
    return out


def _stream_papermill_log() -> None:
    """Cell outputs reach papermill's logger at INFO level: print them (plain lines, headless-readable)."""
    import logging
    logger = logging.getLogger("papermill")
    if not any(getattr(h, "_ayt", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._ayt = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .cli import HelpFormatter
    ap = argparse.ArgumentParser(prog="python -m ayt notebook", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("notebook", help="the source notebook (.ipynb)")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="set a parameter of the notebook's parameters cell (repeatable)")
    ap.add_argument("--name", help="suffix of the executed copy (default: a UTC timestamp)")
    ap.add_argument("--out-dir", default="runs/notebooks", help="where the executed copy goes")
    ap.add_argument("--cwd", help="working directory of the kernel (default: the current directory)")
    ap.add_argument("--list", action="store_true", help="print the notebook's parameters and exit")
    ap.add_argument("--quiet", action="store_true", help="do not stream the cells' output")
    args = ap.parse_args(argv)
    try:
        if args.list:
            for p in read_parameters(args.notebook).values():
                print(f"{p.name}: {p.type} = {p.default!r}  # {p.comment}")
            return 0
        given: dict[str, str] = {}
        for k, v in args.parameter:
            given[k] = v
        out = run_notebook(args.notebook, given, args.out_dir, args.name, args.cwd, log_output=not args.quiet)
    except (NotebookError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # papermill's PapermillExecutionError: a cell raised
        from papermill.exceptions import PapermillExecutionError
        if not isinstance(e, PapermillExecutionError):
            raise
        tb = "\n".join(_ANSI.sub("", line) for line in (e.traceback or []))
        print(f"error: cell {e.cell_index} (execution count {e.exec_count}) of {args.notebook} failed: "
              f"{e.ename}: {e.evalue}\n{tb}", file=sys.stderr)
        return 1
    print(f"[ayt] executed {args.notebook} -> {out}")
    return 0


# ----------------------------------------------------------------------------------------------
# Glue the notebooks call

def goto_repo_root() -> Path:
    """When a notebook is opened from notebooks/ (JupyterLab), work from the repository root, so that
    relative paths (runs/, figures/, data/) mean the same as on the command line. Returns the cwd."""
    here = Path.cwd()
    if here.name == "notebooks" and (here.parent / "ayt" / "__init__.py").is_file():
        os.chdir(here.parent)
    return Path.cwd()


def split_overrides(text: str) -> list[str]:
    """'optim.lr=5e-4 iters=100' -> ['optim.lr=5e-4', 'iters=100'] (shell-style quoting allowed)."""
    return shlex.split(text or "")


def launch_torchrun(args: Sequence[str], nproc: int, log: Callable[[str], None] = print,
                    env: Optional[dict] = None) -> None:
    """Run `python -m torch.distributed.run --standalone --nproc-per-node=nproc -m ayt <args>` as a
    subprocess, streaming its output line by line to `log`; raise CalledProcessError on a non-zero exit."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "ayt", *map(str, args)]
    log("$ " + " ".join(shlex.quote(c) for c in cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, **(env or {})})
    assert proc.stdout is not None
    for line in proc.stdout:
        log(line.rstrip("\n"))
    rc = proc.wait()
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)


def _completed(run_dir: Path, iters: int) -> bool:
    res = run_dir / "results.json"
    if not res.exists():
        return False
    from . import checkpoint as ck
    train = json.loads(res.read_text()).get("train", {})
    ckpts = ck.list_checkpoints(run_dir)
    return train.get("iterations") == iters and bool(ckpts) and ckpts[-1][0] == iters


def run_stage(preset: str, overrides: Sequence[str] = (), run_root: PathLike = "runs", name: Optional[str] = None,
              nproc: int = 1, log: Callable[[str], None] = print) -> Path:
    """Train (or finish) the run of one preset and return its directory <run_root>/<name or preset>.

    A run that is already complete is not touched; an interrupted one resumes. Paths of the form
    runs/<run> in the preset's net.init / ct.feature_net are read from run_root (as `ayt demo` does).
    nproc > 1 launches `launch_torchrun`; otherwise the training runs in this process."""
    from .config import make_config, relocated_run_references
    base = [f"run_root={run_root}"] + ([f"name={name}"] if name else []) + list(overrides)
    cfg = make_config(preset, base)
    extra = relocated_run_references(cfg, list(overrides))
    if extra:
        cfg = make_config(preset, base + extra)
    run_dir = Path(cfg.run_root) / cfg.name
    if _completed(run_dir, cfg.iters):
        log(f"[ayt] {run_dir}: already trained ({cfg.iters} iterations); reusing it")
        return run_dir
    if nproc > 1:
        launch_torchrun(["train", "--preset", preset, "--resume", *base, *extra], nproc, log)
    else:
        from .train import train
        train(cfg, resume=True)
    return run_dir


def _device(device: Optional[str]) -> "Any":
    import torch
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _checkpoint_file(run_dir: PathLike, iteration: Optional[int] = None) -> Path:
    from . import checkpoint as ck
    ckpts = ck.list_checkpoints(run_dir)
    if not ckpts:
        raise ck.CheckpointError(f"{run_dir} holds no checkpoints")
    if iteration is None or iteration < 0:
        return ckpts[-1][1]
    for it, p in ckpts:
        if it == iteration:
            return p
    raise ck.CheckpointError(f"{run_dir} has no checkpoint at iteration {iteration}; "
                             f"available: {[it for it, _ in ckpts]}")


def sample_images(run_dir: PathLike, n: int = 64, seed: int = 0, steps: int = 1, iteration: Optional[int] = None,
                  device: Optional[str] = None):
    """n samples [n, C, H, W] in [-1, 1] from a run's EMA network (checkpoint `iteration`, default the
    latest): 1- or 2-step consistency sampling, EDM Heun for diffusion runs (ayt.sampling.generate)."""
    from .sampling import generate
    from .train import load_run_model
    dev = _device(device)
    net, cfg, state = load_run_model(_checkpoint_file(run_dir, iteration), "ema", dev)
    if cfg.stage == "feature":
        raise ValueError(f"{run_dir} is a feature-network run; nothing to sample")
    return generate(net, cfg.stage, n, state["img_channels"], cfg.data.resolution, state["label_dim"], seed, dev,
                    steps=steps)


def augmentation_predictions(feature_run: PathLike, n: int = 6, p: Optional[float] = None, seed: int = 0,
                             device: Optional[str] = None) -> dict:
    """Augment n images of the feature run's data (its augmentation set, probability p; default the
    run's feature.p) and regress the labels with its network: {'x', 'x_aug', 'labels', 'preds',
    'label_names'} (images [n, C, H, W] in [-1, 1], labels/preds [n, L], CPU)."""
    import torch
    from .augment import AugmentPipe
    from .train import build_dataset, load_run_model
    dev = _device(device)
    net, cfg, _ = load_run_model(feature_run, "model", dev)
    if cfg.stage != "feature":
        raise ValueError(f"{feature_run} is a {cfg.stage!r} run, not a feature-network run")
    ds = build_dataset(cfg)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n]
    x = torch.stack([ds[int(i)][0] for i in idx]).to(dev)
    pipe = AugmentPipe(cfg.feature.aug_set, p=cfg.feature.p if p is None else p)
    x_aug, labels = pipe(x, generator=torch.Generator(dev).manual_seed(seed + 1))
    with torch.no_grad():
        preds = net(x_aug).float()
    return {"x": x.cpu(), "x_aug": x_aug.cpu(), "labels": labels.cpu(), "preds": preds.cpu(),
            "label_names": pipe.label_names}


def _run_distance(cfg, img_channels: int, device):
    """The MFD of the run's feature net (None when the run names none or it does not exist)."""
    from .losses import MFD
    from .train import load_feature_net
    fn = cfg.ct.feature_net
    if not fn or not Path(fn).exists():
        return None
    phi = load_feature_net(fn, cfg.ct.feature_arch, cfg.data.resolution, img_channels, cfg.ct.feature_outputs)
    return MFD(phi.to(device), eps=cfg.ct.mfd_eps)


def tangent_grid_for_run(run_dir: PathLike, ts: Sequence[float], n: int = 1, index: int = 0, seed: int = 0,
                         iteration: Optional[int] = None, which: str = "ema", device: Optional[str] = None) -> dict:
    """`ayt.analysis.tangent_grid` for n trajectories of a consistency run: x_0 = training images
    index..index+n-1 of a seeded permutation, eps a seeded Gaussian draw, r from the run's ECT schedule
    at the checkpoint's iteration, the AYT direction from the run's feature net when it has one.
    Returns the grid (tensors [K, n, C, H, W], CPU) plus 'iteration' and 'run_dir'."""
    import torch
    from . import consistency as C
    from .analysis import tangent_grid
    from .train import build_dataset, load_run_model
    dev = _device(device)
    net, cfg, state = load_run_model(_checkpoint_file(run_dir, iteration), which, dev)
    if cfg.stage != "consistency":
        raise ValueError(f"{run_dir} is a {cfg.stage!r} run; the tangent grid needs a consistency run")
    ds = build_dataset(cfg)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[index:index + n]
    x_0 = torch.stack([ds[int(i)][0] for i in idx]).to(dev)
    eps = torch.randn(x_0.shape, generator=g).to(dev)
    ct = cfg.ct
    schedule = C.TRSchedule(ct.P_mean, ct.P_std, ct.q, ct.k, ct.b, ct.mapping, ct.stage, ct.double_every)
    grid = tangent_grid(net, x_0, eps, [float(t) for t in ts], _run_distance(cfg, state["img_channels"], dev),
                        schedule, it=int(state["iteration"]))
    return {**{k: v.cpu() for k, v in grid.items()}, "iteration": int(state["iteration"]), "run_dir": str(run_dir)}


def explore_panels(run_dir: PathLike, iteration: Optional[int] = None, t: float = 1.0, seed: int = 0,
                   steps: int = 1, n: int = 8, device: Optional[str] = None) -> dict:
    """The explorer's rows for one consistency run: samples (steps-step sampling), and for n
    training images at noise level t: x_t, f(x_t, t), the discrete CM tangent and the AYT update
    direction (or the JVP CM tangent when the run has no feature net). {label: [n, C, H, W]}."""
    grid = tangent_grid_for_run(run_dir, [t], n=n, seed=seed, iteration=iteration, device=device)
    second = "ayt_direction" if "ayt_direction" in grid else "cm_tangent_jvp"
    return {f"samples ({steps}-step)": sample_images(run_dir, n, seed, steps, iteration, device),
            f"x_t (t={t:g})": grid["x_t"][0], "f(x_t, t)": grid["f"][0], "CM tangent": grid["cm_tangent"][0],
            ("AYT direction" if second == "ayt_direction" else "CM tangent (JVP)"): grid[second][0]}


def explorer(run_dirs: Sequence[PathLike], n: int = 8, device: Optional[str] = None):
    """An ipywidgets explorer over (run, checkpoint, t, seed, sampler steps) that redraws
    `ayt.plotting.explore_figure(explore_panels(...))`; returns the widget (display it)."""
    import ipywidgets as W
    from IPython.display import display
    from . import checkpoint as ck
    from .plotting import explore_figure
    runs = [str(r) for r in run_dirs]
    if not runs:
        raise ValueError("explorer needs at least one run directory")
    run_w = W.Dropdown(options=runs, value=runs[0], description="run")
    ckpt_w = W.Dropdown(description="checkpoint")
    t_w = W.SelectionSlider(options=[0.01, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0, 40.0, 80.0], value=1.0,
                            description="t")
    seed_w = W.IntText(value=0, description="seed")
    steps_w = W.ToggleButtons(options=[1, 2], value=1, description="steps")
    out = W.Output()

    def set_checkpoints(*_):
        ckpt_w.options = [it for it, _ in ck.list_checkpoints(run_w.value)]
        ckpt_w.value = ckpt_w.options[-1] if ckpt_w.options else None

    def redraw(*_):
        out.clear_output(wait=True)
        with out:
            if ckpt_w.value is None:
                print(f"{run_w.value}: no checkpoints")
                return
            panels = explore_panels(run_w.value, ckpt_w.value, t_w.value, seed_w.value, steps_w.value, n, device)
            display(explore_figure(panels, title=f"{Path(run_w.value).name} @ {ckpt_w.value}"))

    run_w.observe(set_checkpoints, "value")
    set_checkpoints()
    for w in (run_w, ckpt_w, t_w, seed_w, steps_w):
        w.observe(redraw, "value")
    redraw()
    return W.VBox([W.HBox([run_w, ckpt_w]), W.HBox([t_w, seed_w, steps_w]), out])


def eval_table(records: dict[str, list[dict]], value: str = "mean") -> list[dict]:
    """Rows {run, iteration, sampler, metric, n, value, min} from {run name: ayt.evaluate records}."""
    rows = []
    for run, recs in records.items():
        for r in recs:
            key = r["metric"][1:] if r["metric"] not in r else r["metric"]
            rows.append({"run": run, "iteration": r["iteration"], "sampler": r["sampler"], "metric": r["metric"],
                         "n": r["n"], "value": r[key][value], "min": r[key]["min"]})
    return rows


def format_table(rows: Sequence[dict], columns: Optional[Sequence[str]] = None) -> str:
    """A plain-text table (readable in a headless log and in JupyterLab)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def show(fig, dpi: int = 100) -> None:
    """Display a matplotlib Figure in the notebook as a PNG (works with any backend, and the executed
    copy of a headless run keeps the image)."""
    import io
    from IPython.display import Image, display
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    display(Image(data=buf.getvalue()))


def write_results(obj: dict, out_dir: PathLike, name: str = "results.json") -> Path:
    """Write a notebook's numbers to <out_dir>/results.json (sorted keys, atomically); returns the path."""
    from .checkpoint import write_json_atomic
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(obj, path)
    return path


if __name__ == "__main__":
    sys.exit(main())
