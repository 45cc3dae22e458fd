"""Evaluating runs: FID (Inception, pytorch-fid compatible) or, for the built-in shapes data, FD_eval
(Frechet distance in the features of an independent evaluator network), 1- and 2-step sampling over
K sampling runs (mean, std, min), dFID, and small-scale metrics (precision/recall, sliced
Wasserstein in pixels, distance to the shapes manifold).

    python -m ayt eval runs/<name> [--checkpoints all|latest|10000,20000] [--n 50000 --runs 3] ...

Results are appended to runs/<name>/results.json under "eval" (one record per checkpoint,
metric, sampler); the same record goes to the returned list.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import checkpoint as ck
from . import fid
from .config import TrainConfig
from .progress import Progress, counting
from .sampling import batch_seed, denoise_batch, sampler

METRICS = ("auto", "fid", "fd_eval")


@dataclasses.dataclass
class EvalConfig:
    metric: str = "auto"             # fid | fd_eval | auto (fd_eval on the built-in shapes, fid otherwise)
    n: int = 50000                   # samples per sampling run (docs/method.md section 5.2: 50k)
    runs: int = 3                    # sampling runs per checkpoint (docs/method.md section 5.2: 3)
    steps: tuple = (1, 2)            # consistency sampling steps to evaluate
    dfid_sigmas: tuple = (0.2, 0.4, 0.8)  # one-step denoising FID at these sigmas; () disables
    batch: int = 500
    seed: int = 0
    ref: Optional[str] = None        # reference statistics .npz (mu, sigma); default: computed from the run's data
    ref_images: int = 50000          # images for computed reference statistics
    inception: Optional[str] = None  # Inception weights file (else $AYT_INCEPTION_WEIGHTS / torch hub cache)
    evaluator: Optional[str] = None  # shapes evaluator file (default: trained once and cached under data/)
    extras: bool = True              # fd_eval: precision/recall, sliced Wasserstein, manifold error
    device: Optional[str] = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        if self.n < 2 or self.runs < 1:
            raise ValueError("n must be >= 2 and runs >= 1")


# ----------------------------------------------------------------------------------------------
# Feature backends: (feature_fn on quantised images, reference mu/sigma, reference features or None)

def shapes_evaluator(resolution: int, path: Optional[str] = None, device="cpu", steps: int = 3000,
                     seed: int = 0):
    """The independent evaluator for the shapes data: a small CNN that regresses each image's
    generating parameters (ayt.metrics.ShapesEvaluator), trained once on a separate shapes set
    (seed 10_000 + seed) and cached; never the MFD feature network."""
    from .data import make_shapes
    from .metrics import ShapesEvaluator, train_evaluator
    path = Path(path or f"data/evaluators/shapes-{resolution}px-seed{seed}.pt")
    if path.exists():
        return ShapesEvaluator.load(path).to(device).eval()
    print(f"[eval] training the shapes evaluator once ({steps} steps on 20,000 images), cached at {path}",
          flush=True)
    images, params = make_shapes(20000, resolution, seed=10_000 + seed)
    ev = train_evaluator(images, params, steps=steps, batch_size=128, lr=1e-3, seed=seed, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    ev.save(path)
    return ev.eval()


class FeatureSpace:
    """Features of quantised images plus the reference statistics of the run's data."""

    def __init__(self, cfg: TrainConfig, ecfg: EvalConfig, device):
        from .train import build_dataset
        self.cfg, self.ecfg, self.device = cfg, ecfg, device
        metric = ecfg.metric
        if metric == "auto":
            metric = "fd_eval" if cfg.data.name == "shapes" else "fid"
        if metric == "fd_eval" and cfg.data.name != "shapes":
            raise ValueError("fd_eval uses the shapes evaluator and needs data.name=shapes; use metric=fid")
        self.metric = metric
        self.dataset = build_dataset(cfg)
        if metric == "fid":
            net = fid.load_inception(ecfg.inception, device=device)
            self.feature_fn = net
        else:
            self.evaluator = shapes_evaluator(cfg.data.resolution, ecfg.evaluator, device)
            self.feature_fn = lambda x: self.evaluator.features(x)
        self.ref_feats = None
        self._swd_real: dict[int, torch.Tensor] = {}
        n_ref = min(ecfg.ref_images, len(self.dataset))
        if ecfg.ref is not None:  # checked before any sample is drawn
            self.mu, self.sigma = fid.load_stats(ecfg.ref, dim=self.feature_dim(cfg))
        elif metric == "fid":
            cache = Path(f"data/fid-refs/{cfg.data.name}-{cfg.data.resolution}px-{n_ref}.npz")
            self.mu, self.sigma = fid.reference_stats(self._real(n_ref), cache, self.feature_fn, ecfg.batch, device)
        else:
            self.ref_feats = self.features(self._real(n_ref), desc="[eval] reference features")
            f = self.ref_feats.double()
            self.mu, self.sigma = f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False)

    def feature_dim(self, cfg: TrainConfig) -> int:
        """Width of this metric's features (Inception pool3: 2048), from one forward of a blank image."""
        c = self.dataset[0][0].shape[0]
        return int(self.features(torch.zeros(1, c, cfg.data.resolution, cfg.data.resolution)).shape[-1])

    def _real(self, n: int) -> torch.Tensor:
        idx = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.ecfg.seed))[:n]
        return torch.stack([self.dataset[int(i)][0] for i in idx])

    @torch.no_grad()
    def features(self, images: torch.Tensor, desc: Optional[str] = None) -> torch.Tensor:
        """Features [N, D] of images [N, C, H, W]; desc: report progress under this name."""
        out = []
        bar = Progress(images.shape[0], desc, "img") if desc else None
        for i in range(0, images.shape[0], self.ecfg.batch):
            x = fid.quantize(images[i:i + self.ecfg.batch].to(self.device))
            out.append(self.feature_fn(x).float().cpu())
            if bar is not None:
                bar.update(x.shape[0])
        if bar is not None:
            bar.close()
        return torch.cat(out)

    def score(self, sample_fn: Callable[[int, int], torch.Tensor], n: int) -> dict:
        """Distance of n samples to the reference (plus extras for fd_eval)."""
        if self.metric == "fid":
            return {"fid": fid.fid_from_generator(sample_fn, n, self.ecfg.batch, self.mu, self.sigma,
                                                  self.feature_fn, self.device)}
        from .metrics import precision_recall, shapes_manifold_error, sliced_wasserstein
        b = self.ecfg.batch
        images = torch.cat([sample_fn(i, min(b, n - i * b)).cpu() for i in range((n + b - 1) // b)])
        feats = self.features(images)
        f = feats.double()
        out = {"fd_eval": fid.frechet_distance(f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False), self.mu, self.sigma)}
        if self.ecfg.extras:
            m = min(n, len(self.dataset))
            if m not in self._swd_real:  # the same real set for every checkpoint and sampling run
                self._swd_real[m] = self._real(m)
            p, r = precision_recall(self.ref_feats[:n * 2], feats, k=3)
            out.update(precision=p, recall=r,
                       swd_pixels=float(sliced_wasserstein(self._swd_real[m], images, 128,
                                                           torch.Generator().manual_seed(0))),
                       manifold_error=float(shapes_manifold_error(images[:500].to(self.device), self.evaluator)))
        return out


# ----------------------------------------------------------------------------------------------

def _summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": float(a.min()),
            "runs": [float(v) for v in a]}


def samples_per_checkpoint(stage: str, ecfg: EvalConfig) -> int:
    """Images evaluate_checkpoint draws for a run of this stage (every sampler, run and dFID sigma)."""
    samplers = 1 if stage == "diffusion" else len(ecfg.steps) + len(ecfg.dfid_sigmas)
    return samplers * ecfg.runs * ecfg.n


def evaluate_checkpoint(path, ecfg: EvalConfig, space: Optional[FeatureSpace] = None,
                        bar: Optional[Progress] = None) -> list[dict]:
    """Records for one checkpoint: for each sampler (1-step, 2-step; Heun for diffusion runs) the
    metric over `runs` sampling runs, and dFID at each sigma (consistency runs). bar: counts the
    samples drawn (and their features extracted)."""
    from .train import load_run_model
    device = torch.device(ecfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, cfg, state = load_run_model(path, "ema", device)
    if cfg.stage == "feature":
        raise ValueError(f"{path} is a feature-network run; evaluate its R^2 in results.json instead")
    space = space or FeatureSpace(cfg, ecfg, device)
    C, R, L = state["img_channels"], cfg.data.resolution, state["label_dim"]
    it = int(state["iteration"])
    records = []
    # FID splits the batches across ranks (rank 0 draws 1/world of them); fd_eval draws all on each rank
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() and space.metric == "fid" else 1

    def score(sample_fn, what: str, k: int) -> dict:
        if bar is not None:
            bar.note(f"it {it} {what} run {k + 1}/{ecfg.runs}")
            sample_fn = counting(sample_fn, bar, world)
        return space.score(sample_fn, ecfg.n)
    samplers = ["heun18"] if cfg.stage == "diffusion" else [f"{s}step" for s in ecfg.steps]
    for name in samplers:
        steps = 1 if name == "heun18" else int(name[0])
        t0 = time.time()
        per_run = [score(sampler(net, cfg.stage, C, R, L, ecfg.seed + 1000 * k, device, steps), name, k)
                   for k in range(ecfg.runs)]
        rec = {"iteration": it, "sampler": name, "n": ecfg.n, "metric": space.metric,
               "seconds": round(time.time() - t0, 1)}
        for key in per_run[0]:
            rec[key] = _summary([r[key] for r in per_run])
        records.append(rec)
    if cfg.stage == "consistency":
        for sigma in ecfg.dfid_sigmas:
            rec = {"iteration": it, "sampler": f"denoise@{sigma}", "n": ecfg.n, "metric": "d" + space.metric}
            vals = [score(_denoiser(net, space, float(sigma), ecfg.seed + 1000 * k, device), f"dFID@{sigma}", k)
                    [space.metric] for k in range(ecfg.runs)]
            rec[space.metric] = _summary(vals)
            records.append(rec)
    return records


def _denoiser(net, space: FeatureSpace, sigma: float, seed: int, device):
    """sample_fn for dFID: one-step denoisings of x_0 + sigma eps, x_0 from the run's data."""
    ds = space.dataset
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))

    def fn(index: int, size: int) -> torch.Tensor:
        idx = order[(index * space.ecfg.batch + torch.arange(size)) % len(ds)]
        items = [ds[int(i)] for i in idx]
        x_0 = torch.stack([x for x, _ in items]).to(device)
        labels = torch.stack([y for _, y in items]).to(device) if items[0][1].numel() else None
        gen = torch.Generator(device).manual_seed(batch_seed(seed, index))
        return denoise_batch(net, x_0, sigma, gen, labels)
    return fn


def select_checkpoints(run_dir, which: str = "latest") -> list[Path]:
    """'latest', 'all', or comma-separated iterations, over the run's full checkpoints and EMA snapshots
    (`ayt.checkpoint.list_weights`). 'latest' is the newest readable one (unreadable newer files are
    moved aside with a warning)."""
    ckpts = ck.list_weights(run_dir, "ema")
    if not ckpts:
        raise ck.CheckpointError(f"{run_dir} holds no checkpoints")
    if which == "latest":
        return [ck.load_newest_readable(ckpts, f"run directory {run_dir}")[0]]
    if which == "all":
        return [p for _, p in ckpts]
    try:
        wanted = {int(x) for x in which.split(",")}
    except ValueError:
        raise ValueError(f"--checkpoints {which!r}: expected latest, all or comma-separated iterations") from None
    found = [p for it, p in ckpts if it in wanted]
    missing = wanted - {it for it, _ in ckpts}
    if missing:
        raise ck.CheckpointError(f"{run_dir} has no checkpoints at iterations {sorted(missing)}; "
                                 f"available: {[it for it, _ in ckpts]}")
    return found


def evaluate_run(run_dir, ecfg: EvalConfig, which: str = "latest", log: Callable = print,
                 track: bool = False) -> list[dict]:
    """Evaluate checkpoints of a run; append the records to results.json (rank 0). Progress goes to
    stderr (ayt.progress); track: also log the scores to the run's TensorBoard / W&B (ayt.tracking)."""
    from .config import from_dict
    from .tracking import Tracker, check_available, log_eval_records, open_tracker
    run_dir = Path(run_dir)
    paths = select_checkpoints(run_dir, which)
    cfg = from_dict(json.loads((run_dir / "config.json").read_text()))
    iteration_of = {p: it for it, p in ck.list_weights(run_dir, "ema")}  # checkpoints and snapshots
    its = [iteration_of[p] for p in paths]
    track = track and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0)
    if track:
        check_available(cfg.log)  # a missing tensorboard / wandb stops before any work
    tracker: Optional[Tracker] = None  # opened once the first records are in results.json
    device = torch.device(ecfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    space = FeatureSpace(cfg, ecfg, device)
    out = []
    with Progress(len(paths) * samples_per_checkpoint(cfg.stage, ecfg), f"[eval {run_dir.name}]", "img") as bar:
        say = bar.writer(log)
        for i, p in enumerate(paths):
            try:
                recs = evaluate_checkpoint(p, ecfg, space, bar)
            except ck.UnreadableCheckpointError as e:
                if which != "all":
                    raise
                ck.warn(f"{e}; moved it to {ck.move_aside(Path(p)).name}; skipping it")
                continue
            for r in recs:
                say(f"[eval] {run_dir.name} it {r['iteration']} {r['sampler']}: {r['metric']} "
                    f"{r[space.metric]['mean']:.4g} (min {r[space.metric]['min']:.4g}, {ecfg.runs} run(s) x {ecfg.n})")
            out.extend(recs)
            append_results(run_dir, recs)
            if track:  # this checkpoint's records and those up to the next evaluated one, in iteration order
                tracker = tracker or open_tracker(cfg, run_dir, "eval", purge_step=its[0])
                log_eval_records(tracker, run_dir / "results.json", its[i], its[i + 1] if i + 1 < len(its) else None)
    if tracker is not None:
        tracker.close()
    return out


def append_results(run_dir: Path, records: list[dict]) -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    key = lambda r: (r["iteration"], r["sampler"], r["metric"], r["n"])
    new = {key(r) for r in records}

    def update(results: dict) -> None:
        results["eval"] = [r for r in results.get("eval", []) if key(r) not in new] + records
        results["eval"].sort(key=lambda r: (r["iteration"], r["sampler"]))
    ck.update_json(Path(run_dir) / "results.json", update)  # under results.json.lock: training may write too


def make_eval_hook(cfg: TrainConfig, n: Optional[int] = None) -> Callable:
    """The in-training evaluation: 1-step metric of the EMA network on cfg.eval_samples samples."""
    ecfg = EvalConfig(n=n or cfg.eval_samples, runs=1, steps=(1,), dfid_sigmas=(), extras=False, device=cfg.device)
    state: dict = {}

    def hook(ema, it: int, run_dir) -> dict:
        device = next(ema.parameters()).device
        if "space" not in state:
            state["space"] = FeatureSpace(cfg, ecfg, device)
        space = state["space"]
        was = ema.training
        with Progress(ecfg.n, f"[{cfg.name} eval hook it {it}]", "img") as bar:
            fn = sampler(ema.eval(), cfg.stage, ema.img_channels, cfg.data.resolution, ema.label_dim, ecfg.seed,
                         device, 1)
            res = space.score(counting(fn, bar), ecfg.n)
        ema.train(was)
        return {f"eval_{k}_1step": v for k, v in res.items()}
    return hook
