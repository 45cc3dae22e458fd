"""Training step time, today's step against the faster one, in ONE process with the steps interleaved.

Arms (each its own copy of the same randomly initialised network, optimiser and batch):
  today          the step before the speed work, frozen in tests/frozen_reference.py (host syncs:
                 `bool((r > 0).any())`, `.tolist()` of the statistics and the NaN check every step)
  default        ayt.train.train_step with the default settings (bitwise equal to today on the CPU;
                 tests/test_speed.py): in-place residual sums, branch-free teacher, multi-tensor EMA
  no_sync        default with the NaN check only every 100 steps (nan_check_every=100): no host sync
  foreach        + optim.foreach=true (RAdam's multi-tensor step; equal to float rounding)
  channels_last  + channels_last=true (equal to float rounding)
  compile        + compile=true (torch.compile; --compile, slow to build on a CPU)
Each round runs one step of every arm in turn, so all arms see the same machine load; the ratio to
`today` is taken per round (median, min-max over rounds). Warm-up rounds are excluded.

    python benchmarks/step_time.py --config small --threads 1                      # DDPM++ 1.7M, 32 px, batch 8
    python benchmarks/step_time.py --config cifar10 --threads 1 --iters 4          # DDPM++ 55.7M, batch 4
    python benchmarks/step_time.py --config cifar10 --device cuda --batch 128 --compile

Results (with the machine) go to benchmarks/results/step_time_<config>_<device>.json; --profile adds
the top operators of one default AYT step (where the time goes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

import frozen_reference as ref  # noqa: E402

CONFIGS = {  # name -> (preset, overrides, default batch)
    "small": ("cifar10-ayt", {"net.arch": "mini-shapes16"}, 8),
    "cifar10": ("cifar10-ayt", {}, 4),
}
ARMS = {"today": None, "default": {}, "no_sync": {"nan_check_every": 100}, "foreach": {"optim.foreach": True},
        "channels_last": {"channels_last": True}, "compile": {"compile": True}}


def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device),
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def time_step(model, objective, x_0, opt, device, precision: str, warmup: int, iters: int) -> list[float]:
    """Seconds per plain optimiser step of `objective` (one arm on its own, warm-up excluded); used by
    benchmarks/continuous_step_time.py for the modes the interleaved arms above do not cover."""
    device = torch.device(device)
    times = []
    gen = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = objective(model, x_0, None, 10 ** 6, gen, teacher=model)
        loss.float().mean().backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


class Arm:
    def __init__(self, name, preset, overrides, device, batch, mode):
        from ayt.train import Dist, NonFiniteWatch, step_networks
        self.name, self.mode = name, mode
        over = {**overrides, **(ARMS[name] or {})}
        self.cfg, self.model, self.ema, self.opt, objs, self.x_0 = ref.build(preset, over, device, batch)
        self.objective = objs[mode]
        self.d = Dist(device=torch.device(device))
        self.nets = step_networks(self.cfg, self.model, self.model)
        self.watch = NonFiniteWatch(self.d.device)
        self.times: list[float] = []

    def step(self, it: int) -> None:
        from ayt.train import train_step
        if self.name == "today":
            ref.todays_step(self.cfg, self.d, it, self.model, self.ema, self.objective, self.opt, self.x_0)
        else:
            check = (it + 1) % self.cfg.nan_check_every == 0
            train_step(self.cfg, self.d, it, self.nets, self.model, self.ema, self.objective, self.opt,
                       lambda: (self.x_0, None), 1, self.watch, check)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode, arm_names, preset, overrides, device, batch, warmup, iters) -> dict:
    arms = [Arm(n, preset, overrides, device, batch, mode) for n in arm_names]
    for r in range(warmup + iters):
        for a in arms:
            sync(device)
            t0 = time.perf_counter()
            a.step(r)
            sync(device)
            if r >= warmup:
                a.times.append(time.perf_counter() - t0)
            elif r == 0:
                a.first_step_s = time.perf_counter() - t0
        print(f"  {mode} round {r + 1}/{warmup + iters}: " +
              " ".join(f"{a.name} {1000 * (a.times[-1] if r >= warmup else a.first_step_s):.0f}ms" for a in arms), flush=True)
    today = arms[0].times
    out = {}
    for a in arms:
        ratios = [t / t0 for t, t0 in zip(a.times, today)]
        out[a.name] = {"ms_per_step_median": round(1000 * statistics.median(a.times), 2),
                       "ms_per_step_min": round(1000 * min(a.times), 2),
                       "images_per_s": round(batch / statistics.median(a.times), 2),
                       "ratio_to_today_median": round(statistics.median(ratios), 3),
                       "ratio_to_today_min": round(min(ratios), 3), "ratio_to_today_max": round(max(ratios), 3),
                       "first_step_s": round(a.first_step_s, 2)}
    return out


def profile_step(preset, overrides, device, batch, mode="AYT", top=15) -> list[dict]:
    """Self time per operator of one default step (after one warm-up step)."""
    a = Arm("default", preset, overrides, device, batch, mode)
    a.step(0)
    with torch.profiler.profile() as prof:
        a.step(1)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 2),
             "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in rows[:top]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="small", choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=None, help="default: 8 (small), 4 (cifar10)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--modes", default="ECT,AYT")
    ap.add_argument("--arms", default="today,default,no_sync,foreach,channels_last")
    ap.add_argument("--compile", action="store_true", help="add the compiled arm")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset, overrides, batch = CONFIGS[args.config]
    batch = args.batch or batch
    arm_names = args.arms.split(",") + (["compile"] if args.compile else [])
    if arm_names[0] != "today" or any(a not in ARMS for a in arm_names):
        ap.error(f"--arms must start with 'today' and name arms from {list(ARMS)}")
    device = torch.device(args.device)
    results = {"benchmark": "step_time", "config": args.config, "preset": preset, "overrides": overrides,
               "batch": batch, "warmup": args.warmup, "iters": args.iters, "machine": machine(device),
               "command": "python benchmarks/step_time.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "modes": {}}
    for mode in args.modes.split(","):
        results["modes"][mode] = run_mode(mode, arm_names, preset, overrides, args.device, batch, args.warmup, args.iters)
    if "ECT" in results["modes"] and "AYT" in results["modes"]:
        results["mfd_overhead_ratio"] = {a: round(results["modes"]["AYT"][a]["ms_per_step_median"] /
                                                  results["modes"]["ECT"][a]["ms_per_step_median"], 3) for a in arm_names}
    if args.profile:
        results["profile_default_AYT_step"] = profile_step(preset, overrides, args.device, batch)
    print(f"{'mode':5s} {'arm':14s} {'ms/step':>10s} {'x today (median, min-max)':>28s}")
    for mode, arms in results["modes"].items():
        for name, r in arms.items():
            print(f"{mode:5s} {name:14s} {r['ms_per_step_median']:10.1f} {r['ratio_to_today_median']:10.3f} "
                  f"({r['ratio_to_today_min']:.3f}-{r['ratio_to_today_max']:.3f})")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"step_time_{args.config}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")
    return results


if __name__ == "__main__":
    main()
