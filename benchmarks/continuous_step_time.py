"""Step time of the continuous-time modes beside ECT and AYT, the JVP's cost, and the tangent
diagnostic's overhead.

Arms (one optimiser step each, warm-up excluded, same batch, randomly initialised networks):
ECT, AYT (mfd), CCD, CCD-AYT, CT, CT-AYT (ayt.continuous; the CCD teacher is a second network of the
same architecture in eval mode), and CT with the double-backward JVP fallback. Separately:
the student forward alone, its JVP along (v, 1) by torch.func.jvp and by double backward
(`jvp_over_forward`), and one evaluation of the live tangent diagnostic (ayt.diagnostic) for the ECT
and CCD objectives, with its overhead at diagnostic.every = 100 relative to the ECT step.

    python benchmarks/continuous_step_time.py --preset mini-ayt --batch 16 --device cpu
    python benchmarks/continuous_step_time.py --preset cifar10-ayt --batch 128 --device cuda

On a shared machine the load average (recorded at start and end) inflates every arm; compare ratios.
Results (with the machine) go to benchmarks/results/continuous_step_time_<preset>_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ayt import consistency as C
from ayt import continuous as CT
from ayt.augment import AUG_SETS
from ayt.config import make_config
from ayt.data import ShapesDataset
from ayt.diagnostic import TangentDiagnostic
from ayt.features import build_feature_net, freeze
from ayt.losses import MFD
from ayt.objectives import ConsistencyObjective
from ayt.runs import build_diffusion_net
from ayt.train import make_optimizer
from step_time import machine, time_step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, warmup: int, iters: int) -> float:
    """Median seconds of fn()."""
    times = []
    for i in range(warmup + iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini-ayt")
    ap.add_argument("--batch", type=int, default=None, help="default: the preset's batch")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--feature-arch", default=None, help="default: the preset's ct.feature_arch")
    ap.add_argument("--diag-samples", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    cfg = make_config(args.preset)
    device = torch.device(args.device)
    batch = args.batch or cfg.batch
    R, Cimg = cfg.data.resolution, 3
    x_0 = torch.rand(batch, Cimg, R, R, device=device) * 2 - 1
    phi = freeze(build_feature_net(args.feature_arch or cfg.ct.feature_arch, resolution=R, in_channels=Cimg,
                                   num_outputs=len(AUG_SETS["geo_clr_deg"]))).to(device)
    torch.manual_seed(1)
    teacher = build_diffusion_net(cfg, Cimg, 0).to(device).eval().requires_grad_(False)
    sched = C.TRSchedule(cfg.ct.P_mean, cfg.ct.P_std, cfg.ct.q, cfg.ct.k, cfg.ct.b, cfg.ct.mapping)
    arms = {
        "ECT": lambda: ConsistencyObjective(sched, "ect"),
        "AYT (mfd)": lambda: ConsistencyObjective(sched, "mfd", distance=MFD(phi)),
        "CCD": lambda: CT.ContinuousObjective("ccd", denoiser=teacher),
        "CCD-AYT": lambda: CT.ContinuousObjective("ccd-ayt", denoiser=teacher, phi=phi),
        "CT": lambda: CT.ContinuousObjective("cct"),
        "CT-AYT": lambda: CT.ContinuousObjective("cct-ayt", phi=phi),
        "CT, double-backward JVP": lambda: CT.ContinuousObjective("cct", jvp="double-backward"),
    }
    results = {"preset": args.preset, "batch": batch, "resolution": R, "precision": args.precision,
               "net": cfg.net.arch, "feature_net": args.feature_arch or cfg.ct.feature_arch,
               "warmup": args.warmup, "iters": args.iters, "machine": machine(device),
               "load_average_1min_at_start": round(os.getloadavg()[0], 2), "arms": {}}
    for name, make in arms.items():
        torch.manual_seed(0)
        model = build_diffusion_net(cfg, Cimg, 0).to(device).train()
        opt = make_optimizer(cfg, model.parameters())
        t = time_step(model, make(), x_0, opt, device, args.precision, args.warmup, args.iters)
        med = statistics.median(t)
        results["arms"][name] = {"ms_per_step_median": round(1000 * med, 2),
                                 "ms_per_step_mean": round(1000 * statistics.mean(t), 2),
                                 "images_per_s": round(batch / med, 1)}
        print(f"{name:26s} {1000 * med:9.1f} ms/step  {batch / med:9.1f} img/s", flush=True)
    ect = results["arms"]["ECT"]["ms_per_step_median"]
    results["ratio_to_ect"] = {k: round(v["ms_per_step_median"] / ect, 3) for k, v in results["arms"].items()}

    # The JVP alone against one forward of the student (train mode, no graph).
    torch.manual_seed(0)
    model = build_diffusion_net(cfg, Cimg, 0).to(device).train()
    t_n = (cfg.ct.P_mean + cfg.ct.P_std * torch.randn(batch, device=device)).exp()
    v = torch.randn_like(x_0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def forward():
        with torch.no_grad(), autocast:
            model(x_0, t_n)

    def jvp(impl):
        j = CT.JVP(impl)

        def run():
            with autocast:
                CT.output_tangent(model, x_0, t_n, v, jvp=j)
        return run
    fwd = time_call(forward, device, args.warmup, args.iters)
    jf = time_call(jvp("func"), device, args.warmup, args.iters)
    jb = time_call(jvp("double-backward"), device, args.warmup, args.iters)
    results["jvp"] = {"forward_ms": round(1000 * fwd, 2), "jvp_func_ms": round(1000 * jf, 2),
                      "jvp_double_backward_ms": round(1000 * jb, 2),
                      "jvp_func_over_forward": round(jf / fwd, 3), "jvp_double_backward_over_forward": round(jb / fwd, 3)}
    print(f"forward {1000 * fwd:.1f} ms | jvp (torch.func) {1000 * jf:.1f} ms ({jf / fwd:.2f}x) | "
          f"jvp (double backward) {1000 * jb:.1f} ms ({jb / fwd:.2f}x)", flush=True)

    # The live tangent diagnostic (shapes data at this resolution: exact bases) for two objectives.
    ds = ShapesDataset(n=2048, resolution=R, seed=0)
    results["diagnostic"] = {"samples": args.diag_samples}
    for name in ("ECT", "CCD"):
        t0 = time.perf_counter()
        diag = TangentDiagnostic(arms[name](), ds, device, n=args.diag_samples)
        build_s = time.perf_counter() - t0
        once = time_call(lambda: diag(model, 10**6), device, 1, max(3, args.iters // 2))
        step = results["arms"][name]["ms_per_step_median"] / 1000
        results["diagnostic"][name] = {"basis_build_s": round(build_s, 3), "ms_per_evaluation": round(1000 * once, 2),
                                       "overhead_at_every_100": round(once / (100 * step), 5)}
        print(f"diagnostic ({name}): basis {build_s:.2f} s once, {1000 * once:.1f} ms per evaluation = "
              f"{100 * once / (100 * step):.2f}% of training time at diagnostic.every=100", flush=True)
    results["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out or Path(__file__).parent / "results" / f"continuous_step_time_{args.preset}_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
