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
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ck
from . import consistency as C
from .config import ConfigError, TrainConfig, diff_settings, from_dict, to_dict
from .evaluate import make_eval_hook
from .objectives import ConsistencyObjective, DiffusionObjective, FeatureObjective
from .progress import fmt_time as _fmt_time
from .runs import (build_dataset, build_diffusion_net, feature_net_verdict, feature_net_verdict_line,
                   load_feature_net, load_init_weights)
from .tracking import check_available, open_tracker, train_scalars

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
# The stage's model and objective (data and networks: ayt.runs)

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
    schedule = C.TRSchedule.from_config(ct)
    objective = ConsistencyObjective(schedule, ct.mode, ct.c_mult, ct.weighting, distance, ct.lam, ct.lam_ramp_iters)
    return model, objective, {}, note


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """RAdam / Adam. optim.foreach=None is torch's default (the multi-tensor step on GPU, the per-parameter
    loop on CPU, as in the authors' code); True forces the multi-tensor step: bitwise equal for Adam,
    equal to float rounding for RAdam (it orders the arithmetic differently; tests/test_speed.py)."""
    o = cfg.optim
    cls = {"radam": torch.optim.RAdam, "adam": torch.optim.Adam}[o.name]
    return cls(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay, foreach=o.foreach)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model for parameters; buffers are copied. One multi-tensor
    lerp (bitwise equal to a per-parameter `lerp_`)."""
    ema_p, model_p = list(ema.parameters()), [p.detach() for p in model.parameters()]
    if ema_p:
        torch._foreach_lerp_(ema_p, model_p, 1 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def step_networks(cfg: TrainConfig, model: torch.nn.Module, ddp_model: torch.nn.Module):
    """(student, teacher) callables of the training step: the DDP wrapper (or the model) and the bare
    model, compiled when cfg.compile. Compiled graphs draw dropout with eager's RNG calls
    (inductor `fallback_random`), so the student and teacher keep one shared mask and the masks equal
    the eager step's."""
    if not cfg.compile:
        return ddp_model, model
    kw = {"dynamic": False, "options": {"fallback_random": True}}  # static shapes: the batch never changes
    student = torch.compile(ddp_model, **kw)
    return student, (student if ddp_model is model else torch.compile(model, **kw))


class NonFiniteWatch:
    """Non-finite losses seen since the last check, recorded on the device without a host sync.

    `check` (one sync, and one all-reduce under DDP so every rank stops together) raises
    NonFiniteLossError; the training loop calls it before every optimiser update when
    nan_check_every=1, otherwise every nan_check_every iterations and before every log, checkpoint,
    snapshot, sample grid or evaluation, so a checkpoint never holds weights updated from a non-finite loss.
    """

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first bad iteration, -1: none

    def record(self, stats: dict[str, torch.Tensor], it: int) -> None:
        if not stats:
            return
        bad = ~torch.isfinite(torch.stack([v.detach().float().reshape(()) for v in stats.values()])).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), torch.full_like(self.first_bad, it), self.first_bad)

    def check(self, d: Dist, it: int, stats: dict[str, torch.Tensor], updated: bool, last_ckpt: Callable) -> None:
        first = self.first_bad.clone()
        if d.world > 1:
            first = torch.where(first < 0, torch.full_like(first, 2 ** 62), first)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
            first = torch.where(first == 2 ** 62, torch.full_like(first, -1), first)
        first = int(first.item())
        if first < 0:
            return
        values = _reduce_mean(stats, d)
        if first == it and not updated:
            where = f"at iteration {it}: {values}; weights were not updated"
        else:
            where = (f"first at iteration {first} (checked at iteration {it}, nan_check_every); the weights were "
                     f"updated since, but no checkpoint was written after the last check")
        raise NonFiniteLossError(f"non-finite loss {where}. The last checkpoint is {last_ckpt()}; lower optim.lr or "
                                 "check the data / initial weights", first)


def train_step(cfg: TrainConfig, d: Dist, it: int, nets: tuple, model: torch.nn.Module, ema: torch.nn.Module,
               objective: Callable, opt: torch.optim.Optimizer, next_batch: Callable, accum: int,
               watch: NonFiniteWatch, check: bool, last_ckpt: Callable = lambda: None,
               aux: Optional[torch.nn.Module] = None) -> dict[str, torch.Tensor]:
    """One optimiser step (iteration `it`): warm-up lr, `accum` micro-steps of forward/backward, the
    non-finite check (a host sync only when `check`), gradient clipping, the update and the EMA.

    nets = (student, teacher) from `step_networks`; next_batch() -> (x_0 [N, C, H, W] on the device,
    labels or None); aux: the objective's trainable module (optimised with the model; its gradients are
    averaged over processes here, DDP averages the model's). Returns the micro-step mean of the
    objective's statistics (device tensors; no sync).
    """
    student, teacher = nets
    for g in opt.param_groups:  # linear warm-up
        g["lr"] = cfg.optim.lr * min(1.0, (it + 1) / cfg.optim.warmup_iters) if cfg.optim.warmup_iters else cfg.optim.lr
    opt.zero_grad(set_to_none=True)
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    stats_sum: dict[str, torch.Tensor] = {}
    for m in range(accum):
        x_0, labels = next_batch()
        if cfg.channels_last:
            x_0 = x_0.contiguous(memory_format=torch.channels_last)
        step_seed = derive_seed(cfg.seed, d.rank, it, m)
        torch.manual_seed(step_seed)  # dropout masks of this micro-step
        gen = torch.Generator(d.device).manual_seed(step_seed + 1)
        sync = m == accum - 1 or d.world == 1
        ctx = student.no_sync() if not sync else contextlib.nullcontext()
        with ctx:
            with autocast:
                loss, stats = objective(student, x_0, labels, it, gen, teacher=teacher)
            (loss.float().mean() / accum).backward()
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0) + v.float() / accum
    watch.record(stats_sum, it)
    if check:
        watch.check(d, it, stats_sum, updated=False, last_ckpt=last_ckpt)
    if aux is not None and d.world > 1:  # DDP averages the model's gradients only
        for p in aux.parameters():
            dist.all_reduce(p.grad)
            p.grad /= d.world
    if cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    update_ema(ema, model, cfg.ema_decay)
    return stats_sum


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


# ----------------------------------------------------------------------------------------------
# The run

class NonFiniteLossError(FloatingPointError):
    """A non-finite loss stopped the run; `iteration` is the first (0-based loop index) that produced one."""

    def __init__(self, message: str, iteration: int = -1):
        super().__init__(message)
        self.iteration = iteration


def record_divergence(run_dir: Path, exc: NonFiniteLossError) -> None:
    """Note in results.json that the run stopped on a non-finite loss ("diverged": iteration, message), so that
    sweeps (the mini study) can count it as a result instead of retrying it; a later finish removes the note."""
    if run_dir.is_dir():
        ck.update_json(run_dir / "results.json",
                       lambda r: r.update(diverged={"iteration": exc.iteration, "message": str(exc)}))


# Settings that do not change the weights a run produces: they may differ on --resume (a moved or
# renamed run directory resumes too). The layout (processes, batch_per_device) is checked separately,
# against the checkpoint (`check_resume_layout`).
RESUME_MAY_CHANGE = ("iters", "keep_last", "snapshot_every", "ckpt_every", "log_every", "sample_every",
                     "eval_every", "eval_samples", "log", "name", "run_root", "batch_per_device", "nan_check_every")


def run_directory(cfg: TrainConfig) -> Path:
    if not cfg.name:
        raise ConfigError("the run needs a name: set name=<run name> or use a preset")
    return Path(cfg.run_root) / cfg.name


def prepare_run_dir(cfg: TrainConfig, resume: bool) -> Path:
    """Check runs/<name>/ for this start: an existing run needs --resume and the same settings, except
    those in RESUME_MAY_CHANGE (e.g. `iters`, raised to continue training); each changed setting is
    named with its old and new value."""
    run_dir = run_directory(cfg)
    cfg_file = run_dir / "config.json"
    if cfg_file.exists():
        if not resume and ck.list_checkpoints(run_dir):
            raise ConfigError(f"run directory {run_dir} already holds a run: pass --resume to continue it, "
                              "or choose another name=")
        if resume:
            try:  # settings added to TrainConfig since the file was written get their defaults (config.migrate)
                old = to_dict(from_dict(json.loads(cfg_file.read_text())))
            except (ConfigError, json.JSONDecodeError) as e:
                raise ConfigError(f"{cfg_file} does not hold a readable run configuration: {e}") from None
            diff = diff_settings(old, to_dict(cfg), RESUME_MAY_CHANGE)
            if diff:
                raise ConfigError(f"--resume with settings that differ from the run's {cfg_file}: {'; '.join(diff)}. "
                                  "Resume with the run's settings or start a new run (name=...); only "
                                  f"{', '.join(RESUME_MAY_CHANGE)} may change on --resume")
    return run_dir


def claim_run_dir(run_dir: Path) -> ck.FileLock:
    """Create the run directory and take its lock (rank 0): one writer per run. A read-only or
    otherwise unwritable run root is a ConfigError naming it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return ck.run_lock(run_dir).acquire()
    except ck.RunInUseError:
        raise
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run_dir}: {e.strerror or e} ({type(e).__name__}). "
                          f"run_root={run_dir.parent} must be a writable directory: choose another run_root=") from e


def _raise_on_all_ranks(d: Dist, exc: Optional[BaseException]) -> None:
    """Rank 0's failure (or None), raised on every rank, so that no rank waits for the others."""
    if d.world > 1:
        box = [exc]
        dist.broadcast_object_list(box, src=0)
        exc = box[0]
    if exc is not None:
        raise exc


def check_resume_layout(state: dict, path, world: int, micro: int, accum: int, allow: bool) -> Optional[str]:
    """A checkpoint continues bitwise only with the layout that wrote it: noise, dropout and data shards
    are seeded per (rank, micro-step). Returns None when the layout matches, a warning text when it
    does not but `allow` (--allow-world-change) is set or the checkpoint predates the record; else
    raises ConfigError naming both layouts."""
    old = (state.get("world_size"), state.get("accum_steps"), state.get("batch_per_device"))
    if None in old:
        return (f"{path} does not record the number of processes and micro-batching (written by an earlier "
                "version); resuming assumes they are unchanged")
    new = (world, accum, micro)
    if tuple(int(v) for v in old) == new:
        return None
    text = (f"{path} was written by {old[0]} process(es) x {old[1]} accumulation step(s) x {old[2]} images per "
            f"device; this start has {world} x {accum} x {micro}")
    if allow:
        return (f"{text}. Continuing because of --allow-world-change: the run will not be bitwise identical to an "
                "uninterrupted one")
    raise ConfigError(f"{text}. Noise, dropout and data shards are seeded per process and micro-step, so the run "
                      f"would not continue bitwise identically: resume with {old[0]} process(es) "
                      f"(torchrun world size) and batch_per_device={old[2]}, or pass --allow-world-change "
                      "(train(..., allow_world_change=True)) to continue as a run that is not bitwise identical")


def _resume_point(run_dir: Path, d: Dist) -> Optional[tuple[Path, dict]]:
    """(path, state) of the newest readable checkpoint, or None: rank 0 chooses it, moving unreadable
    newer ones aside with a warning, and every rank loads the same file."""
    found = None
    if d.is_main:
        ckpts = ck.list_checkpoints(run_dir)
        found = ck.load_newest_readable(ckpts, f"run directory {run_dir}") if ckpts else None
    if d.world == 1:
        return found
    box = [str(found[0]) if found else None]
    dist.broadcast_object_list(box, src=0)
    if d.is_main or box[0] is None:
        return found
    return Path(box[0]), ck.load_checkpoint(box[0])


def train(cfg: TrainConfig, resume: bool = False, eval_fn: Optional[Callable] = None,
          stop_after: Optional[int] = None, allow_world_change: bool = False) -> Path:
    """Run (or resume) the training described by cfg. Returns the run directory.

    eval_fn(ema_model, it, run_dir) -> dict is called every cfg.eval_every iterations (rank 0 logs it).
    stop_after: end the process's work after this many iterations of this call (tests / time-boxing);
    the run stays resumable. allow_world_change: resume a checkpoint written with another number of
    processes or micro-batching (warned: not bitwise identical).
    Rank 0 holds the run directory's lock (<run>/LOCK) for the whole call; a second writer is refused.
    """
    d = setup_distributed(cfg.device)
    run_dir = run_directory(cfg)
    lock, created, failure = None, False, None
    if d.is_main:
        created = not run_dir.exists()
        try:
            lock = claim_run_dir(run_dir)
        except (ConfigError, ck.RunInUseError) as e:
            failure = e
    try:
        _raise_on_all_ranks(d, failure)
        return _train(cfg, d, resume, eval_fn, stop_after, allow_world_change)
    except NonFiniteLossError as e:
        if d.is_main:
            record_divergence(run_dir, e)
        raise
    finally:
        if lock is not None:
            lock.release()
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a start that failed before writing anything leaves no empty run directory


def _train(cfg: TrainConfig, d: Dist, resume: bool, eval_fn: Optional[Callable], stop_after: Optional[int],
           allow_world_change: bool) -> Path:
    torch.manual_seed(derive_seed(cfg.seed, d.rank, 0xB0))
    run_dir = prepare_run_dir(cfg, resume)
    check_available(cfg.log)  # a missing tensorboard / wandb stops the run before any work
    if d.is_main:
        ck.remove_stale_temps(run_dir)  # left by a killed writer; nobody else writes here (we hold the lock)
    ds = build_dataset(cfg)
    img_channels = ds.num_channels
    label_dim = ds.label_dim if cfg.data.conditional else 0
    micro, accum = micro_batching(cfg, d.world)

    # Model and objective
    model, objective, extra, init_note = build_stage(cfg, img_channels, label_dim, d.device)
    extra.update(img_channels=img_channels, label_dim=label_dim)
    model = model.to(d.device).train()
    if cfg.channels_last:  # before DDP wraps it (DDP's gradient buckets follow the parameters' layout)
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    aux = getattr(objective, "module", None)  # trainable parts of the objective (sCM adaptive weight), or None
    if aux is not None:
        aux.to(d.device).train()
    opt = make_optimizer(cfg, list(model.parameters()) + (list(aux.parameters()) if aux is not None else []))
    start_it = 0

    # Resume (from the newest readable checkpoint)
    found = _resume_point(run_dir, d) if resume else None
    if found is not None:
        latest, state = found
        note = check_resume_layout(state, latest, d.world, micro, accum, allow_world_change)
        if note and d.is_main:
            ck.warn(note)
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
        eval_fn = make_eval_hook(cfg, dataset=ds)
        _log(d, f"[ayt] in-training evaluation every {cfg.eval_every} iterations: {eval_fn.reason}")
    ddp_model = model
    if d.world > 1:
        if cfg.stage == "feature" and cfg.feature.sync_bn:
            model = _sync_batchnorm(model, d, micro)
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device] if d.device.type == "cuda" else None)

    loader = torch.utils.data.DataLoader(
        ds, batch_sampler=_IterationBatches(len(ds), cfg, d, micro, accum, start_it),
        num_workers=2 if d.device.type == "cuda" else 0, pin_memory=d.device.type == "cuda")
    batches = iter(loader)
    metrics_file = run_dir / "metrics.jsonl"
    t_start, last_log_t, last_log_it = time.time(), time.time(), start_it
    end_it = cfg.iters if stop_after is None else min(cfg.iters, start_it + stop_after)

    header = {"format": ck.FORMAT, "version": ck.VERSION, "stage": cfg.stage, "config": to_dict(cfg), **extra}

    def save(it: int):
        """A full checkpoint (with the layout it was written with), then retention: the last keep_last."""
        if not d.is_main:
            return
        ck.save_atomic({**header, "kind": "checkpoint", "iteration": it, "data_position": it * cfg.batch,
                        "world_size": d.world, "batch_per_device": micro, "accum_steps": accum,
                        "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                        "rng": _rng_state(), **({"objective": aux.state_dict()} if aux is not None else {})},
                       ck.checkpoint_path(run_dir, it))
        ck.prune_checkpoints(run_dir, cfg.keep_last)

    def save_snapshot(it: int):
        """An EMA-only snapshot (evaluation, sampling, figures), never pruned."""
        if d.is_main:
            ck.save_atomic({**header, "kind": "snapshot", "iteration": it, "ema": ema.state_dict()},
                           ck.snapshot_path(run_dir, it), "snapshot")

    nets = step_networks(cfg, model, ddp_model)
    watch = NonFiniteWatch(d.device)

    def next_batch():
        x_0, labels = next(batches)
        return x_0.to(d.device, non_blocking=True), (labels.to(d.device) if label_dim else None)

    for it in range(start_it, end_it):
        done = it + 1
        # the non-finite check (a host sync) before this update when due, and always before anything is
        # logged or written (checkpoint, snapshot, samples, evaluation)
        check = (done % cfg.nan_check_every == 0 or done % cfg.log_every == 0 or done % cfg.ckpt_every == 0
                 or done in (cfg.iters, end_it, start_it + 1) or bool(cfg.sample_every and done % cfg.sample_every == 0)
                 or bool(eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0)
                 or bool(cfg.snapshot_every and done % cfg.snapshot_every == 0))
        stats = train_step(cfg, d, it, nets, model, ema, objective, opt, next_batch, accum, watch, check,
                           last_ckpt=lambda: ck.latest_checkpoint(run_dir), aux=aux)

        logged = done % cfg.log_every == 0 or done == cfg.iters
        if logged or done == start_it + 1:  # statistics to the host (a sync, and an all-reduce on every rank)
            loss_value = _reduce_mean(stats, d)
        if logged:
            now = time.time()
            rate = (done - last_log_it) / max(now - last_log_t, 1e-9)
            rec = {"iteration": done, **{k: round(v, 6) for k, v in loss_value.items()},
                   "lr": opt.param_groups[0]["lr"], "it_per_s": round(rate, 3), "time_s": round(now - t_start, 2)}
            if d.is_main:
                ck.append_jsonl(metrics_file, rec)
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
                ck.append_jsonl(metrics_file, {"iteration": done, **res})
                tracker.scalars(done, train_scalars(res))
        if diag is not None and done % cfg.diagnostic.every == 0:
            rec = {"iteration": done, **diag(model, it)}
            ck.append_jsonl(metrics_file, rec)
            tracker.scalars(done, train_scalars(rec))
        if done % cfg.ckpt_every == 0 or done == cfg.iters:
            save(done)
        if cfg.snapshot_every and done % cfg.snapshot_every == 0:
            save_snapshot(done)
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


def _sync_batchnorm(model: torch.nn.Module, d: Dist, micro: int) -> torch.nn.Module:
    """The feature net's BatchNorm layers as SyncBatchNorm under DDP, so that they normalise over the
    batch of all processes (the authors train it on one GPU with the whole batch). SyncBatchNorm runs
    on GPUs only: on CPU (gloo) each process keeps its own statistics, with a warning. The state dict
    keys are unchanged."""
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if d.device.type != "cuda":
        _log(d, f"[ayt] warning: SyncBatchNorm needs GPUs; on {d.device.type} each of the {d.world} processes "
                f"normalises BatchNorm over its own {micro} images (feature.sync_bn=false silences this)")
        return model
    _log(d, f"[ayt] feature net: SyncBatchNorm over {d.world} processes ({d.world * micro} images per BatchNorm)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


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
        ck.write_bytes_atomic("".join(l + "\n" for l in keep).encode(), path)


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
    """Write results.json (under its lock: `ayt eval` may write it at the same time); a feature network
    reports its per-label regression quality (R^2)."""
    new = {"train": {"iterations": cfg.iters, "wall_clock_s_last_session": round(wall_s, 1),
                     "started_at_iteration": start_it}}
    if ddp_check is not None:
        new["ddp"] = ddp_check
    if cfg.stage == "feature" and cfg.feature.objective == "denoise":
        from .feature_nets import denoising_quality
        new["feature_net"] = denoising_quality(model, ds, device, cfg.feature.eval_images, cfg.seed)
        _log(Dist(), "[ayt] autoencoder reconstruction RMSE by sigma: " +
             ", ".join(f"{k} {v:.4f}" for k, v in new["feature_net"]["rmse"].items()))
    elif cfg.stage == "feature":
        new["feature_net"] = feature_net_quality(model, cfg, ds, device)
        new["feature_net"]["verdict"] = feature_net_verdict(new["feature_net"]["r2"])
        _log(Dist(), "[ayt] feature net R^2 per label: " +
             ", ".join(f"{k} {v:.3f}" for k, v in new["feature_net"]["r2"].items()))
        _log(Dist(), feature_net_verdict_line(new["feature_net"]["verdict"], run_dir))

    def record(results: dict) -> None:
        new["train"]["sessions"] = train_sessions(results.get("train"), start_it, cfg.iters, wall_s)
        results.pop("diverged", None)  # a run that finished has not diverged (an earlier session may have)
        results.update(new)
    ck.update_json(run_dir / "results.json", record)


def finished_sessions(train: Optional[dict]) -> list[dict]:
    """The sessions recorded in a results.json "train" entry ([] when there is none); an entry written before
    sessions were kept gives its one (last) session."""
    train = train or {}
    if "sessions" in train:
        return list(train["sessions"])
    if not train:
        return []
    return [{"from": train.get("started_at_iteration", 0), "to": train.get("iterations"),
             "wall_clock_s": train.get("wall_clock_s_last_session")}]


def train_sessions(old: Optional[dict], start_it: int, iters: int, wall_s: float) -> list[dict]:
    """The sessions that finished the run, oldest first ({from, to, wall_clock_s}): kept in results.json so
    that a run continued to a larger `iters` still reports the time of its earlier sessions. `old` is the
    results' previous "train" entry (written before sessions were kept: its one session is recovered)."""
    past = finished_sessions(old)
    if past and start_it >= iters:  # resumed a finished run without raising iters: nothing trained
        return past
    return [*past, {"from": start_it, "to": iters, "wall_clock_s": round(wall_s, 1)}]


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
