"""Typed run configurations, named presets and `key=value` overrides.

A run is fully described by one `TrainConfig` (plus its seed): defaults are the paper's reference
settings (docs/method.md section 7); presets are named sets of overrides; the command line and notebooks add
dotted overrides (`optim.lr=5e-4`). Unknown keys, wrong types and impossible values raise
`ConfigError` before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration key, value or preset is invalid."""


@dataclass
class DataConfig:
    name: str = "cifar10"            # cifar10 | mnist | fashion-mnist | folder | zip | shapes | disk | photos
    root: Optional[str] = None       # folder: the image directory; zip: the .zip archive; others: data root (default ./data)
    resolution: int = 32             # image size R, a power of two >= 4 (photos: >= 8); checked against the data
    split: str = "train"             # train | test (held-out split: cifar10, mnist, fashion-mnist, photos)
    download: bool = False           # cifar10 / mnist / fashion-mnist: download when missing
    conditional: bool = False        # use class labels (one-hot) when the dataset has them
    labels: str = "auto"             # folder / zip: auto (dataset.json if present) | json | folders (class = top subfolder) | none
    resize: bool = False             # resize images of another size to R (antialiased; non-square ones centre-cropped first)
    skip_unreadable: bool = False    # folder / zip: skip unreadable files (printed count) instead of stopping
    num_images: int = 50000          # shapes / disk / photos: how many images to generate
    seed: int = 0                    # shapes / disk / photos: generator seed
    photo_downscale: float = 4.0     # photos: shrink each photograph by this factor (>= 1, antialiased) before cropping


@dataclass
class NetworkConfig:
    arch: str = "ddpmpp-cifar10"     # a name in ayt.networks.NETWORK_CONFIGS
    dropout: Optional[float] = None  # overrides the architecture's dropout when set
    init: Optional[str] = None       # consistency/diffusion init: run dir, ayt checkpoint, EDM .pkl or .pt


@dataclass
class ConsistencyConfig:
    """ECT and the AYT update (docs/method.md sections 2 and 4)."""
    mode: str = "mfd"                # ect | mfd | ect+mfd | lpips | ect+lpips  (AYT reference: mfd);
                                     # continuous time (group `continuous`): ccd | ccd-ayt | cct | cct-ayt
    P_mean: float = -1.1
    P_std: float = 2.0
    q: float = 256.0
    k: float = 8.0
    b: float = 1.0
    mapping: str = "sigmoid"         # sigmoid | const
    const_floor: Optional[float] = 1 / 256  # const mapping: decay = max(q^-(s+1), floor) as the AYT code; None: ECT's
    stage: int = 0                   # fixed stage s (AYT reference); start stage when double_every is set
    double_every: Optional[int] = None  # official ECT: increment s every N iterations (with q=2)
    c_mult: float = 0.0              # pseudo-Huber c = c_mult * sqrt(C*H*W); 0 gives the L2 norm
    weighting: str = "default"       # default = 1/(t-r) | sqrt | uniform | snr | karras
    lam: float = 1.0                 # weight of the direction term in ect+mfd / ect+lpips
    lam_ramp_iters: int = 5000       # linear ramp of lam over the first iterations
    mfd_eps: float = 1e-5            # e in the per-channel pseudo-Huber of MFD
    feature_net: Optional[str] = None   # trained feature net: feature run dir, ayt checkpoint or .pt state dict
    feature_arch: str = "vgg16"      # architecture of that feature net (ayt.features registry)
    feature_outputs: int = 15        # its regression-head width L


@dataclass
class ContinuousConfig:
    """Continuous-time modes ct.mode = ccd | ccd-ayt (distillation) | cct | cct-ayt (training), ayt.continuous.
    They use ct.P_mean / ct.P_std for t and, in the -ayt modes, ct.feature_net; defaults are the authors'
    CCD scripts (1202kbs/AYT scripts/train_cm/train_ccd*.py). sCM (Lu & Song 2024) stabilisers: its
    settings are tangent_norm=l2, tangent_warmup_iters=10000, adaptive_weighting=true."""
    teacher: Optional[str] = None    # ccd modes: diffusion run dir, ayt checkpoint, EDM .pkl or .pt (None: net.init)
    tangent_norm: str = "rms"        # rms: T / (||T||/sqrt(dim) + c) (authors) | l2: T / (||T|| + c) (sCM) | none
    tangent_c: float = 0.1           # c of the tangent normalisation
    weighting: str = "per-sample"    # per-sample: mean_b <Y_b, T_b> / t_b | batch-mean: train_ccd_ayt.py's broadcast
    jvp: str = "auto"                # auto (torch.func.jvp, double backward where unsupported) | func | double-backward
    tangent_warmup_iters: int = 0    # sCM tangent warm-up: network time-derivative term ramped 0 -> 1 (0: off)
    adaptive_weighting: bool = False  # sCM learned weighting e^w(t)/dim ||.||^2 - w(t), trained with the model


@dataclass
class DiagnosticConfig:
    """Live tangent diagnostic (ayt.diagnostic): the share of the update direction along the data manifold."""
    every: int = 0                   # evaluate every N iterations, logged with the metrics (0: off)
    basis: str = "auto"              # auto (exact on shapes / disk, else pca) | exact | pca | augment
    samples: int = 32                # probe images (a fixed seeded subset, fixed noise and noise levels)
    pca_reference: int = 2048        # pca: training images searched for neighbours
    pca_neighbors: int = 32          # pca: neighbours per probe
    pca_dim: int = 8                 # pca: tangent directions kept


@dataclass
class DiffusionConfig:
    """EDM denoising loss for diffusion pretraining (Karras et al. 2022)."""
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5


@dataclass
class FeatureConfig:
    """Manifold feature-network training (docs/method.md section 3)."""
    arch: str = "vgg16"              # ayt.features registry name
    aug_set: str = "geo_clr_deg"     # deg | geo | geo_deg | geo_clr | geo_clr_deg | vec (vector data)
    p: float = 0.15                  # per-transform probability after the ramp
    p_ramp_iters: int = 50000        # linear ramp of p from 0
    eval_images: int = 2048          # held-out images for the final per-label R^2
    objective: str = "augment"       # augment: regress augmentation labels | denoise: autoencoder (arch dae)
    sigma_max: float = 1.0           # denoise: sigma ~ U(0, sigma_max) (the authors' train_dae.py)
    c_mult: float = 0.0              # denoise: pseudo-Huber c = c_mult sqrt(dim) of the reconstruction (0: L2)
    sync_bn: bool = True             # DDP on GPUs: SyncBatchNorm, so BatchNorm sees the global batch (AYT: 1 GPU)


@dataclass
class OptimConfig:
    name: str = "radam"              # radam | adam
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_iters: int = 0            # linear learning-rate warm-up
    grad_clip: Optional[float] = None
    foreach: Optional[bool] = None   # multi-tensor optimiser step; None: torch's default (GPU yes, CPU no)


@dataclass
class LogConfig:
    """Live metrics beside metrics.jsonl (ayt.tracking); rank 0 only. They do not change the training,
    so they may differ when a run is resumed."""
    tensorboard: bool = True         # TensorBoard event files in <run>/tb/ (needs `pip install tensorboard`)
    wandb: bool = False              # Weights & Biases logging (needs `pip install wandb`)
    wandb_project: str = "ayt"       # W&B project name
    wandb_entity: Optional[str] = None  # W&B team / user (default: your W&B default entity)


@dataclass
class TrainConfig:
    stage: str = "consistency"       # diffusion | consistency | feature
    name: Optional[str] = None       # run name (default: the preset name)
    run_root: str = "runs"           # run directories live in <run_root>/<name>
    seed: int = 0
    iters: int = 400000
    batch: int = 128                 # global batch size
    batch_per_device: Optional[int] = None  # micro-batch per device (gradient accumulation); None = batch / world
    ema_decay: float = 0.9999        # EMA decay per step; 0 disables averaging (EMA == model)
    precision: str = "fp32"          # fp32 | bf16 (autocast, GPU)
    device: Optional[str] = None     # default: cuda when available, else cpu
    compile: bool = False            # torch.compile the network (dropout drawn as in eager: same masks)
    channels_last: bool = False      # channels_last memory format for the network and its inputs
    nan_check_every: int = 1         # check the loss for NaN/inf every N iterations (1: before every update)
    log_every: int = 100
    ckpt_every: int = 5000
    sample_every: int = 10000        # sample grid every N iterations (0: never)
    eval_every: int = 0              # in-training evaluation hook every N iterations (0: never)
    eval_samples: int = 5000         # samples per in-training evaluation
    keep_last: int = 2               # full checkpoints kept (model, EMA, optimiser; for --resume); 0 keeps all
    snapshot_every: int = 50000      # EMA-only snapshot every N iterations, kept for evaluation/figures (0: never)
    data: DataConfig = field(default_factory=DataConfig)
    net: NetworkConfig = field(default_factory=NetworkConfig)
    ct: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    continuous: ContinuousConfig = field(default_factory=ContinuousConfig)
    diagnostic: DiagnosticConfig = field(default_factory=DiagnosticConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    feature: FeatureConfig = field(default_factory=FeatureConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)


STAGES = ("diffusion", "consistency", "feature")
DATASETS = ("cifar10", "mnist", "fashion-mnist", "folder", "zip", "shapes", "disk", "photos")  # ayt.data.DATASET_NAMES
CT_MODES = ("ect", "mfd", "ect+mfd", "lpips", "ect+lpips", "ccd", "ccd-ayt", "cct", "cct-ayt")
FEATURE_NET_MODES = ("mfd", "ect+mfd", "ccd-ayt", "cct-ayt")   # modes that need ct.feature_net

# ----------------------------------------------------------------------------------------------
# Presets: named override sets. Paper scale: docs/method.md section 7; CPU scale: docs/method.md section 8.3.

_CIFAR = {"data.name": "cifar10", "data.resolution": 32, "net.arch": "ddpmpp-cifar10"}
_IMNET = {"data.name": "zip", "data.root": "data/imagenet-64x64.zip", "data.resolution": 64,
          "data.conditional": True, "net.arch": "adm-imagenet64"}
_SHAPES = {"data.name": "shapes", "data.resolution": 16, "data.num_images": 50000, "net.arch": "mini-shapes16",
           "device": None}
# CPU-scale consistency runs keep every full checkpoint (a few MB each): the shapes tangent study
# (ayt.analysis.shapes_study) measures the oscillation of the raw weights across them.
_MINI_CT = {**_SHAPES, "stage": "consistency", "net.init": "runs/mini-diffusion", "batch": 16, "iters": 2000,
            "optim.lr": 5e-4, "ema_decay": 0.999, "log_every": 25, "ckpt_every": 250, "keep_last": 0,
            "snapshot_every": 0, "sample_every": 500, "ct.feature_net": "runs/mini-feature-net",
            "ct.feature_arch": "mini-vgg"}
# The demo's consistency stage: ECT and AYT from the same teacher, same data order and noise.
_DEMO_CT = {**_SHAPES, "stage": "consistency", "data.num_images": 4096, "net.init": "runs/demo-diffusion",
            "ct.feature_net": "runs/demo-feature-net", "ct.feature_arch": "mini-vgg", "batch": 16, "iters": 200,
            "optim.lr": 5e-4, "ema_decay": 0.99, "log_every": 25, "ckpt_every": 100, "keep_last": 0,
            "snapshot_every": 0, "sample_every": 200}
# The 2-D disk in R^16 (tangent study, ayt.analysis.disk_study): points as [N, 16, 1, 1] images, MLP nets.
_DISK = {"data.name": "disk", "data.resolution": 1, "data.num_images": 10000, "net.arch": "mlp-disk",
         "device": None, "sample_every": 0, "keep_last": 0, "snapshot_every": 0}
# Consistency tuning on the disk uses official ECT's progressive schedule (q = 2, the gap halves every
# 2,500 iterations; stage 7, the last, has the AYT reference gap q^-1 = 1/256): measured on this MLP,
# the fixed q = 256 schedule left the 1-step model collapsed at the disk's centre after 2,000
# iterations and became unstable by 7,500, while this schedule reaches the data's radius by 20,000.
_DISK_CT = {**_DISK, "stage": "consistency", "net.init": "runs/disk-diffusion", "batch": 64, "iters": 20000,
            "ct.q": 2.0, "ct.double_every": 2500, "optim.lr": 1e-3, "ema_decay": 0.999, "log_every": 500,
            "ckpt_every": 500, "ct.feature_net": "runs/disk-feature-net", "ct.feature_arch": "mlp",
            "ct.feature_outputs": 2}

PRESETS: dict[str, dict[str, Any]] = {
    # Paper scale: CIFAR-10 32x32 unconditional.
    # EDM's CIFAR-10 DDPM++ training: 200 Mimg at batch 512, lr ramp-up over 10 Mimg, EMA half-life 0.5 Mimg.
    "cifar10-edm": {**_CIFAR, "stage": "diffusion", "net.dropout": 0.13, "optim.name": "adam", "optim.lr": 1e-3,
                    "optim.warmup_iters": 19531, "batch": 512, "iters": 390625, "ema_decay": 0.999291},
    "cifar10-ect": {**_CIFAR, "stage": "consistency", "ct.mode": "ect",
                    "net.init": "edm-cifar10-32x32-uncond-vp.pkl", "batch": 128, "iters": 400000},
    "cifar10-ayt": {**_CIFAR, "stage": "consistency", "ct.mode": "mfd",
                    "net.init": "edm-cifar10-32x32-uncond-vp.pkl", "ct.feature_net": "runs/cifar10-feature-net",
                    "batch": 128, "iters": 400000},
    # Baseline: the same direction-only update with LPIPS(VGG) as the distance (needs `pip install lpips`).
    "cifar10-lpips": {**_CIFAR, "stage": "consistency", "ct.mode": "lpips",
                      "net.init": "edm-cifar10-32x32-uncond-vp.pkl", "batch": 128, "iters": 400000},
    "cifar10-feature-net": {"stage": "feature", "data.name": "cifar10", "data.resolution": 32,
                            "feature.arch": "vgg16", "batch": 512, "iters": 400000, "ema_decay": 0.0,
                            "snapshot_every": 0},
    # Paper-scale counterparts on ImageNet 64x64 (class-conditional, ADM network from EDM's checkpoint).
    # EDM's ImageNet-64 ADM training: 2500 Mimg at batch 4096, lr ramp-up 10 Mimg, EMA half-life 50 Mimg.
    "imagenet64-edm": {**_IMNET, "stage": "diffusion", "net.dropout": 0.1, "optim.name": "adam", "optim.lr": 2e-4,
                       "optim.warmup_iters": 2441, "batch": 4096, "iters": 610352, "ema_decay": 0.999943},
    "imagenet64-ect": {**_IMNET, "stage": "consistency", "ct.mode": "ect",
                       "net.init": "edm-imagenet-64x64-cond-adm.pkl", "batch": 128, "iters": 400000},
    "imagenet64-ayt": {**_IMNET, "stage": "consistency", "ct.mode": "mfd",
                       "net.init": "edm-imagenet-64x64-cond-adm.pkl", "ct.feature_net": "runs/imagenet64-feature-net",
                       "batch": 128, "iters": 400000},
    "imagenet64-feature-net": {"stage": "feature", "data.name": "zip", "data.root": "data/imagenet-64x64.zip",
                               "data.resolution": 64, "feature.arch": "vgg16", "batch": 512, "iters": 400000,
                               "ema_decay": 0.0, "snapshot_every": 0},
    # CPU scale on the built-in shapes data (the mini study, docs/mini-study.md section 1).
    "mini-diffusion": {**_SHAPES, "stage": "diffusion", "optim.name": "adam", "optim.lr": 1e-3,
                       "optim.warmup_iters": 200, "batch": 32, "iters": 3000, "ema_decay": 0.999,
                       "log_every": 50, "ckpt_every": 500, "snapshot_every": 500, "sample_every": 1000},
    "mini-feature-net": {**_SHAPES, "stage": "feature", "feature.arch": "mini-vgg", "optim.lr": 1e-3,
                         "feature.p_ramp_iters": 500, "batch": 128, "iters": 3200, "ema_decay": 0.0,
                         "log_every": 50, "ckpt_every": 500, "snapshot_every": 0, "sample_every": 0},
    # The autoencoder feature space (the authors' train_dae.py; the study's family arms): same budget as mini-feature-net.
    "mini-dae": {**_SHAPES, "stage": "feature", "feature.arch": "dae", "feature.objective": "denoise",
                 "optim.lr": 1e-3, "batch": 128, "iters": 3200, "ema_decay": 0.0, "log_every": 50,
                 "ckpt_every": 500, "snapshot_every": 0, "sample_every": 0},
    "mini-ect": {**_MINI_CT, "ct.mode": "ect"},
    "mini-ayt": {**_MINI_CT, "ct.mode": "mfd"},
    # The whole pipeline in minutes on 2 CPU cores (see README "demo"); `ayt demo` runs all four.
    # 1,000 iterations: the first count at which the demo net learns (noise and blur R^2 >= 0.5; measured
    # 0.60 / 0.83 at 1,000 in `python -m ayt demo` on 2 threads, 0.46 / 0.68 at 300; README "Two commands").
    "demo-feature-net": {**_SHAPES, "stage": "feature", "data.num_images": 4096, "feature.arch": "mini-vgg",
                         "optim.lr": 1e-3, "feature.p_ramp_iters": 50, "feature.eval_images": 512, "batch": 64,
                         "iters": 1000, "ema_decay": 0.0, "log_every": 50, "ckpt_every": 250, "snapshot_every": 0,
                         "sample_every": 0},
    "demo-diffusion": {**_SHAPES, "stage": "diffusion", "data.num_images": 4096, "optim.name": "adam",
                       "optim.lr": 1e-3, "optim.warmup_iters": 50, "batch": 32, "iters": 400, "ema_decay": 0.99,
                       "log_every": 25, "ckpt_every": 100, "snapshot_every": 100, "sample_every": 0},
    "demo-ect": {**_DEMO_CT, "ct.mode": "ect"},
    "demo-ayt": {**_DEMO_CT, "ct.mode": "mfd"},
    # The paper's synthetic tangent study: a flat 2-D disk in R^16 (CPU minutes). Feature net on the
    # additive augmentations ('vec': mixup, noise), EDM pretraining, then ECT and AYT from it, keeping
    # every checkpoint (every 500 iterations) for the oscillation measure of ayt.analysis.
    "disk-feature-net": {**_DISK, "stage": "feature", "feature.arch": "mlp", "feature.aug_set": "vec",
                         "feature.p": 0.5, "feature.p_ramp_iters": 200, "feature.eval_images": 2048,
                         "optim.lr": 1e-3, "batch": 256, "iters": 2000, "ema_decay": 0.0, "log_every": 100,
                         "ckpt_every": 500},
    "disk-diffusion": {**_DISK, "stage": "diffusion", "optim.name": "adam", "optim.lr": 1e-3,
                       "optim.warmup_iters": 100, "batch": 256, "iters": 3000, "ema_decay": 0.999,
                       "log_every": 100, "ckpt_every": 500},
    "disk-ect": {**_DISK_CT, "ct.mode": "ect"},
    "disk-ayt": {**_DISK_CT, "ct.mode": "mfd"},
}

# One line per preset for `python -m ayt presets` (what it is for).
PRESET_PURPOSES: dict[str, str] = {
    "cifar10-edm": "EDM DDPM++ diffusion pretraining on CIFAR-10, if you do not import EDM's checkpoint",
    "cifar10-ect": "ECT baseline on CIFAR-10 from EDM's edm-cifar10-32x32-uncond-vp.pkl (batch 128, 400k it)",
    "cifar10-ayt": "ECT + AYT (MFD direction) on CIFAR-10, feature net from runs/cifar10-feature-net",
    "cifar10-lpips": "the LPIPS(VGG) direction baseline on CIFAR-10 (needs `pip install lpips`)",
    "cifar10-feature-net": "VGG16 regressing the 15 geo_clr_deg labels on CIFAR-10 (batch 512, 400k it)",
    "imagenet64-edm": "EDM ADM diffusion pretraining on ImageNet 64x64 (class-conditional)",
    "imagenet64-ect": "ECT baseline on ImageNet 64x64 from EDM's edm-imagenet-64x64-cond-adm.pkl",
    "imagenet64-ayt": "ECT + AYT on ImageNet 64x64, feature net from runs/imagenet64-feature-net",
    "imagenet64-feature-net": "VGG16 feature net on ImageNet 64x64 (data/imagenet-64x64.zip)",
    "mini-diffusion": "EDM pretraining on the built-in 16x16 shapes (CPU, the mini study's init)",
    "mini-feature-net": "mini VGG feature net on the built-in 16x16 shapes (CPU, the mini study)",
    "mini-dae": "denoising autoencoder on the 16x16 shapes, its encoder as feature net (CPU, the study's family arms)",
    "mini-ect": "ECT on the shapes from runs/mini-diffusion (CPU, the mini study's baseline)",
    "mini-ayt": "AYT on the shapes from runs/mini-diffusion with runs/mini-feature-net (CPU, the mini study)",
    "demo-feature-net": "demo stage 1: feature net on 4,096 shapes, 1,000 iterations, about 1.5 CPU minutes (`python -m ayt demo`)",
    "demo-diffusion": "demo stage 2: diffusion pretraining on 4,096 shapes (`python -m ayt demo`)",
    "demo-ect": "demo stage 3: ECT tuning from the demo teacher, the baseline (`python -m ayt demo`)",
    "demo-ayt": "demo stage 4: AYT tuning from the same teacher with the demo feature net (`python -m ayt demo`)",
    "disk-feature-net": "MLP feature net on the 2-D disk in R^16 (the tangent study)",
    "disk-diffusion": "EDM pretraining of an MLP on the 2-D disk in R^16 (the tangent study)",
    "disk-ect": "ECT on the disk with ECT's doubling schedule (q=2, double_every 2500; the tangent study)",
    "disk-ayt": "AYT on the disk with ECT's doubling schedule (q=2, double_every 2500; the tangent study)",
}


# ----------------------------------------------------------------------------------------------
# Overrides

def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(key: str, raw: Any, tp: Any) -> Any:
    """Convert `raw` (a string from the command line, or a Python value) to type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            return None
        return _parse_value(key, raw, inner)
    if isinstance(raw, str):
        try:
            if tp is bool:
                if raw.lower() in ("1", "true", "yes", "on"):
                    return True
                if raw.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if tp is int:
                return int(float(raw)) if "e" in raw.lower() and float(raw).is_integer() else int(raw)
            if tp is float:
                return float(raw)
            if tp is str:
                return raw
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected {getattr(tp, '__name__', tp)}") from None
    if tp is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if tp in (int, float, str, bool) and not (type(raw) is tp):
        raise ConfigError(f"{key}={raw!r}: expected {tp.__name__}, got {type(raw).__name__}")
    return raw


def set_key(cfg: TrainConfig, key: str, value: Any) -> None:
    """Set a dotted key (`optim.lr`) on cfg, with type conversion; unknown keys raise ConfigError."""
    obj, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown setting {key!r}")
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names:
            prefix = ".".join(parts[:i])
            known = ", ".join(sorted((f"{prefix}." if prefix else "") + n for n in names))
            raise ConfigError(f"unknown setting {key!r}; known settings here: {known}")
        if i == len(parts) - 1:
            tp = _field_types(type(obj))[part]
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"{key!r} is a group of settings; set one of its keys, e.g. {key}.<name>=...")
            setattr(obj, part, _parse_value(key, value, tp))
        else:
            obj = getattr(obj, part)


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def make_config(preset: Optional[str] = None, overrides: Optional[dict[str, Any] | list[str]] = None) -> TrainConfig:
    """Defaults (paper reference) <- preset <- overrides; validated."""
    cfg = TrainConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        for k, v in PRESETS[preset].items():
            set_key(cfg, k, v)
        cfg.name = preset
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for k, v in (overrides or {}).items():
        set_key(cfg, k, v)
    validate(cfg)
    return cfg


RUN_REFERENCES = ("net.init", "ct.feature_net", "continuous.teacher")  # settings that may name another run directory


def relocated_run_references(cfg: TrainConfig, overrides: list[str]) -> list[str]:
    """Overrides that move a preset's references to other runs (`runs/<name>`) under cfg.run_root, so a
    chain of presets (e.g. demo-feature-net -> demo-ayt) works in any run root. Keys set in `overrides`
    are left alone."""
    if Path(cfg.run_root) == Path("runs"):
        return []
    values = {"net.init": cfg.net.init, "ct.feature_net": cfg.ct.feature_net, "continuous.teacher": cfg.continuous.teacher}
    return [f"{key}={Path(cfg.run_root) / Path(values[key]).name}" for key in RUN_REFERENCES
            if values[key] and values[key].startswith("runs/") and not any(o.startswith(key + "=") for o in overrides)]


def validate(cfg: TrainConfig) -> None:
    """Impossible values raise ConfigError."""
    def need(cond: bool, msg: str):
        if not cond:
            raise ConfigError(msg)
    need(cfg.stage in STAGES, f"stage={cfg.stage!r}; expected one of {STAGES}")
    need(cfg.ct.mode in CT_MODES, f"ct.mode={cfg.ct.mode!r}; expected one of {CT_MODES}")
    need(cfg.ct.mapping in ("sigmoid", "const"), f"ct.mapping={cfg.ct.mapping!r}; expected sigmoid or const")
    need(cfg.optim.name in ("radam", "adam"), f"optim.name={cfg.optim.name!r}; expected radam or adam")
    need(cfg.precision in ("fp32", "bf16"), f"precision={cfg.precision!r}; expected fp32 or bf16")
    need(cfg.iters >= 0, "iters must be >= 0")
    need(cfg.batch >= 1, "batch must be >= 1")
    need(cfg.batch_per_device is None or cfg.batch_per_device >= 1, "batch_per_device must be >= 1")
    for key, value in _flat(to_dict(cfg)).items():
        need(not isinstance(value, float) or math.isfinite(value),
             f"{key}={value}: settings must be finite numbers")
    need(cfg.optim.lr > 0, "optim.lr must be > 0")
    need(0 <= cfg.ema_decay < 1, "ema_decay must be in [0, 1)")
    need(cfg.ct.q > 1, "ct.q must be > 1")
    need(cfg.ct.P_std > 0 and cfg.diffusion.P_std > 0, "P_std must be > 0")
    need(cfg.ct.c_mult >= 0, "ct.c_mult must be >= 0")
    need(cfg.ct.double_every is None or cfg.ct.double_every > 0, "ct.double_every must be > 0 or None")
    need(0 <= cfg.feature.p <= 1, "feature.p must be in [0, 1]")
    need(cfg.feature.objective in ("augment", "denoise"), f"feature.objective={cfg.feature.objective!r}; expected "
         "augment or denoise")
    need(cfg.feature.sigma_max > 0 and cfg.feature.c_mult >= 0, "feature.sigma_max must be > 0, feature.c_mult >= 0")
    d = cfg.data
    need(d.name in DATASETS, f"data.name={d.name!r}; expected one of {', '.join(DATASETS)}")
    need(d.split in ("train", "test"), f"data.split={d.split!r}; expected train or test")
    need(d.split == "train" or d.name in ("cifar10", "mnist", "fashion-mnist", "photos"),
         f"data.split=test: dataset {d.name!r} has no held-out split (cifar10, mnist, fashion-mnist and photos have one)")
    need(d.labels in ("auto", "json", "folders", "none"), f"data.labels={d.labels!r}; expected auto, json, folders or none")
    need(d.labels == "auto" or d.name in ("folder", "zip"), f"data.labels={d.labels} applies to data.name=folder or zip only")
    need(d.photo_downscale >= 1, f"data.photo_downscale={d.photo_downscale} must be >= 1")
    need(d.num_images >= 1, "data.num_images must be >= 1")
    if d.name == "photos":
        need(d.resolution >= 8, f"data.resolution={d.resolution}: the photos data needs a power of two >= 8")
    if cfg.data.name == "disk":  # vector data as [N, D, 1, 1] images
        need(cfg.data.resolution == 1, f"data.resolution={cfg.data.resolution}: the disk data has resolution 1")
    else:
        need(cfg.data.resolution >= 4 and cfg.data.resolution & (cfg.data.resolution - 1) == 0,
             f"data.resolution={cfg.data.resolution} must be a power of two >= 4")
    for k in ("log_every", "ckpt_every", "sample_every", "eval_every"):
        need(getattr(cfg, k) >= 0, f"{k} must be >= 0")
    need(cfg.log_every > 0 and cfg.ckpt_every > 0, "log_every and ckpt_every must be > 0")
    need(cfg.keep_last >= 0, f"keep_last={cfg.keep_last}: the number of full checkpoints to keep, >= 0 (0 keeps all)")
    need(cfg.snapshot_every >= 0, f"snapshot_every={cfg.snapshot_every} must be >= 0 (0: no snapshots)")
    need(cfg.ct.const_floor is None or 0 < cfg.ct.const_floor < 1,
         f"ct.const_floor={cfg.ct.const_floor} must be in (0, 1), or none for official ECT's unfloored form")
    need(cfg.nan_check_every >= 1, f"nan_check_every={cfg.nan_check_every} must be >= 1 (1: check before every update)")
    if cfg.stage == "consistency" and cfg.ct.mode in FEATURE_NET_MODES:
        need(cfg.ct.feature_net is not None,
             f"ct.mode={cfg.ct.mode} needs a trained feature network: set ct.feature_net=<run dir or checkpoint>")
    co = cfg.continuous
    need(co.tangent_norm in ("rms", "l2", "none"), f"continuous.tangent_norm={co.tangent_norm!r}; expected rms, l2 or none")
    need(co.tangent_c >= 0, "continuous.tangent_c must be >= 0")
    need(co.weighting in ("per-sample", "batch-mean"),
         f"continuous.weighting={co.weighting!r}; expected per-sample or batch-mean")
    need(co.jvp in ("auto", "func", "double-backward"), f"continuous.jvp={co.jvp!r}; expected auto, func or double-backward")
    need(co.tangent_warmup_iters >= 0, "continuous.tangent_warmup_iters must be >= 0")
    dg = cfg.diagnostic
    need(dg.every >= 0, "diagnostic.every must be >= 0")
    need(dg.basis in ("auto", "exact", "pca", "augment"), f"diagnostic.basis={dg.basis!r}; expected auto, exact, pca or augment")
    need(dg.samples >= 1, "diagnostic.samples must be >= 1")
    need(0 < dg.pca_dim < dg.pca_neighbors <= dg.pca_reference,
         "diagnostic: need 0 < pca_dim < pca_neighbors <= pca_reference")
    need(dg.basis != "exact" or cfg.data.name in ("shapes", "disk"),
         f"diagnostic.basis=exact: the tangent space of data.name={cfg.data.name!r} is unknown (exact only on shapes "
         "and disk); use pca or augment")
    need(dg.basis != "augment" or cfg.data.name != "disk", "diagnostic.basis=augment needs images (1 or 3 channels), "
         "not the disk's vectors")
    need(not (dg.every and cfg.stage == "feature"), "diagnostic.every: the tangent diagnostic needs a generative stage "
         "(diffusion or consistency), not stage=feature")
    if cfg.stage == "consistency" and cfg.ct.mode in ("ccd", "ccd-ayt"):
        need(bool(co.teacher or cfg.net.init),
             f"ct.mode={cfg.ct.mode} distils a diffusion teacher: set continuous.teacher=<diffusion run dir, ayt "
             "checkpoint or EDM .pkl> (or net.init, which it defaults to)")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def _flat(d: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1e-4}} -> {'optim.lr': 1e-4}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def migrate(d: dict) -> dict:
    """A config dict written by an earlier version, in today's keys, with the behaviour it had:
    keep_checkpoints=true (every checkpoint kept) -> keep_last=0, false (only the latest) -> keep_last=1;
    a const r-mapping without ct.const_floor was unfloored -> None; a feature run without
    feature.sync_bn used per-process BatchNorm -> False. The input is not modified."""
    d = json.loads(json.dumps(d))
    if "keep_checkpoints" in d:
        keep = d.pop("keep_checkpoints")
        d.setdefault("keep_last", 0 if keep else 1)
    ct = d.get("ct")
    if isinstance(ct, dict) and "const_floor" not in ct and ct.get("mapping") == "const":
        ct["const_floor"] = None
    feature = d.get("feature")
    if isinstance(feature, dict) and "sync_bn" not in feature and d.get("stage") == "feature":
        feature["sync_bn"] = False
    return d


def diff_settings(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Changed settings between two config dicts, one "key: old -> new" line each (dotted keys);
    `ignore` names keys or whole groups ("log" ignores log.*)."""
    a, b = _flat(old), _flat(new)
    skip = lambda k: any(k == g or k.startswith(g + ".") for g in ignore)
    return [f"{k}: {json.dumps(a.get(k))} -> {json.dumps(b.get(k))}" for k in sorted(set(a) | set(b))
            if not skip(k) and a.get(k) != b.get(k)]


def from_dict(d: dict) -> TrainConfig:
    """Rebuild a TrainConfig from `to_dict` output (e.g. a checkpoint or config.json), after `migrate`;
    unknown keys raise."""
    cfg = TrainConfig()
    d = migrate(d)

    def walk(prefix: str, sub: dict):
        for k, v in sub.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            else:
                set_key(cfg, key, v)
    walk("", d)
    validate(cfg)
    return cfg


def flatten(cfg: TrainConfig) -> dict[str, Any]:
    """{dotted key: value} of every setting, in declaration order."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(f"{prefix}{f.name}.", v)
            else:
                out[f"{prefix}{f.name}"] = v
    walk("", cfg)
    return out


def format_settings(cfg: TrainConfig, base: Optional[TrainConfig] = None, mark: str = "*") -> str:
    """Every setting of cfg as `key=value` lines (JSON values); with `base`, the settings that differ
    from it are marked with `mark` and show the base value."""
    ref = flatten(base) if base is not None else {}
    lines = []
    for k, v in flatten(cfg).items():
        if base is not None and ref[k] != v:
            lines.append(f"{mark} {k}={json.dumps(v)}  (default {json.dumps(ref[k])})")
        else:
            lines.append(f"{' ' * len(mark)} {k}={json.dumps(v)}" if base is not None else f"  {k}={json.dumps(v)}")
    return "\n".join(lines)


def _field_comments(cls) -> dict[str, str]:
    """The trailing ``# comment`` of each field in a dataclass's source (its allowed values and meaning)."""
    import inspect
    import io
    import tokenize
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (frozen app): no comments
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    out = {}
    for i, line in enumerate(source.splitlines(), start=1):
        head = line.strip().split(":", 1)[0]
        if head in names and i in comments and line.startswith("    ") and not line.startswith("     "):
            out[head] = comments[i]
    return out


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or none"
    return "true | false" if tp is bool else getattr(tp, "__name__", str(tp))


def describe_settings() -> str:
    """All settings with their defaults, types and allowed values / meaning (each field's trailing
    comment in this module), for --help. One line per setting: ``  key=default  [type] comment``."""
    rows = []

    def walk(prefix: str, obj):
        types, comments = _field_types(type(obj)), _field_comments(type(obj))
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(f"{prefix}{f.name}.", v)
            else:
                rows.append((f"{prefix}{f.name}={json.dumps(v)}", f"[{_type_name(types[f.name])}]",
                             comments.get(f.name, "")))
    walk("", TrainConfig())
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {k:<{width}}  {t} {c}".rstrip() for k, t, c in rows)
