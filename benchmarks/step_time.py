"""Training step time: ms/step and images/s of one optimiser step, warm-up excluded.

Measures the consistency step of a preset with ECT and with the AYT update (mode mfd) at the same
batch, plus the EDM diffusion step, and reports the MFD overhead as a ratio to the ECT step. The
networks are randomly initialised (speed does not depend on the weights).

    python benchmarks/step_time.py --preset mini-ayt --batch 16 --device cpu
    python benchmarks/step_time.py --preset cifar10-ayt --batch 128 --device cuda --precision bf16

Results (with the machine) are written to benchmarks/results/step_time_<preset>_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ayt import consistency as C
from ayt.augment import AUG_SETS
from ayt.config import make_config
from ayt.features import build_feature_net, freeze
from ayt.losses import MFD
from ayt.objectives import ConsistencyObjective, DiffusionObjective
from ayt.train import build_diffusion_net, make_optimizer


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def time_step(model, objective, x_0, opt, device, precision: str, warmup: int, iters: int) -> list[float]:
    times = []
    gen = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = objective(model, x_0, None, 10**6, gen, teacher=model)
        loss.float().mean().backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini-ayt")
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--feature-arch", default=None, help="default: the preset's ct.feature_arch")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cfg = make_config(args.preset)
    device = torch.device(args.device)
    batch = args.batch or cfg.batch
    R, Cimg = cfg.data.resolution, 3
    x_0 = torch.rand(batch, Cimg, R, R, device=device) * 2 - 1
    phi = freeze(build_feature_net(args.feature_arch or cfg.ct.feature_arch, resolution=R, in_channels=Cimg,
                                   num_outputs=len(AUG_SETS["geo_clr_deg"]))).to(device)
    sched = C.TRSchedule(cfg.ct.P_mean, cfg.ct.P_std, cfg.ct.q, cfg.ct.k, cfg.ct.b, cfg.ct.mapping)
    arms = {
        "diffusion (EDM loss)": DiffusionObjective(),
        "ECT": ConsistencyObjective(sched, "ect"),
        "AYT (mfd)": ConsistencyObjective(sched, "mfd", distance=MFD(phi)),
        "ECT+AYT (ect+mfd)": ConsistencyObjective(sched, "ect+mfd", distance=MFD(phi)),
    }
    results = {"preset": args.preset, "batch": batch, "resolution": R, "precision": args.precision,
               "net": cfg.net.arch, "feature_net": args.feature_arch or cfg.ct.feature_arch,
               "warmup": args.warmup, "iters": args.iters, "machine": machine(device), "arms": {}}
    for name, obj in arms.items():
        torch.manual_seed(0)
        model = build_diffusion_net(cfg, Cimg, 0).to(device).train()
        opt = make_optimizer(cfg, model.parameters())
        t = time_step(model, obj, x_0, opt, device, args.precision, args.warmup, args.iters)
        med = statistics.median(t)
        results["arms"][name] = {"ms_per_step_median": round(1000 * med, 2),
                                 "ms_per_step_mean": round(1000 * statistics.mean(t), 2),
                                 "images_per_s": round(batch / med, 1)}
        print(f"{name:22s} {1000 * med:9.1f} ms/step  {batch / med:9.1f} img/s", flush=True)
    ect = results["arms"]["ECT"]["ms_per_step_median"]
    results["mfd_overhead_ratio"] = round(results["arms"]["AYT (mfd)"]["ms_per_step_median"] / ect, 3)
    print(f"MFD overhead (AYT / ECT step time): {results['mfd_overhead_ratio']:.3f}")
    out = Path(args.out or Path(__file__).parent / "results" / f"step_time_{args.preset}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
