"""The glue the notebooks call: each function a thin wrapper over the package, so that no logic lives
only in a notebook (docs/architecture.md section 7).

  goto_repo_root, split_overrides       paths and override strings as on the command line
  run_stage, launch_torchrun            train (or reuse, or resume) the run of one preset, in-process or torchrun
  find_checkpoint, load_checkpoint      a run's checkpoint; its network, with what sampling needs
  sample_images / samples_from          1- or 2-step samples of a run
  augmentation_predictions              the feature network's label regression on augmented images
  tangent_grid_for_run / tangent_grid_at  the tangent grid of ayt.analysis for a run
  eval_table, format_table              evaluation records as a plain-text table
  show, write_results                   a figure as a PNG output; a notebook's numbers as results.json

Running notebooks headless is `ayt.nbrun` (`python -m ayt notebook`); the interactive explorer is
`ayt.explorer`.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from .runs import build_dataset, load_feature_net, load_run_model

PathLike = Union[str, Path]


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


def find_checkpoint(run_dir: PathLike, iteration: Optional[int] = None, which: str = "ema") -> tuple[int, Path]:
    """(iteration, path) of the file of `run_dir` holding the `which` weights at `iteration` (None or
    < 0: the latest), a full checkpoint or an EMA snapshot (`ayt.checkpoint.list_weights`);
    CheckpointError listing the available iterations when there is none."""
    from . import checkpoint as ck
    ckpts = ck.list_weights(run_dir, which)
    if not ckpts:
        raise ck.CheckpointError(f"{run_dir} holds no checkpoints")
    if iteration is None or iteration < 0:
        return ckpts[-1]
    for it, p in ckpts:
        if it == iteration:
            return it, p
    raise ck.CheckpointError(f"{run_dir} has no checkpoint at iteration {iteration}; "
                             f"available: {[it for it, _ in ckpts]}")


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A run's network at one checkpoint (eval mode, on `device`) and what sampling needs from it."""
    run_dir: Path
    iteration: int
    which: str              # 'ema' or 'model'
    net: Any                # torch.nn.Module
    cfg: Any                # ayt.config.TrainConfig of the run
    img_channels: int
    label_dim: int
    device: Any             # torch.device


def load_checkpoint(run_dir: PathLike, iteration: Optional[int] = None, which: str = "ema",
                    device: Optional[str] = None) -> LoadedCheckpoint:
    """`ayt.runs.load_run_model` of the run's checkpoint at `iteration` (None or < 0: the newest
    readable one, falling back past unreadable files); keeps only the network and the checkpoint's
    small fields (not the optimiser state)."""
    dev = _device(device)
    latest = iteration is None or iteration < 0
    path = run_dir if latest else find_checkpoint(run_dir, iteration, which)[1]
    net, cfg, state = load_run_model(path, which, dev)
    return LoadedCheckpoint(Path(run_dir), int(state["iteration"]), which, net, cfg, int(state["img_channels"]),
                            int(state["label_dim"]), dev)


def samples_from(loaded: LoadedCheckpoint, n: int = 64, seed: int = 0, steps: int = 1):
    """n samples [n, C, H, W] in [-1, 1] from a loaded network: 1- or 2-step consistency sampling, EDM
    Heun for diffusion runs (ayt.sampling.generate)."""
    from .sampling import generate
    cfg = loaded.cfg
    if cfg.stage == "feature":
        raise ValueError(f"{loaded.run_dir} is a feature-network run; nothing to sample")
    return generate(loaded.net, cfg.stage, n, loaded.img_channels, cfg.data.resolution, loaded.label_dim, seed,
                    loaded.device, steps=steps)


def sample_images(run_dir: PathLike, n: int = 64, seed: int = 0, steps: int = 1, iteration: Optional[int] = None,
                  device: Optional[str] = None):
    """n samples [n, C, H, W] in [-1, 1] from a run's EMA network (checkpoint `iteration`, default the
    latest): `samples_from(load_checkpoint(...))`."""
    return samples_from(load_checkpoint(run_dir, iteration, "ema", device), n, seed, steps)


def augmentation_predictions(feature_run: PathLike, n: int = 6, p: Optional[float] = None, seed: int = 0,
                             device: Optional[str] = None) -> dict:
    """Augment n images of the feature run's data (its augmentation set, probability p; default the
    run's feature.p) and regress the labels with its network: {'x', 'x_aug', 'labels', 'preds',
    'label_names'} (images [n, C, H, W] in [-1, 1], labels/preds [n, L], CPU)."""
    import torch
    from .augment import AugmentPipe
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


def run_distance(cfg, img_channels: int, device):
    """The MFD of the run's feature net (None when the run names none or it does not exist)."""
    from .losses import MFD
    fn = cfg.ct.feature_net
    if not fn or not Path(fn).exists():
        return None
    phi = load_feature_net(fn, cfg.ct.feature_arch, cfg.data.resolution, img_channels, cfg.ct.feature_outputs)
    return MFD(phi.to(device), eps=cfg.ct.mfd_eps)


def tangent_grid_at(loaded: LoadedCheckpoint, dataset, distance, ts: Sequence[float], n: int = 1, index: int = 0,
                    seed: int = 0, jvp: bool = True) -> dict:
    """`ayt.analysis.tangent_grid` of a loaded consistency network for n trajectories: x_0 = images
    index..index+n-1 of a seeded permutation of `dataset` (the run's training data, `build_dataset`),
    eps a seeded Gaussian draw, r from the run's ECT schedule at the checkpoint's iteration, the AYT
    direction from `distance` (`run_distance`; None: no AYT row); jvp: also the JVP tangent row (the
    costly one). Returns the grid (tensors
    [K, n, C, H, W], CPU) plus 'iteration' and 'run_dir'."""
    import torch
    from . import consistency as C
    from .analysis import tangent_grid
    cfg, dev = loaded.cfg, loaded.device
    if cfg.stage != "consistency":
        raise ValueError(f"{loaded.run_dir} is a {cfg.stage!r} run; the tangent grid needs a consistency run")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[index:index + n]
    x_0 = torch.stack([dataset[int(i)][0] for i in idx]).to(dev)
    eps = torch.randn(x_0.shape, generator=g).to(dev)
    schedule = C.TRSchedule.from_config(cfg.ct)
    grid = tangent_grid(loaded.net, x_0, eps, [float(t) for t in ts], distance, schedule, it=loaded.iteration, jvp=jvp)
    return {**{k: v.cpu() for k, v in grid.items()}, "iteration": loaded.iteration, "run_dir": str(loaded.run_dir)}


def tangent_grid_for_run(run_dir: PathLike, ts: Sequence[float], n: int = 1, index: int = 0, seed: int = 0,
                         iteration: Optional[int] = None, which: str = "ema", device: Optional[str] = None) -> dict:
    """`tangent_grid_at` for a run directory: its checkpoint at `iteration` (default: the latest), its
    training data and the MFD of its feature net when it has one."""
    loaded = load_checkpoint(run_dir, iteration, which, device)
    if loaded.cfg.stage != "consistency":
        raise ValueError(f"{run_dir} is a {loaded.cfg.stage!r} run; the tangent grid needs a consistency run")
    distance = run_distance(loaded.cfg, loaded.img_channels, loaded.device)
    return tangent_grid_at(loaded, build_dataset(loaded.cfg), distance, ts, n, index, seed)


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


def show(fig, dpi: Optional[int] = None) -> None:
    """Display a matplotlib Figure in the notebook as a PNG at `dpi` (default: the figure's own; works
    with any backend, and the executed copy of a headless run keeps the image)."""
    from IPython.display import Image, display
    from .plotting import figure_png
    display(Image(data=figure_png(fig, dpi)))


def write_results(obj: dict, out_dir: PathLike, name: str = "results.json") -> Path:
    """Write a notebook's numbers to <out_dir>/results.json (sorted keys, atomically); returns the path."""
    from .checkpoint import write_json_atomic
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(obj, path)
    return path


