"""Evaluating runs: FID (Inception, pytorch-fid compatible), FD_eval (Frechet distance in the features of
an independent evaluator network trained on the run's data, never the MFD network) or SWD (ProGAN's
multi-scale sliced Wasserstein distance; no network at all); 1- and 2-step sampling over K sampling
runs (mean, std, min), dFID (d + the metric), and small-scale extras (precision/recall, SWD, distance to
the shapes manifold).

    python -m ayt eval runs/<name> [--metric auto|fid|fd_eval|swd] [--checkpoints all|latest|10000,20000] ...

`--metric auto` (the default) picks FID when the Inception weights are on disk (nothing is downloaded to
decide), else FD_eval when the run's data has labels (or is the shapes data), else SWD, and prints one
line saying which and why (`choose_metric`). Results are appended to runs/<name>/results.json under
"eval" (one record per checkpoint, metric, sampler); the same record goes to the returned list.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import checkpoint as ck
from . import fid
from .config import TrainConfig
from .progress import Progress, counting
from .runs import build_dataset, load_run_model
from .sampling import batch_seed, denoise_batch, sampler

METRICS = ("auto", "fid", "fd_eval", "swd")
METRIC_NAMES = {"fid": "FID", "fd_eval": "FD_eval", "swd": "SWD"}
# FD_eval fits a Gaussian to the evaluator's 128-d features: its covariance needs clearly more images
# than dimensions, so the training and reference sets need at least twice the feature width.
MIN_EVALUATOR_IMAGES = 256
PHOTO_EVALUATOR_IMAGES = 20000  # photos: training crops for the classifier (a separate draw, seed + 10000)


@dataclasses.dataclass
class EvalConfig:
    metric: str = "auto"             # auto | fid | fd_eval | swd (auto: FID with Inception weights, else FD_eval on labelled data, else SWD)
    n: int = 50000                   # samples per sampling run (docs/method.md section 5.2: 50k)
    runs: int = 3                    # sampling runs per checkpoint (docs/method.md section 5.2: 3)
    steps: tuple = (1, 2)            # consistency sampling steps to evaluate
    dfid_sigmas: tuple = (0.2, 0.4, 0.8)  # one-step denoising FID at these sigmas; () disables
    batch: int = 500
    seed: int = 0
    ref: Optional[str] = None        # FID reference statistics .npz (mu, sigma); default: computed from the run's data
    ref_images: int = 50000          # real images for computed reference statistics / FD_eval reference features
    inception: Optional[str] = None  # Inception weights file (else $AYT_INCEPTION_WEIGHTS / torch hub cache)
    evaluator: Optional[str] = None  # FD_eval evaluator file (default: trained once and cached under data/evaluators)
    evaluator_steps: int = 3000      # training steps of a new FD_eval evaluator
    swd_images: int = 8192           # SWD: at most this many images per set (ProGAN: 8192)
    extras: bool = True              # fd_eval: precision/recall, SWD, manifold error (shapes)
    device: Optional[str] = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; expected one of {METRICS}")
        if self.n < 2 or self.runs < 1:
            raise ValueError("n must be >= 2 and runs >= 1")
        if self.swd_images < 1 or self.evaluator_steps < 0:
            raise ValueError("swd_images must be >= 1 and evaluator_steps >= 0")


# ----------------------------------------------------------------------------------------------
# Which data an evaluator learns from, which real images are the reference, and which metric.

def _data_variant(cfg: TrainConfig, **changes) -> TrainConfig:
    """A copy of cfg whose data settings are changed (e.g. split='test')."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))


def _n_classes(dataset) -> int:
    ci = getattr(dataset, "class_index", None)
    return 0 if ci is None or ci.numel() == 0 else int(ci.unique().numel())


def _label_source(cfg: TrainConfig, dataset) -> str:
    """Words for the labels the classifier learns."""
    d = cfg.data
    if d.name == "photos":
        return "photos source ids"
    if d.name in ("folder", "zip"):
        how = "class subfolders" if getattr(dataset, "class_names", None) else "dataset.json labels"
        return f"the {how} of {d.root}"
    return f"{d.name} class labels"


def fd_eval_support(cfg: TrainConfig, dataset) -> tuple[bool, str]:
    """(True, what the evaluator is) when FD_eval can be computed on this run's data, else (False, why not).

    Shapes: the regression evaluator. Otherwise the data needs class labels (photos source ids, class
    subfolders or dataset.json labels of a folder/zip, MNIST/CIFAR-10 classes), at least 2 classes and at
    least MIN_EVALUATOR_IMAGES images."""
    if cfg.data.name == "shapes":
        return True, "shapes evaluator regressing the generating parameters"
    if cfg.data.name == "disk":
        return False, "the disk data are points, not images"
    k = _n_classes(dataset)
    if k == 0:
        hint = (" (set data.labels=folders for class subfolders, or add EDM's dataset.json)"
                if cfg.data.name in ("folder", "zip") else "")
        return False, f"the {cfg.data.name} data at {cfg.data.root} has no class labels{hint}"
    if k < 2:
        return False, f"the {cfg.data.name} data has a single class (a classifier evaluator needs at least 2)"
    if len(dataset) < MIN_EVALUATOR_IMAGES:
        return False, (f"the {cfg.data.name} data has {len(dataset)} labelled images; the FD_eval evaluator "
                       f"needs at least {MIN_EVALUATOR_IMAGES}")
    return True, f"classifier evaluator on {_label_source(cfg, dataset)}, {k} classes"


def choose_metric(cfg: TrainConfig, ecfg: EvalConfig, dataset) -> tuple[str, str]:
    """(metric, the one line that says which metric is reported and why).

    auto: FID when the Inception weights are found (``fid._resolve_weights`` without downloading),
    else FD_eval when ``fd_eval_support``, else SWD. An explicit metric is checked instead: fd_eval on
    data that cannot support it raises ValueError before anything is trained or sampled."""
    if ecfg.metric == "fid":
        return "fid", "metric: FID (requested with --metric fid)"
    ok, what = fd_eval_support(cfg, dataset)
    if ecfg.metric == "fd_eval":
        if not ok:
            raise ValueError(f"--metric fd_eval is not possible here: {what}. Use --metric swd (no labels, no "
                             f"training needed) or --metric fid (Inception weights).")
        return "fd_eval", f"metric: FD_eval ({what}; requested with --metric fd_eval)"
    if ecfg.metric == "swd":
        return "swd", "metric: SWD (multi-scale sliced Wasserstein over Laplacian-pyramid patches; requested with --metric swd)"
    try:  # auto
        path = fid._resolve_weights(ecfg.inception, download=False)
        return "fid", f"metric: FID because the Inception weights were found at {path}"
    except fid.WeightsNotFoundError:
        if ecfg.inception is not None:
            raise
    env = os.environ.get(fid.WEIGHTS_ENV_VAR)
    where = (f"${fid.WEIGHTS_ENV_VAR}={env} is not a file and nothing is at {fid.default_weights_path()}" if env
             else f"no Inception weights were found at {fid.default_weights_path()}")
    if ok:
        return "fd_eval", f"metric: FD_eval ({what}) because {where}; pass --inception FILE for FID"
    return "swd", (f"metric: SWD (multi-scale sliced Wasserstein over Laplacian-pyramid patches, no network) because "
                   f"{where} and FD_eval is not possible: {what}; pass --inception FILE for FID")


def reference_dataset(cfg: TrainConfig, train_dataset) -> tuple[object, str]:
    """The real images FD_eval and SWD compare with: the held-out split where the dataset has one
    (photos: the held-out strip, same size and seed as the training crops; cifar10 / mnist /
    fashion-mnist: the test set), else the training data itself. Returns (dataset, description)."""
    from .data import SPLIT_DATASETS
    if cfg.data.name in SPLIT_DATASETS and cfg.data.split == "train":
        return build_dataset(_data_variant(cfg, split="test")), f"{cfg.data.name} test split"
    return train_dataset, f"{cfg.data.name} {cfg.data.split} split" + (
        " (the training data: no held-out split)" if cfg.data.name not in SPLIT_DATASETS else "")


def evaluator_path(cfg: TrainConfig, dataset) -> Path:
    """Where the FD_eval evaluator of this run's data is cached: ``<data root>/evaluators/<key>.pt`` with
    a key naming the dataset, resolution and everything else that defines its training data."""
    from .data import default_data_root, photo_cache_key
    d = cfg.data
    base = Path(default_data_root()) / "evaluators"
    if d.name == "shapes":
        return base / f"shapes-{d.resolution}px-seed0.pt"
    if d.name == "photos":  # photo_cache_key hashes the photograph set and the scikit-image version
        key = photo_cache_key("train", d.resolution, d.photo_downscale, PHOTO_EVALUATOR_IMAGES, d.seed + 10_000)
        return base / f"photos-{d.resolution}px-down{d.photo_downscale:g}-seed{d.seed}-{key.rsplit('-', 1)[1]}.pt"
    ident = {"root": os.path.abspath(d.root) if d.root else None, "resize": d.resize, "labels": d.labels}
    if d.name in ("folder", "zip"):  # the file list and sizes: a changed folder gets a new evaluator
        ident["files"] = hashlib.sha1("\n".join(dataset.image_names).encode()).hexdigest()
        ident["n"] = len(dataset)
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
    stem = Path(d.root).stem if d.name in ("folder", "zip") and d.root else d.name
    return base / f"{d.name}-{stem}-{d.resolution}px-{digest}.pt" if d.name in ("folder", "zip") \
        else base / f"{d.name}-{d.resolution}px-{digest}.pt"


def _uint8_images(dataset, indices: Optional[torch.Tensor] = None, chunk: int = 1024) -> torch.Tensor:
    """Images of a dataset as uint8 [N, C, R, R] (exact for data stored as uint8), in chunks."""
    if indices is None and hasattr(dataset, "images") and dataset.images.dtype == torch.uint8:
        return dataset.images
    idx = torch.arange(len(dataset)) if indices is None else indices
    out = []
    for i in range(0, len(idx), chunk):
        out.append(fid.quantize(torch.stack([dataset[int(j)][0] for j in idx[i:i + chunk]])))
    return torch.cat(out)


def shapes_evaluator(resolution: int, path: Optional[str] = None, device="cpu", steps: int = 3000,
                     seed: int = 0):
    """The independent evaluator for the shapes data: a small CNN that regresses each image's
    generating parameters (ayt.metrics.ShapesEvaluator), trained once on a separate shapes set
    (seed 10_000 + seed) and cached; never the MFD feature network."""
    from .data import default_data_root, make_shapes
    from .metrics import ShapesEvaluator, load_evaluator, train_evaluator
    path = Path(path or Path(default_data_root()) / "evaluators" / f"shapes-{resolution}px-seed{seed}.pt")
    if path.exists():
        ev = load_evaluator(path)
        if not isinstance(ev, ShapesEvaluator):
            raise ValueError(f"{path} is a {type(ev).__name__}, not a shapes evaluator")
        return ev.to(device).eval()
    print(f"[eval] training the shapes evaluator once ({steps} steps on 20,000 images), cached at {path}",
          flush=True)
    images, params = make_shapes(20000, resolution, seed=10_000 + seed)
    ev = train_evaluator(images, params, steps=steps, batch_size=128, lr=1e-3, seed=seed, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    ev.save(path)
    return ev.eval()


def classifier_evaluator(cfg: TrainConfig, dataset, path: Optional[str] = None, device="cpu", steps: int = 3000,
                         ref_dataset=None, seed: int = 0):
    """The FD_eval evaluator of labelled data: a small classifier CNN (ayt.metrics.ClassifierEvaluator)
    trained once on the training split and cached at ``path`` (default ``evaluator_path``).

    photos: 20,000 training-split crops drawn separately (seed data.seed + 10000), so the evaluator
    does not depend on data.num_images; other data: the run's training data (all of it). Prints its
    accuracy on up to 2,000 images of ``ref_dataset`` (held-out where there is a split) when trained."""
    from .data import PhotoCropsDataset
    from .metrics import ClassifierEvaluator, classifier_accuracy, load_evaluator, train_evaluator
    ok, what = fd_eval_support(cfg, dataset)
    if not ok:
        raise ValueError(f"no FD_eval evaluator for this data: {what}")
    path = Path(path) if path else evaluator_path(cfg, dataset)
    if path.exists():
        ev = load_evaluator(path)
        if not isinstance(ev, ClassifierEvaluator):
            raise ValueError(f"{path} is a {type(ev).__name__}, not a classifier evaluator for {cfg.data.name}")
        return ev.to(device).eval()
    d = cfg.data
    train_ds = dataset
    if d.name == "photos":
        train_ds = PhotoCropsDataset(d.root, "train", d.resolution, PHOTO_EVALUATOR_IMAGES, d.seed + 10_000,
                                     d.photo_downscale)
    images, labels = _uint8_images(train_ds), train_ds.class_index
    print(f"[evaluator] training a classifier on {len(images)} images ({what}) for {steps} steps -> {path}",
          flush=True)
    ev = train_evaluator(images, labels, steps=steps, batch_size=128, lr=1e-3, seed=seed, device=device)
    check = ref_dataset if ref_dataset is not None else train_ds
    idx = torch.randperm(len(check), generator=torch.Generator().manual_seed(seed))[:2000]
    acc = classifier_accuracy(ev, _uint8_images(check, idx), check.class_index[idx])
    held_out = check is not train_ds and check is not dataset
    ev.meta = {"data": dataclasses.asdict(d), "classes": what, "steps": steps, "train_images": len(images),
               "accuracy": acc, "accuracy_on": "held-out split" if held_out else "training data"}
    print(f"[evaluator] accuracy {acc:.3f} on {len(idx)} {'held-out' if held_out else 'training'} images", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    ev.save(tmp)
    os.replace(tmp, path)
    return ev.eval()


class FeatureSpace:
    """The chosen metric on one run's data: features of quantised images and reference statistics.

    ``FeatureSpace(cfg, ecfg, device)``; ``space.score(sample_fn, n)`` -> {metric: value, extras...};
    ``space.metric`` ('fid' | 'fd_eval' | 'swd'), ``space.reason`` (the line saying which and why),
    ``space.ref_note`` (which real images are the reference). ``dataset`` (optional) is the run's training
    data when the caller has it already; ``log`` (optional) gets the reason line as soon as the metric is
    chosen (before an evaluator is trained or reference features are computed).
    """

    def __init__(self, cfg: TrainConfig, ecfg: EvalConfig, device, dataset=None,
                 log: Optional[Callable[[str], None]] = None):
        self.cfg, self.ecfg, self.device = cfg, ecfg, device
        self.dataset = dataset if dataset is not None else build_dataset(cfg)  # training data (dFID, FID ref)
        self.metric, self.reason = choose_metric(cfg, ecfg, self.dataset)
        if log is not None:
            log(self.reason)
        self.ref_feats = None
        self._swd_real: dict[int, torch.Tensor] = {}
        if self.metric == "fid":
            self.feature_fn = fid.load_inception(ecfg.inception, device=device)
            n_ref = min(ecfg.ref_images, len(self.dataset))
            if ecfg.ref is not None:
                self.mu, self.sigma = fid.load_stats(ecfg.ref, dim=self.feature_dim(cfg))  # before any sample
                self.ref_note = f"--ref {ecfg.ref}"
            else:
                cache = Path(f"data/fid-refs/{cfg.data.name}-{cfg.data.resolution}px-{n_ref}.npz")
                self.mu, self.sigma = fid.reference_stats(self._real(n_ref, self.dataset), cache, self.feature_fn,
                                                          ecfg.batch, device)
                self.ref_note = f"{cfg.data.name} {cfg.data.split} split, {n_ref} images"
            return
        self.ref_dataset, ref_words = reference_dataset(cfg, self.dataset)
        if self.metric == "swd":
            if ecfg.ref is not None:
                raise ValueError(f"--ref {ecfg.ref}: reference statistics apply to FID and FD_eval, not to SWD "
                                 f"(it compares with real images: {ref_words})")
            self.ref_note = f"{ref_words}, up to {min(ecfg.swd_images, len(self.ref_dataset))} images"
            return
        if cfg.data.name == "shapes":
            self.evaluator = shapes_evaluator(cfg.data.resolution, ecfg.evaluator, device, steps=ecfg.evaluator_steps)
        else:
            ok, what = fd_eval_support(cfg, self.ref_dataset)
            if not ok:
                raise ValueError(f"FD_eval reference ({ref_words}): {what}")
            self.evaluator = classifier_evaluator(cfg, self.dataset, ecfg.evaluator, device, ecfg.evaluator_steps,
                                                  self.ref_dataset)
        self.feature_fn = lambda x: self.evaluator.features(x)
        if ecfg.ref is not None:  # reference statistics in the evaluator's space, checked before any sample
            self.mu, self.sigma = fid.load_stats(ecfg.ref, dim=self.feature_dim(cfg))
        n_ref = min(ecfg.ref_images, len(self.ref_dataset))
        self.ref_feats = self.features(self._real(n_ref, self.ref_dataset), desc="[eval] reference features")
        if ecfg.ref is None:
            f = self.ref_feats.double()
            self.mu, self.sigma = f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False)
            self.ref_note = f"{ref_words}, {n_ref} images"
        else:  # precision/recall still compare with real images
            self.ref_note = f"--ref {ecfg.ref} (precision/recall: {ref_words}, {n_ref} images)"

    def feature_dim(self, cfg: TrainConfig) -> int:
        """Width of this metric's features (Inception pool3: 2048), from one forward of a blank image."""
        c = self.dataset[0][0].shape[0]
        return int(self.features(torch.zeros(1, c, cfg.data.resolution, cfg.data.resolution)).shape[-1])

    def _real(self, n: int, dataset=None) -> torch.Tensor:
        """n real images (float [-1, 1]) drawn without replacement with the evaluation seed."""
        ds = self.ref_dataset if dataset is None else dataset
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.ecfg.seed))[:n]
        return torch.stack([ds[int(i)][0] for i in idx])

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

    def swd(self, images: torch.Tensor) -> dict:
        """ProGAN's multi-scale SWD (x 1e3) of generated images against the reference images: the same
        m = min(len(images), len(reference), swd_images) real images for every call; keys 'swd' (mean over
        levels) and 'swd_<R>px' per pyramid level."""
        from .metrics import swd_multiscale
        m = min(images.shape[0], len(self.ref_dataset), self.ecfg.swd_images)
        if m not in self._swd_real:  # the same real set for every checkpoint and sampling run
            self._swd_real[m] = fid.quantize(self._real(m))
        res = swd_multiscale(self._swd_real[m], fid.quantize(images[:m]),
                             generator=torch.Generator().manual_seed(self.ecfg.seed))
        return {"swd": res["mean"], **{f"swd_{r}px": v for r, v in res["levels"].items()}}

    def score(self, sample_fn: Callable[[int, int], torch.Tensor], n: int, extras: Optional[bool] = None) -> dict:
        """Distance of n samples to the reference: {metric: value}, plus for fd_eval (when ``extras``,
        default ``ecfg.extras``) precision, recall, swd, swd_<R>px and, on the shapes, manifold_error.
        ``sample_fn(batch_index, size)`` -> images float [size, C, R, R] in [-1, 1]."""
        extras = self.ecfg.extras if extras is None else extras
        if self.metric == "fid":
            return {"fid": fid.fid_from_generator(sample_fn, n, self.ecfg.batch, self.mu, self.sigma,
                                                  self.feature_fn, self.device)}
        b = self.ecfg.batch
        images = torch.cat([sample_fn(i, min(b, n - i * b)).cpu() for i in range((n + b - 1) // b)])
        if self.metric == "swd":
            return self.swd(images)
        from .metrics import precision_recall, shapes_manifold_error
        feats = self.features(images)
        f = feats.double()
        out = {"fd_eval": fid.frechet_distance(f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False), self.mu, self.sigma)}
        if extras:
            p, r = precision_recall(self.ref_feats[:n * 2], feats, k=3)
            out.update(precision=p, recall=r, **self.swd(images))
            if self.cfg.data.name == "shapes":
                out["manifold_error"] = float(shapes_manifold_error(images[:500].to(self.device), self.evaluator))
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

    def score(sample_fn, what: str, k: int, extras: Optional[bool] = None) -> dict:
        if bar is not None:
            bar.note(f"it {it} {what} run {k + 1}/{ecfg.runs}")
            sample_fn = counting(sample_fn, bar, world)
        return space.score(sample_fn, ecfg.n, extras)
    samplers = ["heun18"] if cfg.stage == "diffusion" else [f"{s}step" for s in ecfg.steps]
    for name in samplers:
        steps = 1 if name == "heun18" else int(name[0])
        t0 = time.time()
        per_run = [score(sampler(net, cfg.stage, C, R, L, ecfg.seed + 1000 * k, device, steps), name, k)
                   for k in range(ecfg.runs)]
        rec = {"iteration": it, "sampler": name, "n": ecfg.n, "metric": space.metric, "ref": space.ref_note,
               "seconds": round(time.time() - t0, 1)}
        for key in per_run[0]:
            rec[key] = _summary([r[key] for r in per_run])
        records.append(rec)
    if cfg.stage == "consistency":
        for sigma in ecfg.dfid_sigmas:
            rec = {"iteration": it, "sampler": f"denoise@{sigma}", "n": ecfg.n, "metric": "d" + space.metric,
                   "ref": space.ref_note}
            vals = [score(_denoiser(net, space, float(sigma), ecfg.seed + 1000 * k, device), f"dFID@{sigma}", k,
                          extras=False)[space.metric] for k in range(ecfg.runs)]
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
    space = FeatureSpace(cfg, ecfg, device, log=lambda reason: log(f"[eval] {run_dir.name}: {reason}"))
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


def make_eval_hook(cfg: TrainConfig, n: Optional[int] = None, dataset=None) -> Callable:
    """The in-training evaluation: the 1-step metric (auto, no extras) of the EMA network on
    cfg.eval_samples samples. The metric is chosen now (``hook.reason`` says which and why); the
    feature space (and an FD_eval evaluator, if one must be trained) is built at the first call."""
    ecfg = EvalConfig(n=n or cfg.eval_samples, runs=1, steps=(1,), dfid_sigmas=(), extras=False, device=cfg.device)
    dataset = dataset if dataset is not None else build_dataset(cfg)
    state: dict = {}

    def hook(ema, it: int, run_dir) -> dict:
        device = next(ema.parameters()).device
        if "space" not in state:
            state["space"] = FeatureSpace(cfg, ecfg, device, dataset=dataset)
        space = state["space"]
        was = ema.training
        with Progress(ecfg.n, f"[{cfg.name} eval hook it {it}]", "img") as bar:
            fn = sampler(ema.eval(), cfg.stage, ema.img_channels, cfg.data.resolution, ema.label_dim, ecfg.seed,
                         device, 1)
            res = space.score(counting(fn, bar), ecfg.n)
        ema.train(was)
        return {f"eval_{k}_1step": v for k, v in res.items()}

    hook.metric, hook.reason = choose_metric(cfg, ecfg, dataset)
    return hook
