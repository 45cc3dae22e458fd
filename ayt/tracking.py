"""Live metrics: TensorBoard event files and (optionally) Weights & Biases, behind one small interface.

    tracker = open_tracker(cfg, run_dir, job="train", purge_step=start_it)   # rank 0; a no-op elsewhere
    tracker.scalars(it, {"train/loss": 0.31, "train/lr": 1e-4})
    tracker.image(it, "samples", grid)          # [C, H, W] or a batch [N, C, H, W], values in [0, 1]
    tracker.close()

Settings: `log.tensorboard` (default on), `log.wandb` (default off), `log.wandb_project`,
`log.wandb_entity` (ayt.config.LogConfig). Watch a run live with `tensorboard --logdir runs`.

Layout of a run directory:
    <run>/tb/train/   the training loop: train/<every logged quantity> (loss, lr, it_per_s, time_s,
                      the objective's statistics such as the feature distance), eval_hook/<metric>_1step
                      (the in-training evaluation), and the image `samples` when the loop writes a grid;
    <run>/tb/eval/    `python -m ayt eval`: eval/<metric>_<sampler> (mean over sampling runs) and the
                      extras (eval/precision_1step, ...), at the checkpoint's iteration.

Resume. A run that resumes from the checkpoint of iteration k writes a new event file that starts with
a purge marker at k + 1 (SummaryWriter(purge_step=k + 1); steps count completed iterations, and what
was logged at k itself is kept, as in metrics.jsonl): TensorBoard drops the earlier files' events from
k + 1 on, so the steps logged twice (between the checkpoint and the interruption) appear once. `ayt eval` writes its records the same way: a purge marker at the
lowest iteration it evaluated, then every evaluation record of results.json from there on, so the
eval/ curves equal results.json however often checkpoints are re-evaluated. W&B keeps one run per
run directory (its id is stored in <run>/wandb_id); steps W&B has already seen are not logged again
after a resume (W&B refuses decreasing steps), and evaluation records use `eval/iteration` as their x-axis.
"""
from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from .config import ConfigError, LogConfig, TrainConfig, to_dict

TB_DIR = "tb"
JOBS = ("train", "eval")


class Tracker:
    """The interface (and the tracker that does nothing: other ranks, everything switched off)."""

    def scalars(self, it: int, values: dict[str, float]) -> None:
        """Log {tag: value} at iteration `it`."""

    def image(self, it: int, name: str, image: torch.Tensor) -> None:
        """Log an image [C, H, W] or a batch [N, C, H, W] (tiled into a grid), values in [0, 1]."""

    def close(self) -> None:
        """Flush and close."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_grid(image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] in [0, 1] from an image [C, H, W] or a batch [N, C, H, W] (square-ish grid)."""
    image = image.detach().float().cpu()
    if image.ndim == 4:
        import torchvision
        image = torchvision.utils.make_grid(image, nrow=max(1, int(image.shape[0] ** 0.5)), padding=1)
    if image.ndim != 3:
        raise ValueError(f"expected an image [C, H, W] or a batch [N, C, H, W], got {tuple(image.shape)}")
    return image.clamp(0, 1)


def _finite_floats(values: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


class TensorBoardTracker(Tracker):
    """Event files under `log_dir` (torch.utils.tensorboard.SummaryWriter). purge_step: see the module
    docstring; flushed after every call so a live TensorBoard sees each record at once."""

    def __init__(self, log_dir, purge_step: Optional[int] = None):
        self.writer = summary_writer_class()(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)

    def scalars(self, it: int, values: dict[str, float]) -> None:
        for k, v in _finite_floats(values).items():
            self.writer.add_scalar(k, v, it)
        self.writer.flush()

    def image(self, it: int, name: str, image: torch.Tensor) -> None:
        self.writer.add_image(name, as_grid(image), it, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """One W&B run per run directory (resumed when the directory is resumed or evaluated).
    step_metric: log `{step_metric: it, ...}` instead of W&B's own step (jobs after training, whose
    iterations W&B has already passed)."""

    def __init__(self, log: LogConfig, run_dir, config: dict, name: str, step_metric: Optional[str] = None):
        wandb = wandb_module()
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        if not id_file.exists():
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id + "\n")
        self.wandb, self.step_metric = wandb, step_metric
        self.run = wandb.init(project=log.wandb_project, entity=log.wandb_entity, name=name, id=run_id,
                              resume="allow", dir=str(run_dir), config=config)
        if step_metric:
            self.run.define_metric(step_metric)
            self.run.define_metric(step_metric.split("/")[0] + "/*", step_metric=step_metric)

    def _log(self, it: int, data: dict) -> None:
        if self.step_metric:
            self.run.log({self.step_metric: it, **data})
        else:
            self.run.log(data, step=it)

    def scalars(self, it: int, values: dict[str, float]) -> None:
        self._log(it, _finite_floats(values))

    def image(self, it: int, name: str, image: torch.Tensor) -> None:
        grid = (as_grid(image).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        self._log(it, {name: self.wandb.Image(grid)})

    def close(self) -> None:
        self.run.finish()


class Trackers(Tracker):
    """Several trackers as one."""

    def __init__(self, trackers: Sequence[Tracker]):
        self.trackers = list(trackers)

    def scalars(self, it: int, values: dict[str, float]) -> None:
        for t in self.trackers:
            t.scalars(it, values)

    def image(self, it: int, name: str, image: torch.Tensor) -> None:
        for t in self.trackers:
            t.image(it, name, image)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


# ----------------------------------------------------------------------------------------------
# Optional dependencies: a clear message before any work starts.

def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("log.tensorboard=true writes TensorBoard event files and needs the tensorboard package: "
                          "pip install tensorboard (or pip install -e '.[tensorboard]'), or set "
                          f"log.tensorboard=false ({e})") from None
    return SummaryWriter


def wandb_module():
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb=true needs the wandb package: pip install wandb (then `wandb login`), "
                          "or set log.wandb=false") from None
    return wandb


def check_available(log: LogConfig) -> None:
    """Raise ConfigError now if a switched-on tracker's package is missing."""
    if log.tensorboard:
        summary_writer_class()
    if log.wandb:
        wandb_module()


def open_tracker(cfg: TrainConfig, run_dir, job: str = "train", purge_step: Optional[int] = None,
                 enabled: bool = True) -> Tracker:
    """The trackers cfg.log switches on for one job ('train' or 'eval') of the run in `run_dir`;
    a no-op Tracker when `enabled` is False (ranks other than 0) or nothing is switched on."""
    if job not in JOBS:
        raise ValueError(f"job must be one of {JOBS}, got {job!r}")
    if not enabled:
        return Tracker()
    check_available(cfg.log)
    out: list[Tracker] = []
    if cfg.log.tensorboard:
        out.append(TensorBoardTracker(Path(run_dir) / TB_DIR / job, purge_step=purge_step))
    if cfg.log.wandb:
        out.append(WandbTracker(cfg.log, run_dir, to_dict(cfg), cfg.name or Path(run_dir).name,
                                step_metric="eval/iteration" if job == "eval" else None))
    return out[0] if len(out) == 1 else Trackers(out) if out else Tracker()


# ----------------------------------------------------------------------------------------------
# What the jobs log

def train_scalars(record: dict) -> dict[str, float]:
    """Tags of one metrics.jsonl record of the loop: train/<key>, and eval_hook/<metric>_1step for the
    in-training evaluation (keys eval_<metric>_1step)."""
    out = {}
    for k, v in record.items():
        if k == "iteration":
            continue
        out[f"eval_hook/{k[len('eval_'):]}" if k.startswith("eval_") else f"train/{k}"] = v
    return _finite_floats(out)


def eval_scalars(records: Iterable[dict]) -> dict[int, dict[str, float]]:
    """{iteration: {tag: value}} from ayt.evaluate records: eval/<metric>_<sampler> (the mean over
    sampling runs) and eval/<extra>_<sampler>; of several records of one (iteration, sampler, metric),
    the one with the most samples (as ayt.plotting.eval_curve)."""
    best: dict[tuple, dict] = {}
    for r in records:
        key = (int(r["iteration"]), r["sampler"], r["metric"])
        if key not in best or r["n"] > best[key]["n"]:
            best[key] = r
    out: dict[int, dict[str, float]] = {}
    for (it, sampler, metric), r in sorted(best.items()):
        for k, v in r.items():
            if isinstance(v, dict) and "mean" in v:
                name = metric if k == metric.lstrip("d") and metric.startswith("d") else k
                out.setdefault(it, {})[f"eval/{name}_{sampler}"] = float(v["mean"])
    return out


def log_eval_records(tracker: Tracker, results_path, start: int, stop: Optional[int] = None) -> None:
    """Log the evaluation records of results.json with start <= iteration < stop (stop None: no bound),
    in iteration order. A job that opened its tracker with purge_step = its first evaluated iteration
    and logs consecutive ranges leaves curves equal to results.json (module docstring)."""
    if type(tracker) is Tracker:
        return
    path = Path(results_path)
    records = json.loads(path.read_text()).get("eval", []) if path.exists() else []
    chosen = (r for r in records if int(r["iteration"]) >= start and (stop is None or int(r["iteration"]) < stop))
    for it, values in eval_scalars(chosen).items():
        tracker.scalars(it, values)
