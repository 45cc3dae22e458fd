"""The one training loop: diffusion pretraining, consistency tuning (ECT / AYT) and feature-network
training, on one CPU, one GPU, or many GPUs and nodes (torchrun / DDP).

Reproducibility and exact resume. Nothing random depends on hidden state: the data order of
iteration `it` is a pure function of (seed, it) (a fresh permutation per epoch), and every random
draw of micro-step m of iteration `it` on rank k comes from a generator seeded with
(seed, k, it, m); the global RNG (dropout) is reseeded from the same tuple. A checkpoint therefore
needs only the weights, the EMA, the optimiser and the iteration to continue bitwise-identically;
it also stores the RNG states and the data position for inspection.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ck
from . import consistency as C
from .config import ConfigError, TrainConfig, from_dict, to_dict
from .objectives import ConsistencyObjective, DiffusionObjective, FeatureObjective
from .progress import fmt_time as _fmt_time
from .tracking import check_available, open_tracker, train_scalars

# EDM's released checkpoints (Karras et al. 2022), downloaded on demand when net.init names one.
EDM_PRETRAINED_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
EDM_PRETRAINED = ("edm-cifar10-32x32-uncond-vp.pkl", "edm-cifar10-32x32-cond-vp.pkl",
                  "edm-cifar10-32x32-uncond-ve.pkl", "edm-imagenet-64x64-cond-adm.pkl",
                  "edm-ffhq-64x64-uncond-vp.pkl", "edm-afhqv2-64x64-uncond-vp.pkl")


# ----------------------------------------------------------------------------------------------
# Distributed setup

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None) -> Dist:
    """Initialise torch.distributed when launched by torchrun (NCCL on GPU, gloo on CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return Dist(rank, world, local_rank, dev)


def _log(d: Dist, *msg) -> None:
    if d.is_main:
        print(*msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Deterministic data order and seeds

def derive_seed(*parts: int) -> int:
    """A 63-bit seed from a tuple of non-negative integers (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


@functools.lru_cache(maxsize=2)
def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch [num_items] (cached: a batch may span two epochs). Do not modify."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(derive_seed(seed, 0xDA7A, epoch)))


def batch_indices(num_items: int, global_batch: int, it: int, seed: int) -> torch.Tensor:
    """Dataset indices of iteration `it` [global_batch]: consecutive slices of per-epoch permutations."""
    start = it * global_batch
    out, pos = [], start
    while pos < start + global_batch:
        epoch, offset = divmod(pos, num_items)
        perm = epoch_permutation(num_items, seed, epoch)
        take = min(num_items - offset, start + global_batch - pos)
        out.append(perm[offset:offset + take])
        pos += take
    return torch.cat(out)


class _IterationBatches(torch.utils.data.Sampler):
    """Yields the index lists of (iteration, micro-step) for this rank, from `start_it` on."""

    def __init__(self, num_items: int, cfg: TrainConfig, d: Dist, micro: int, accum: int, start_it: int):
        self.n, self.cfg, self.d, self.micro, self.accum, self.start = num_items, cfg, d, micro, accum, start_it

    def __iter__(self) -> Iterator[list[int]]:
        for it in range(self.start, self.cfg.iters):
            idx = batch_indices(self.n, self.cfg.batch, it, self.cfg.seed)
            local = idx.view(self.d.world, -1)[self.d.rank]           # [batch / world]
            for m in range(self.accum):
                yield local[m * self.micro:(m + 1) * self.micro].tolist()

    def __len__(self) -> int:
        return max(self.cfg.iters - self.start, 0) * self.accum


def micro_batching(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro-batch per device, accumulation steps); the global batch must split evenly."""
    if cfg.batch % world:
        raise ConfigError(f"batch={cfg.batch} is not divisible by the number of processes ({world})")
    local = cfg.batch // world
    micro = cfg.batch_per_device or local
    if micro > local or local % micro:
        raise ConfigError(f"batch_per_device={micro} must divide the per-process batch {local} (batch={cfg.batch}, "
                          f"{world} processes)")
    return micro, local // micro


# ----------------------------------------------------------------------------------------------
# Building the pieces of a run from its config

def build_dataset(cfg: TrainConfig):
    from .data import dataset_kwargs, get_dataset
    d = cfg.data
    ds = get_dataset(**dataset_kwargs(d))
    if ds.resolution != d.resolution:
        raise ConfigError(f"data.resolution={d.resolution} but the dataset {d.name!r} has {ds.resolution}x{ds.resolution} images")
    return ds


def build_diffusion_net(cfg: TrainConfig, img_channels: int, label_dim: int) -> torch.nn.Module:
    from .networks import NETWORK_CONFIGS, build_network
    if cfg.net.arch not in NETWORK_CONFIGS:
        raise ConfigError(f"unknown net.arch {cfg.net.arch!r}; known: {', '.join(NETWORK_CONFIGS)}")
    kwargs = dict(NETWORK_CONFIGS[cfg.net.arch])
    if cfg.net.dropout is not None:
        kwargs["dropout"] = cfg.net.dropout
    return build_network(kwargs, img_resolution=cfg.data.resolution, img_channels=img_channels, label_dim=label_dim)


def _resolve_pretrained(path: str) -> Path:
    """A local path, or one of EDM's released checkpoints (downloaded once into data/pretrained/)."""
    p = Path(path)
    if p.exists():
        return p
    if p.name in EDM_PRETRAINED:
        dest = Path("data/pretrained") / p.name
        if dest.exists():
            return dest
        url = EDM_PRETRAINED_URL + p.name
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(dest), progress=False)
            return dest
        except Exception as e:
            raise FileNotFoundError(f"EDM checkpoint {p.name} is not at {p} or {dest} and could not be downloaded "
                                    f"from {url} ({e}). Download it by hand and pass its path as net.init.") from e
    raise FileNotFoundError(f"net.init: no such file or run directory: {p}")


def load_init_weights(net: torch.nn.Module, path: str) -> str:
    """Initialise `net` from a run directory / ayt checkpoint (its EMA), an EDM .pkl or a .pt state dict."""
    from .networks import load_edm_checkpoint, load_into
    p = _resolve_pretrained(path)
    ckpt = _read_ayt_checkpoint(p) if p.is_dir() or p.suffix == ".pt" else None
    if ckpt is not None:
        ck.load_state_dict_strict(net, ckpt["ema"], f"net.init checkpoint {p}")
        return f"ayt checkpoint {p} (EMA, iteration {ckpt['iteration']})"
    load_into(net, load_edm_checkpoint(str(p)), strict=True)
    return f"{p}"


def _read_ayt_checkpoint(p: Path) -> Optional[dict]:
    """A run directory's latest checkpoint, or the file's checkpoint if it is an ayt checkpoint (else None);
    the file is read once."""
    if p.is_dir():
        return ck.load_checkpoint(ck.resolve_checkpoint(p))
    try:
        obj = ck.read_torch_file(p)
    except ck.CheckpointError:
        return None
    return ck.check_checkpoint(obj, p) if ck.is_checkpoint(obj) else None


def load_feature_net(path: str, arch: str, resolution: int, in_channels: int, num_outputs: int) -> torch.nn.Module:
    """A frozen feature network phi from a feature run directory / ayt checkpoint (architecture read
    from its config) or from a plain state dict (e.g. the authors' release; architecture from args)."""
    from .features import build_feature_net, freeze
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"ct.feature_net: no such run directory or file: {p} "
                                "(train one first: python -m ayt train --preset <...>-feature-net)")
    obj = ck.load_checkpoint(ck.resolve_checkpoint(p)) if p.is_dir() else ck.read_torch_file(p)
    if ck.is_checkpoint(obj):
        ckpt = ck.check_checkpoint(obj, p)
        fcfg = from_dict(ckpt["config"])
        if fcfg.stage != "feature":
            raise ck.CheckpointError(f"ct.feature_net={p} is a {fcfg.stage!r} run, not a feature-network run")
        if fcfg.data.resolution != resolution:
            raise ConfigError(f"feature net {p} was trained at {fcfg.data.resolution} px; this run is at {resolution} px")
        phi = build_feature_net(fcfg.feature.arch, resolution=resolution, in_channels=in_channels,
                                num_outputs=ckpt["num_outputs"])
        ck.load_state_dict_strict(phi, ckpt["model"], f"feature net {p}")
    else:
        phi = build_feature_net(arch, resolution=resolution, in_channels=in_channels, num_outputs=num_outputs)
        ck.load_state_dict_strict(phi, obj, f"feature-net state dict {p}")
    return freeze(phi)


def build_stage(cfg: TrainConfig, img_channels: int, label_dim: int, device: torch.device):
    """(model, objective, extra checkpoint fields, init note) for the run's stage."""
    if cfg.stage == "feature" and cfg.feature.objective == "denoise":  # autoencoder features (ayt.feature_nets)
        from .features import AUTOENCODERS, build_feature_net
        from .objectives import DenoisingObjective
        if cfg.feature.arch not in AUTOENCODERS:
            raise ConfigError(f"feature.objective=denoise trains an autoencoder: feature.arch must be one of "
                              f"{', '.join(AUTOENCODERS)}, not {cfg.feature.arch!r}")
        model = build_feature_net(cfg.feature.arch, resolution=cfg.data.resolution, in_channels=img_channels)
        return (model, DenoisingObjective(cfg.feature.sigma_max, cfg.feature.c_mult), {"num_outputs": 0},
                "random init (denoising autoencoder)")
    if cfg.stage == "feature":
        from .augment import AUG_SETS, AugmentPipe
        from .features import AUTOENCODERS, build_feature_net
        if cfg.feature.arch in AUTOENCODERS:
            raise ConfigError(f"feature.arch={cfg.feature.arch} is an autoencoder: train it with feature.objective=denoise")
        if cfg.feature.aug_set not in AUG_SETS:
            raise ConfigError(f"unknown feature.aug_set {cfg.feature.aug_set!r}; known: {', '.join(AUG_SETS)}")
        L = len(AUG_SETS[cfg.feature.aug_set])
        model = build_feature_net(cfg.feature.arch, resolution=cfg.data.resolution, in_channels=img_channels,
                                  num_outputs=L)
        pipe = AugmentPipe(cfg.feature.aug_set, p=cfg.feature.p)
        objective = FeatureObjective(pipe, cfg.feature.p, cfg.feature.p_ramp_iters)
        return model, objective, {"num_outputs": L}, "random init (feature network)"
    model = build_diffusion_net(cfg, img_channels, label_dim)
    note = load_init_weights(model, cfg.net.init) if cfg.net.init else "random init"
    if cfg.stage == "diffusion":
        dcfg = cfg.diffusion
        return model, DiffusionObjective(C.EDMLossConfig(dcfg.P_mean, dcfg.P_std, dcfg.sigma_data)), {}, note
    if not cfg.net.init:
        note += " (warning: consistency tuning normally starts from a pretrained diffusion model, net.init)"
    ct = cfg.ct
    from .continuous import CONTINUOUS_MODES, build_continuous_objective
    if ct.mode in CONTINUOUS_MODES:  # CCD / CT, pixel or feature space (ayt.continuous)
        return model, build_continuous_objective(cfg, img_channels, label_dim, device), {}, note
    distance = None
    if ct.mode in ("mfd", "ect+mfd"):
        from .losses import MFD
        phi = load_feature_net(ct.feature_net, ct.feature_arch, cfg.data.resolution, img_channels, ct.feature_outputs)
        distance = MFD(phi, eps=ct.mfd_eps).to(device)
    elif ct.mode in ("lpips", "ect+lpips"):
        from .losses import LPIPSDistance
        distance = LPIPSDistance().to(device)
    schedule = C.TRSchedule(ct.P_mean, ct.P_std, ct.q, ct.k, ct.b, ct.mapping, ct.stage, ct.double_every)
    objective = ConsistencyObjective(schedule, ct.mode, ct.c_mult, ct.weighting, distance, ct.lam, ct.lam_ramp_iters)
    return model, objective, {}, note


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    o = cfg.optim
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[o.name]
    return cls(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# ----------------------------------------------------------------------------------------------
# The run

class NonFiniteLossError(FloatingPointError):
    pass


def prepare_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """Create runs/<name>/ with config.json; an existing run needs --resume and the same settings
    (except `iters`, which may be raised to continue training)."""
    if not cfg.name:
        raise ConfigError("the run needs a name: set name=<run name> or use a preset")
    run_dir = Path(cfg.run_root) / cfg.name
    cfg_file = run_dir / "config.json"
    if cfg_file.exists():
        if not resume and ck.list_checkpoints(run_dir):
            raise ConfigError(f"run directory {run_dir} already holds a run: pass --resume to continue it, "
                              "or choose another name=")
        try:  # settings added to TrainConfig since the file was written get their defaults
            old = to_dict(from_dict(json.loads(cfg_file.read_text())))
        except (ConfigError, json.JSONDecodeError) as e:
            raise ConfigError(f"{cfg_file} does not hold a readable run configuration: {e}") from None
        new = to_dict(cfg)
        diff = sorted(k for k in set(old) | set(new) if k not in ("iters", "log") and old.get(k) != new.get(k))
        if resume and diff:
            raise ConfigError(f"--resume with settings that differ from {cfg_file}: {', '.join(diff)}")
    return run_dir


def train(cfg: TrainConfig, resume: bool = False, eval_fn: Optional[Callable] = None,
          stop_after: Optional[int] = None) -> Path:
    """Run (or resume) the training described by cfg. Returns the run directory.

    eval_fn(ema_model, it, run_dir) -> dict is called every cfg.eval_every iterations (rank 0 logs it).
    stop_after: end the process's work after this many iterations of this call (tests / time-boxing);
    the run stays resumable.
    """
    d = setup_distributed(cfg.device)
    torch.manual_seed(derive_seed(cfg.seed, d.rank, 0xB0))
    run_dir = prepare_run_dir(cfg, resume)
    check_available(cfg.log)  # a missing tensorboard / wandb stops the run before any work
    ds = build_dataset(cfg)
    img_channels = ds.num_channels
    label_dim = ds.label_dim if cfg.data.conditional else 0
    micro, accum = micro_batching(cfg, d.world)

    # Model and objective
    model, objective, extra, init_note = build_stage(cfg, img_channels, label_dim, d.device)
    extra.update(img_channels=img_channels, label_dim=label_dim)
    model = model.to(d.device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    aux = getattr(objective, "module", None)  # trainable parts of the objective (sCM adaptive weight), or None
    if aux is not None:
        aux.to(d.device).train()
    opt = make_optimizer(cfg, list(model.parameters()) + (list(aux.parameters()) if aux is not None else []))
    start_it = 0

    # Resume
    latest = ck.latest_checkpoint(run_dir)
    if resume and latest is not None:
        state = ck.load_checkpoint(latest)
        if state.get("stage") != cfg.stage:
            raise ck.CheckpointError(f"{latest} is a {state.get('stage')!r} checkpoint; this run is {cfg.stage!r}")
        ck.load_state_dict_strict(model, state["model"], f"checkpoint {latest}")
        ck.load_state_dict_strict(ema, state["ema"], f"checkpoint {latest} (EMA)")
        opt.load_state_dict(state["optimizer"])
        if aux is not None:
            ck.load_state_dict_strict(aux, state["objective"], f"checkpoint {latest} (objective)")
        start_it = int(state["iteration"])
        init_note = f"resumed from {latest} at iteration {start_it}"
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ck.write_json_atomic(to_dict(cfg), run_dir / "config.json")
        truncate_metrics(run_dir / "metrics.jsonl", start_it)
    # Live metrics (rank 0): the new event file purges the steps logged after the checkpoint (ayt.tracking)
    tracker = open_tracker(cfg, run_dir, "train", purge_step=start_it + 1, enabled=d.is_main)
    _log(d, f"[ayt] run {run_dir} | stage {cfg.stage} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params"
            f" | {d.world} process(es) on {d.device} | batch {cfg.batch} = {d.world} x {accum} x {micro} | {init_note}")

    diag = None
    if cfg.diagnostic.every and d.is_main:  # live tangent diagnostic (ayt.diagnostic), rank 0 only
        from .diagnostic import build_diagnostic
        diag = build_diagnostic(cfg, objective, ds, d.device, label_dim)
    if eval_fn is None and cfg.eval_every and cfg.stage != "feature":
        from .evaluate import make_eval_hook
        eval_fn = make_eval_hook(cfg, dataset=ds)
        _log(d, f"[ayt] in-training evaluation every {cfg.eval_every} iterations: {eval_fn.reason}")
    ddp_model = model
    if d.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device] if d.device.type == "cuda" else None)

    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=_IterationBatches(len(ds), cfg, d, micro, accum, start_it),
        num_workers=2 if d.device.type == "cuda" else 0, pin_memory=d.device.type == "cuda")
    batches = iter(loader)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    metrics_file = run_dir / "metrics.jsonl"
    t_start, last_log_t, last_log_it = time.time(), time.time(), start_it
    end_it = cfg.iters if stop_after is None else min(cfg.iters, start_it + stop_after)

    def save(it: int):
        if not d.is_main:
            return
        ck.save_atomic({"format": ck.FORMAT, "version": ck.VERSION, "stage": cfg.stage, "iteration": it,
                        "data_position": it * cfg.batch, "config": to_dict(cfg), "model": model.state_dict(),
                        "ema": ema.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(), **extra,
                        **({"objective": aux.state_dict()} if aux is not None else {})},
                       ck.checkpoint_path(run_dir, it))
        if not cfg.keep_checkpoints:
            for old_it, p in ck.list_checkpoints(run_dir)[:-1]:
                p.unlink(missing_ok=True)

    for it in range(start_it, end_it):
        for g in opt.param_groups:  # linear warm-up
            g["lr"] = cfg.optim.lr * min(1.0, (it + 1) / cfg.optim.warmup_iters) if cfg.optim.warmup_iters else cfg.optim.lr
        opt.zero_grad(set_to_none=True)
        stats_sum: dict[str, torch.Tensor] = {}
        for m in range(accum):
            x_0, labels = next(batches)
            x_0 = x_0.to(d.device, non_blocking=True)
            labels = labels.to(d.device) if label_dim else None
            step_seed = derive_seed(cfg.seed, d.rank, it, m)
            torch.manual_seed(step_seed)  # dropout masks of this micro-step
            gen = torch.Generator(d.device).manual_seed(step_seed + 1)
            sync = m == accum - 1 or d.world == 1
            ctx = ddp_model.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with autocast:
                    loss, stats = objective(ddp_model, x_0, labels, it, gen, teacher=model)
                (loss.float().mean() / accum).backward()
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0) + v.float() / accum
        loss_value = _reduce_mean(stats_sum, d)
        if not all(math.isfinite(v) for v in loss_value.values()):
            raise NonFiniteLossError(f"non-finite loss at iteration {it}: {loss_value}; weights were not updated. "
                                     f"The last checkpoint is {ck.latest_checkpoint(run_dir)}; lower optim.lr or "
                                     "check the data / initial weights")
        if aux is not None and d.world > 1:  # DDP averages the model's gradients only
            for p in aux.parameters():
                dist.all_reduce(p.grad)
                p.grad /= d.world
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        update_ema(ema, model, cfg.ema_decay)
        done = it + 1

        if done % cfg.log_every == 0 or done == cfg.iters:
            now = time.time()
            rate = (done - last_log_it) / max(now - last_log_t, 1e-9)
            rec = {"iteration": done, **{k: round(v, 6) for k, v in loss_value.items()},
                   "lr": opt.param_groups[0]["lr"], "it_per_s": round(rate, 3), "time_s": round(now - t_start, 2)}
            if d.is_main:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                tracker.scalars(done, train_scalars(rec))
                _print_progress(cfg, done, loss_value, rate)
            last_log_t, last_log_it = now, done
        elif done == start_it + 1 and d.is_main:  # a first line within seconds (not a metrics record)
            _print_progress(cfg, done, loss_value, 1 / max(time.time() - t_start, 1e-9), "first iteration")
        if cfg.sample_every and done % cfg.sample_every == 0 and cfg.stage != "feature" and d.is_main:
            grid = save_sample_grid(ema, cfg, img_channels, label_dim, run_dir / "samples" / f"samples-{done:08d}.png",
                                    d.device)
            tracker.image(done, "samples", grid)
        if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0:
            res = eval_fn(ema, done, run_dir)
            if d.is_main and res:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps({"iteration": done, **res}) + "\n")
                tracker.scalars(done, train_scalars(res))
        if diag is not None and done % cfg.diagnostic.every == 0:
            rec = {"iteration": done, **diag(model, it)}
            with open(metrics_file, "a") as f:
                f.write(json.dumps(rec) + "\n")
            tracker.scalars(done, train_scalars(rec))
        if done % cfg.ckpt_every == 0 or done == cfg.iters:
            save(done)
    replicas = model if aux is None else torch.nn.ModuleList([model, aux])
    ddp_check = replica_divergence(replicas, d) if d.world > 1 else None
    if end_it == cfg.iters and d.is_main:
        if not ck.list_checkpoints(run_dir) or ck.list_checkpoints(run_dir)[-1][0] != cfg.iters:
            save(cfg.iters)
        finish_run(cfg, run_dir, model, ema, ds, d.device, time.time() - t_start, start_it, ddp_check)
    tracker.close()
    if d.world > 1:
        dist.barrier()
    return run_dir


@torch.no_grad()
def replica_divergence(model: torch.nn.Module, d: Dist) -> dict:
    """Max |theta_rank - theta_0| over all parameters and ranks: DDP replicas must stay identical (0.0)."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return {"world_size": d.world, "max_param_diff_across_ranks": float(diff.item())}


def truncate_metrics(path: Path, last_it: int) -> None:
    """Drop log records past the checkpoint a run resumes from (they are logged again)."""
    if not path.exists():
        return
    lines = [l for l in path.read_text().splitlines() if l.strip()]
    keep = [l for l in lines if json.loads(l).get("iteration", 0) <= last_it]
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, path)


def _reduce_mean(stats: dict[str, torch.Tensor], d: Dist) -> dict[str, float]:
    if not stats:
        return {}
    keys = sorted(stats)
    vec = torch.stack([stats[k].detach().float().reshape(()) for k in keys])
    if d.world > 1:
        dist.all_reduce(vec)
        vec /= d.world
    return dict(zip(keys, vec.tolist()))


def _print_progress(cfg: TrainConfig, done: int, stats: dict[str, float], rate: float, note: str = "") -> None:
    """The loop's log line: iteration, statistics, rate and ETA."""
    eta = (cfg.iters - done) / max(rate, 1e-9)
    print(f"[{cfg.name}] {done}/{cfg.iters} " + " ".join(f"{k} {v:.4g}" for k, v in stats.items())
          + f" | {rate:.2f} it/s | eta {_fmt_time(eta)}" + (f" | {note}" if note else ""), flush=True)


def load_run_model(path, which: str = "ema", device="cpu") -> tuple[torch.nn.Module, TrainConfig, dict]:
    """(network in eval mode, its run config, the checkpoint dict) from a run directory or checkpoint file.
    which: "ema" (what sampling and evaluation use) or "model" (the raw weights)."""
    ckpt_path = ck.resolve_checkpoint(path)
    state = ck.load_checkpoint(ckpt_path)
    cfg = from_dict(state["config"])
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    if cfg.stage == "feature":
        from .features import build_feature_net
        net = build_feature_net(cfg.feature.arch, resolution=cfg.data.resolution, in_channels=state["img_channels"],
                                num_outputs=state["num_outputs"])
    else:
        net = build_diffusion_net(cfg, state["img_channels"], state["label_dim"])
    ck.load_state_dict_strict(net, state[which], f"checkpoint {ckpt_path}")
    return net.to(device).eval(), cfg, state


def save_sample_grid(ema, cfg: TrainConfig, img_channels: int, label_dim: int, path: Path, device) -> torch.Tensor:
    """Write a grid of 64 samples to `path`; returns them [64, C, H, W] in [0, 1]."""
    import torchvision
    was_training = ema.training
    from .sampling import generate
    x = generate(ema.eval(), cfg.stage, 64, img_channels, cfg.data.resolution, label_dim, cfg.seed, device)
    ema.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image((x + 1) / 2, str(path), nrow=8)
    return (x + 1) / 2


def finish_run(cfg: TrainConfig, run_dir: Path, model, ema, ds, device, wall_s: float, start_it: int,
               ddp_check: Optional[dict] = None) -> None:
    """Write results.json; a feature network reports its per-label regression quality (R^2)."""
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["train"] = {"iterations": cfg.iters, "wall_clock_s_last_session": round(wall_s, 1),
                        "started_at_iteration": start_it}
    if ddp_check is not None:
        results["ddp"] = ddp_check
    if cfg.stage == "feature" and cfg.feature.objective == "denoise":
        from .feature_nets import denoising_quality
        results["feature_net"] = denoising_quality(model, ds, device, cfg.feature.eval_images, cfg.seed)
        _log(Dist(), "[ayt] autoencoder reconstruction RMSE by sigma: " +
             ", ".join(f"{k} {v:.4f}" for k, v in results["feature_net"]["rmse"].items()))
    elif cfg.stage == "feature":
        results["feature_net"] = feature_net_quality(model, cfg, ds, device)
        _log(Dist(), "[ayt] feature net R^2 per label: " +
             ", ".join(f"{k} {v:.3f}" for k, v in results["feature_net"]["r2"].items()))
    ck.write_json_atomic(results, results_path)


@torch.no_grad()
def feature_net_quality(model, cfg: TrainConfig, ds, device, batch: int = 256) -> dict:
    """Per-label R^2 and relative MSE of the label regression on held-out augmented images (p = cfg.feature.p)."""
    from .augment import AUG_SETS, AugmentPipe
    names = AUG_SETS[cfg.feature.aug_set]
    pipe = AugmentPipe(cfg.feature.aug_set, p=cfg.feature.p)
    gen = torch.Generator(device).manual_seed(derive_seed(cfg.seed, 0xE7A1))
    n = min(cfg.feature.eval_images, len(ds))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 0xE7A2)))[:n]
    model.eval()
    preds, targets = [], []
    for i in range(0, n, batch):
        x = torch.stack([ds[int(j)][0] for j in idx[i:i + batch]]).to(device)
        x_aug, y = pipe(x, generator=gen)
        preds.append(model(x_aug).float().cpu())
        targets.append(y.float().cpu())
    model.train()
    p, y = torch.cat(preds).double(), torch.cat(targets).double()
    var = y.var(0, unbiased=False)
    mse = (p - y).square().mean(0)
    r2 = torch.where(var > 0, 1 - mse / var.clamp(min=1e-12), torch.full_like(var, float("nan")))
    return {"labels": names, "r2": {k: float(v) for k, v in zip(names, r2)},
            "relative_mse": {k: float(v) for k, v in zip(names, mse / var.clamp(min=1e-12))},
            "eval_images": n, "p": cfg.feature.p}
