"""One short GPU session: correctness of the device paths, then every timing a user will meet.

    PYTHONPATH=$PWD python benchmarks/gpu_check.py --out $OUT        (or: bash benchmarks/gpu_check.sh --out $OUT)
    python benchmarks/gpu_check.py --cpu-smoke --results-dir /tmp/x  (every section at tiny sizes on the CPU)

Sections, in this order, each with its own time budget (seconds, --budget NAME=S), each wrapped so that a
failure or a timeout is recorded and the next section still runs:

  env       device name, torch / CUDA / cuDNN versions, memory
  tests     `pytest -m cuda tests/test_cuda.py` in a subprocess (consistency step, samplers, MFD, FID
            features on random Inception weights, a 2-step training run with resume; they skip without CUDA)
  steps     ms/step of the ECT and AYT training steps (ayt.train.train_step, the loop's own step) on the
            CIFAR-10 DDPM++ (55.7M) + VGG16 at batch 128: fp32 (TF32 off), TF32, bf16 autocast,
            channels_last, bf16 + channels_last, and TF32 with the NaN check (one host sync) every step;
            peak GPU memory of each; the MFD overhead AYT / ECT
  parity    the default step against today's arithmetic (tests/frozen_reference.py) on this device, and
            RAdam's multi-tensor step against its per-parameter loop
  sampling  1- and 2-step sampling throughput (samples/s) at several batch sizes
  fid       FID-10k wall time: in memory (ayt.fid.fid_from_generator) vs PNG files written and read back
            as pytorch-fid does (same device, random Inception weights: the time matters, not the value)
  ddp       `torchrun --nproc-per-node=1 -m ayt train` of a few steps, then `--resume` of two more
  compile   the compiled step (torch.compile, compile=true): compile time and ms/step, TF32 and bf16,
            in a subprocess (hard timeout: whatever time is left)

Nothing is downloaded or installed: the package is imported from the repository root. Run directories
are fresh temporary directories, so the script runs any number of times in a row. It writes one JSON
(device, torch version, every number, each section's status) into --out (default $OUT, if set) and
into --results-dir (default benchmarks/results) as gpu_check-<device>.json, and prints a summary table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

SECTIONS = ("env", "tests", "steps", "parity", "sampling", "fid", "ddp", "compile")
SUBPROCESS_SECTIONS = ("compile",)  # run in a child process so a hung compile can be killed
BUDGETS = {"env": 10, "tests": 90, "steps": 100, "parity": 45, "sampling": 25, "fid": 60, "ddp": 75, "compile": 180}
TOTAL_BUDGET = 380  # seconds for the whole script (a fresh machine: < 8 minutes with its start-up)


class Budget:
    """A deadline; `left()` seconds remain; `over()` once it is passed."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def over(self) -> bool:
        return self.left() <= 0


# ----------------------------------------------------------------------------------------------
# Sizes

def sizes(args) -> dict:
    """The configuration the timings run at: CIFAR-10 scale, or tiny for --cpu-smoke."""
    if args.cpu_smoke:
        return dict(preset="cifar10-ayt", overrides={"net.arch": "tiny", "data.resolution": 16, "ct.feature_arch": "mini-vgg"},
                    batch=2, warmup=1, iters=2, sample_batches=(2, 4), fid_n=8, fid_batch=4, ddp_iters=2)
    return dict(preset="cifar10-ayt", overrides={}, batch=args.batch, warmup=3, iters=10,
                sample_batches=(128, 512, 2048), fid_n=args.fid_n, fid_batch=500, ddp_iters=4)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(device: torch.device):
    return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------
# Building the step at the benchmark configuration (random weights: speed does not depend on them)

class StepBench:
    """The CIFAR-10 DDPM++ student/teacher, a random frozen feature net, ECT and AYT objectives and the
    optimiser, timed through `ayt.train.train_step` on one fixed random batch."""

    def __init__(self, args, device: torch.device, **cfg_over):
        from ayt import consistency as C
        from ayt.augment import AUG_SETS
        from ayt.config import make_config
        from ayt.features import build_feature_net, freeze
        from ayt.losses import MFD
        from ayt.objectives import ConsistencyObjective
        from ayt.runs import build_diffusion_net
        from ayt.train import Dist, make_optimizer
        self.sz = sizes(args)
        over = {**self.sz["overrides"], "device": str(device), "batch": self.sz["batch"], "nan_check_every": 10 ** 9,
                **cfg_over}
        self.cfg = make_config(self.sz["preset"], over)
        self.device, self.d = device, Dist(device=device)
        R = self.cfg.data.resolution
        torch.manual_seed(0)
        self.model = build_diffusion_net(self.cfg, 3, 0).to(device).train()
        if self.cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = build_diffusion_net(self.cfg, 3, 0).to(device).eval().requires_grad_(False)
        self.ema.load_state_dict(self.model.state_dict())
        self.opt = make_optimizer(self.cfg, self.model.parameters())
        phi = freeze(build_feature_net(self.cfg.ct.feature_arch, resolution=R, in_channels=3,
                                       num_outputs=len(AUG_SETS["geo_clr_deg"]))).to(device)
        ct = self.cfg.ct
        sched = C.TRSchedule(ct.P_mean, ct.P_std, ct.q, ct.k, ct.b, ct.mapping)
        self.objectives = {"ECT": ConsistencyObjective(sched, "ect"),
                           "AYT": ConsistencyObjective(sched, "mfd", distance=MFD(phi))}
        g = torch.Generator().manual_seed(1)
        self.x_0 = (torch.rand(self.cfg.batch, 3, R, R, generator=g) * 2 - 1).to(device)
        self.params_m = sum(p.numel() for p in self.model.parameters()) / 1e6

    def time(self, mode: str, warmup: int, iters: int, check_every_step: bool = False) -> dict:
        """Median ms/step (warm-up excluded), images/s and peak memory of `iters` steps of `mode`."""
        from ayt.train import NonFiniteWatch, step_networks, train_step
        nets = step_networks(self.cfg, self.model, self.model)
        watch = NonFiniteWatch(self.device)
        obj = self.objectives[mode]
        times, first_s = [], None
        reset_peak(self.device)
        for i in range(warmup + iters):
            sync(self.device)
            t0 = time.perf_counter()
            train_step(self.cfg, self.d, i, nets, self.model, self.ema, obj, self.opt, lambda: (self.x_0, None), 1,
                       watch, check=check_every_step)
            sync(self.device)
            dt = time.perf_counter() - t0
            if i == 0:
                first_s = dt
            if i >= warmup:
                times.append(dt)
        med = statistics.median(times)
        return {"ms_per_step": round(1000 * med, 2), "ms_min": round(1000 * min(times), 2),
                "images_per_s": round(self.cfg.batch / med, 1), "first_step_s": round(first_s, 2),
                "peak_mem_mb": peak_mb(self.device), "iters": iters}


def _step_variants(bench_args, device, variants, budget: Budget, sz) -> dict:
    """Time ECT and AYT for each (name, tf32, cfg overrides, check_every_step) while the budget lasts."""
    out = {}
    for name, tf32, over, check in variants:
        if budget.over():
            out[name] = {"skipped": "section time budget spent"}
            continue
        set_tf32(tf32)
        try:
            bench = StepBench(bench_args, device, **over)
            res = {"batch": bench.cfg.batch, "params_M": round(bench.params_m, 2)}
            for mode in ("ECT", "AYT"):
                res[mode] = bench.time(mode, sz["warmup"], sz["iters"], check)
            res["mfd_overhead"] = round(res["AYT"]["ms_per_step"] / res["ECT"]["ms_per_step"], 3)
            out[name] = res
        except Exception as e:  # noqa: BLE001 - one variant's failure (e.g. out of memory) must not stop the others
            out[name] = {"error": f"{type(e).__name__} at batch {sz['batch']}: {str(e)[:300]}"}
        finally:
            bench = None
            reset_peak(device)
        print(f"  steps/{name}: " + json.dumps(out[name]), flush=True)
    set_tf32(False)
    return out


# ----------------------------------------------------------------------------------------------
# Sections. Each returns a JSON-able dict; exceptions are recorded by `run_section`.

def section_env(args, device, budget) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": str(device), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, memory_gb=round(p.total_memory / 2 ** 30, 1),
                    capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version(),
                    cudnn_allow_tf32_default=torch.backends.cudnn.allow_tf32,
                    matmul_allow_tf32_default=torch.backends.cuda.matmul.allow_tf32)
    else:
        info["device_name"] = "cpu (" + (platform.processor() or platform.machine()) + ")"
    return info


def section_tests(args, device, budget) -> dict:
    import importlib.util
    if importlib.util.find_spec("pytest") is None:
        raise RuntimeError("pytest is not installed on this machine: the cuda tests did not run "
                           "(the parity section still compares the step on the device)")
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(budget.left(), 1))
    except subprocess.TimeoutExpired as e:
        raise TimeoutError(f"pytest did not finish within the budget; output tail: {_tail(e.stdout)}") from None
    summary = (p.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
    res = {"command": " ".join(cmd[1:]), "returncode": p.returncode, "summary": summary, "counts": counts,
           "seconds": round(time.perf_counter() - t0, 1)}
    if p.returncode not in (0, 5):  # 5: nothing collected
        res["output_tail"] = _tail(p.stdout + p.stderr, 3000)
        raise RuntimeError(json.dumps(res))
    return res


def section_steps(args, device, budget) -> dict:
    sz = sizes(args)
    variants = [
        ("fp32", False, {}, False),
        ("tf32", True, {}, False),
        ("bf16", True, {"precision": "bf16"}, False),
        ("tf32+channels_last", True, {"channels_last": True}, False),
        ("bf16+channels_last", True, {"precision": "bf16", "channels_last": True}, False),
        ("tf32+nan_check_every_step", True, {}, True),
    ]
    return {"variants": _step_variants(args, device, variants, budget, sz)}


def section_compile(args, device, budget) -> dict:
    sz = sizes(args)
    variants = [("compiled+tf32", True, {"compile": True}, False),
                ("compiled+bf16", True, {"compile": True, "precision": "bf16"}, False)][:1 if args.cpu_smoke else 2]
    return {"variants": _step_variants(args, device, variants, budget, sz)}


def section_parity(args, device, budget) -> dict:
    """Relative differences on this device: default step vs today's arithmetic, RAdam foreach vs loop,
    TF32 and bf16 vs fp32 (what a user trades for speed)."""
    sys.path.insert(0, str(REPO / "tests"))
    try:
        import frozen_reference  # tests/frozen_reference.py: today's step arithmetic, frozen
    except ImportError as e:
        return {"skipped": f"no frozen reference of today's step ({e})"}
    set_tf32(False)
    res = frozen_reference.device_parity(device, small=args.cpu_smoke, time_left=budget.left)
    set_tf32(False)
    return res


def section_sampling(args, device, budget) -> dict:
    from ayt.sampling import sampler
    sz = sizes(args)
    set_tf32(True)
    bench = StepBench(args, device)
    net = bench.ema
    R = bench.cfg.data.resolution
    out = {"precision": "tf32", "net_params_M": round(bench.params_m, 2)}
    for steps in (1, 2):
        for b in sz["sample_batches"]:
            if budget.over():
                out[f"{steps}step_b{b}"] = {"skipped": "section time budget spent"}
                continue
            fn = sampler(net, "consistency", 3, R, 0, seed=0, device=device, steps=steps)
            fn(0, b)  # warm-up (cuDNN autotuning, allocator)
            sync(device)
            reps, t0 = 0, time.perf_counter()
            while reps < 3 or (time.perf_counter() - t0 < 1.0 and reps < 50):
                fn(reps + 1, b)
                sync(device)
                reps += 1
            dt = (time.perf_counter() - t0) / reps
            out[f"{steps}step_b{b}"] = {"samples_per_s": round(b / dt, 1), "ms_per_batch": round(1000 * dt, 2)}
    set_tf32(False)
    return out


def section_fid(args, device, budget) -> dict:
    import fid_throughput as FT
    from ayt import fid
    from ayt.sampling import sampler
    sz = sizes(args)
    set_tf32(True)
    bench = StepBench(args, device)
    R = bench.cfg.data.resolution
    sample_fn = sampler(bench.ema, "consistency", 3, R, 0, seed=0, device=device, steps=1)
    torch.manual_seed(0)
    inception = fid.InceptionV3FID().eval().requires_grad_(False).to(device)  # random weights: speed only
    n, bs = sz["fid_n"], sz["fid_batch"]
    with tempfile.TemporaryDirectory(prefix="ayt-gpu-check-fid-") as tmp:
        res = FT.compare_routes(sample_fn, n, bs, inception, device, tmp, workers=4 if device.type == "cuda" else 0)
    res["precision"] = "tf32"
    set_tf32(False)
    return res


def section_ddp(args, device, budget) -> dict:
    sz = sizes(args)
    root = tempfile.mkdtemp(prefix="ayt-gpu-check-ddp-")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = ["--preset", "demo-diffusion", f"run_root={root}", "name=ddp", f"device={device.type}",
              "data.num_images=512", "log_every=1", "ckpt_every=2", "sample_every=0",
              "log.tensorboard=false"]  # the machine may lack the optional tensorboard package
    if args.cpu_smoke:
        common += ["net.arch=tiny", "batch=4"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1", "-m", "ayt", "train"]
    out = {"run_root": root}
    try:
        for name, extra in (("train", [f"iters={sz['ddp_iters']}"]), ("resume", [f"iters={sz['ddp_iters'] + 2}", "--resume"])):
            t0 = time.perf_counter()
            try:
                p = subprocess.run(launch + common + extra, cwd=REPO, env=env, capture_output=True, text=True,
                                   timeout=max(budget.left(), 1))
            except subprocess.TimeoutExpired as e:
                raise TimeoutError(f"torchrun {name} did not finish within the budget: {_tail(e.stdout)}") from None
            out[name] = {"returncode": p.returncode, "seconds": round(time.perf_counter() - t0, 1),
                         "log_tail": _tail(p.stdout + p.stderr, 600)}
            if p.returncode != 0:
                raise RuntimeError(f"torchrun {name} failed (rc {p.returncode}): {_tail(p.stdout + p.stderr, 2000)}")
        metrics = [json.loads(l) for l in (Path(root) / "ddp" / "metrics.jsonl").read_text().splitlines() if l.strip()]
        out["iterations_logged"] = [m["iteration"] for m in metrics if "iteration" in m]
        out["note"] = "one process: WORLD_SIZE=1, so the loop runs without a DDP wrapper (torchrun launch and resume only)"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


SECTION_FNS = {"env": section_env, "tests": section_tests, "steps": section_steps, "parity": section_parity,
               "sampling": section_sampling, "fid": section_fid, "ddp": section_ddp, "compile": section_compile}


# ----------------------------------------------------------------------------------------------
# Running sections: in process, or in a child process with a hard timeout

def _tail(text, n: int = 1200) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text[-n:]


def _fail_injected(name: str) -> None:
    """Test hook: AYT_GPU_CHECK_FAIL=<section> makes that section raise (tests/test_gpu_check.py)."""
    if name in os.environ.get("AYT_GPU_CHECK_FAIL", "").split(","):
        raise RuntimeError(f"injected failure in section {name!r} (AYT_GPU_CHECK_FAIL)")


def run_section(name: str, args, device, seconds: float) -> dict:
    t0 = time.perf_counter()
    budget = Budget(seconds)
    rec = {"budget_s": round(seconds, 1)}
    try:
        _fail_injected(name)
        if name in SUBPROCESS_SECTIONS and not args.child_out:
            rec["result"] = _run_child(name, args, seconds)
        else:
            rec["result"] = SECTION_FNS[name](args, device, budget)
        rec["status"] = "ok"
    except Exception as e:  # one section's failure must not stop the others
        rec["status"] = "timeout" if isinstance(e, (TimeoutError, subprocess.TimeoutExpired)) else "error"
        rec["error"] = f"{type(e).__name__}: {e}"[:4000]
        rec["traceback"] = _tail(traceback.format_exc(), 3000)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def _run_child(name: str, args, seconds: float) -> dict:
    fd, child_out = tempfile.mkstemp(prefix=f"ayt-gpu-check-{name}-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--child-out", child_out,
           "--device", args.device, "--batch", str(args.batch), "--fid-n", str(args.fid_n),
           "--budget", f"{name}={max(seconds - 15, 5):.0f}"] + (["--cpu-smoke"] if args.cpu_smoke else [])
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(seconds, 1))
        sys.stdout.write(p.stdout)
        data = json.loads(Path(child_out).read_text()) if Path(child_out).stat().st_size else None
        if data is None:
            raise RuntimeError(f"child process wrote no result (rc {p.returncode}): {_tail(p.stderr, 2000)}")
        rec = data["sections"][name]
        if rec["status"] != "ok":
            raise RuntimeError(rec.get("error", "child section failed"))
        return rec["result"]
    except subprocess.TimeoutExpired as e:
        partial = _partial_variants(_tail(e.stdout, 10 ** 6))
        raise TimeoutError(f"section {name!r} killed after {seconds:.0f} s (hard timeout); variants finished "
                           f"before: {json.dumps(partial)}") from None
    finally:
        Path(child_out).unlink(missing_ok=True)


def _partial_variants(stdout: str) -> dict:
    """The variants a killed child finished: the `  steps/<name>: {json}` lines it printed."""
    out = {}
    for m in re.finditer(r"^  steps/(\S+): (\{.*\})$", stdout, flags=re.M):
        out[m.group(1)] = json.loads(m.group(2))
    return out


def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "device"


def summary_lines(report: dict) -> list[str]:
    lines = [f"gpu_check on {report['device_name']} | torch {report['torch']} | {report['total_seconds']:.0f} s",
             f"{'section':10s} {'status':8s} {'s':>6s}"]
    for name, rec in report["sections"].items():
        lines.append(f"{name:10s} {rec['status']:8s} {rec['seconds']:6.1f}" + (f"  {rec['error'][:90]}" if rec.get("error") else ""))
    steps = {**report["sections"].get("steps", {}).get("result", {}).get("variants", {}),
             **report["sections"].get("compile", {}).get("result", {}).get("variants", {})}
    if steps:
        lines.append(f"{'step variant':28s} {'ECT ms':>9s} {'AYT ms':>9s} {'AYT/ECT':>8s} {'peak MB':>9s}")
        for name, v in steps.items():
            if "ECT" in v:
                lines.append(f"{name:28s} {v['ECT']['ms_per_step']:9.2f} {v['AYT']['ms_per_step']:9.2f} "
                             f"{v['mfd_overhead']:8.3f} {str(v['AYT']['peak_mem_mb']):>9s}")
            else:
                lines.append(f"{name:28s} {v.get('skipped') or v.get('error')}")
    samp = report["sections"].get("sampling", {}).get("result", {})
    for k, v in samp.items():
        if isinstance(v, dict) and "samples_per_s" in v:
            lines.append(f"sampling {k:18s} {v['samples_per_s']:10.1f} samples/s")
    fidr = report["sections"].get("fid", {}).get("result", {})
    if "in_memory" in fidr:
        lines.append(f"FID-{fidr['n']}: in memory {fidr['in_memory']['total_s']:.1f} s | PNG route "
                     f"{fidr['png_route']['total_s']:.1f} s")
    return lines


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON (default: $OUT)")
    ap.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: exercises every section")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--fid-n", type=int, default=10_000)
    ap.add_argument("--only", default=None, help="comma-separated sections (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--total-budget", type=float, default=TOTAL_BUDGET)
    ap.add_argument("--budget", action="append", default=[], help="NAME=SECONDS, per section")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)     # child mode: one section
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.device = "cpu"
    device = torch.device(args.device)
    budgets = dict(BUDGETS)
    for item in args.budget:
        k, _, v = item.partition("=")
        if k not in SECTIONS:
            ap.error(f"--budget {item}: unknown section {k!r}; sections: {', '.join(SECTIONS)}")
        budgets[k] = float(v)
    names = [args.section] if args.section else [s for s in (args.only.split(",") if args.only else SECTIONS)
                                                    if s not in args.skip.split(",")]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; sections: {', '.join(SECTIONS)}")

    t_start = time.perf_counter()
    total = Budget(args.total_budget)
    tf32_before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    report = {"benchmark": "gpu_check", "cpu_smoke": args.cpu_smoke, "torch": torch.__version__,
              "device": str(device), "device_name": section_env(args, device, total).get("device_name"),
              "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "sections": {}}
    fname = f"gpu_check-{device_slug(report['device_name'] or str(device))}" + ("-cpu-smoke" if args.cpu_smoke else "") + ".json"

    def write(final: bool) -> None:
        """The JSON after every section (a run killed from outside keeps what it measured)."""
        if args.child_out:
            Path(args.child_out).write_text(json.dumps(report))
            return
        report["complete"] = final
        text = json.dumps(report, indent=2) + "\n"
        for d in [args.results_dir] + ([args.out] if args.out else []):
            Path(d).mkdir(parents=True, exist_ok=True)
            tmp = Path(d) / (fname + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, Path(d) / fname)
            if final:
                print(f"-> {Path(d) / fname}")

    for name in names:
        seconds = budgets[name] if args.section else min(budgets[name], max(total.left(), 0))
        if seconds <= 0:
            report["sections"][name] = {"status": "skipped", "seconds": 0.0, "error": "total time budget spent"}
            continue
        print(f"[gpu_check] {name} (budget {seconds:.0f} s, {total.left():.0f} s left in total)", flush=True)
        report["sections"][name] = run_section(name, args, device, seconds)
        rec = report["sections"][name]
        print(f"[gpu_check] {name}: {rec['status']} in {rec['seconds']} s" + (f" | {rec['error'][:300]}" if rec.get("error") else ""),
              flush=True)
        report["total_seconds"] = round(time.perf_counter() - t_start, 1)
        write(final=False)
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_before
    write(final=True)
    if not args.child_out:
        print("\n".join(summary_lines(report)), flush=True)
    return report


if __name__ == "__main__":
    main()
