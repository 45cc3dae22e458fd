"""Sampling and FID throughput: samples/s of the 1- and 2-step samplers, and the wall time of an FID
of N samples in memory (ayt: sample, quantise, Inception and float64 statistics on the device, no
host round trip per batch) against the authors' route (EDM's generate.py writes PNG files, pytorch-fid
reads them back, same device, features to the host per batch, np.cov and scipy's sqrtm).

Networks and Inception have random weights (speed does not depend on them, nothing is downloaded);
both FID routes see the same samples, and their FIDs agree (the in-memory quantisation is the PNG
round trip). Sampling is timed with the network on slices of the batch (the default on the CPU,
ayt.sampling.CPU_CHUNK) and on the whole batch (before), interleaved.

    python benchmarks/fid_throughput.py --device cpu --threads 1 --net mini-shapes16 --n 500
    python benchmarks/fid_throughput.py --device cuda --net ddpmpp-cifar10 --n 10000 --batch-size 500

Results are written to benchmarks/results/fid_throughput_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import PIL
import scipy
import torch
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ayt import fid  # noqa: E402

N_TARGET = 10_000


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pillow": PIL.__version__,
        "device": str(device),
        "device_name": _cpu_name(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    return info


class _PNGFiles(torch.utils.data.Dataset):
    """PNG files read back as pytorch-fid's ImagePathDataset does (PIL, RGB), as uint8 [3, H, W]."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(Image.open(self.files[i]).convert("RGB"))).permute(2, 0, 1)


def _reference(device_feats_dim: int = fid.FEATURE_DIM):
    """Stand-in reference statistics (zero mean, identity covariance): only the time is compared."""
    return np.zeros(device_feats_dim), np.eye(device_feats_dim)


def fid_in_memory(sample_fn, n, batch_size, extractor, device) -> dict:
    """FID of n samples the way ayt evaluates: sample, quantise, Inception and the float64 statistics
    all on `device` (ayt.fid.fid_from_generator), eigh Frechet distance."""
    mu, sigma = _reference()
    _sync(device)
    t0 = time.perf_counter()
    value = fid.fid_from_generator(sample_fn, n, batch_size, mu, sigma, extractor=extractor, device=device)
    total = time.perf_counter() - t0
    return {"total_s": total, "samples_per_s": n / total, "fid": value}


def fid_png_route(sample_fn, n, batch_size, extractor, device, tmpdir, workers: int = 4) -> dict:
    """FID of the same n samples the way the authors' code does: EDM's generate.py writes PNG files
    (quantise, PIL), then pytorch-fid reads them back (DataLoader, PIL), runs Inception on `device`,
    moves each batch of features to the host, and computes np.cov and scipy's sqrtm Frechet distance."""
    mu, sigma = _reference()
    _sync(device)
    t0 = time.perf_counter()
    for b in range((n + batch_size - 1) // batch_size):
        u = fid.quantize(sample_fn(b, min(batch_size, n - b * batch_size))).permute(0, 2, 3, 1).cpu().numpy()
        for i, a in enumerate(u):
            Image.fromarray(a, "RGB").save(os.path.join(tmpdir, f"{b * batch_size + i:06d}.png"))
    write_s = time.perf_counter() - t0
    files = sorted(os.path.join(tmpdir, f) for f in os.listdir(tmpdir) if f.endswith(".png"))
    t1 = time.perf_counter()
    loader = torch.utils.data.DataLoader(_PNGFiles(files), batch_size=batch_size, num_workers=workers)
    acts = np.empty((len(files), fid.FEATURE_DIM))
    start = 0
    with torch.no_grad():
        for u in loader:
            acts[start:start + len(u)] = extractor(u.to(device)).cpu().numpy()
            start += len(u)
    extract_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    m, s = np.mean(acts, axis=0), np.cov(acts, rowvar=False)
    stats_s = time.perf_counter() - t2
    t3 = time.perf_counter()
    try:
        value, method = fid.frechet_distance(m, s, mu, sigma, method="sqrtm"), "sqrtm"
    except ValueError:  # scipy's sqrtm on rank-deficient statistics (few samples): fall back, note it
        value, method = fid.frechet_distance(m, s, mu, sigma), "eigh (sqrtm failed)"
    frechet_s = time.perf_counter() - t3
    return {"write_png_s": write_s, "read_extract_s": extract_s, "stats_s": stats_s, "frechet_s": frechet_s,
            "frechet_method": method, "total_s": time.perf_counter() - t0, "fid": value, "files": len(files)}


def compare_routes(sample_fn, n, batch_size, extractor, device, tmpdir, workers: int = 4, repeats: int = 1) -> dict:
    """FID-n wall time in memory vs the PNG route on the same samples and device, the routes alternating
    `repeats` times (the fastest of each is reported: both see the same machine load); the two FIDs
    agree (the in-memory quantisation is the PNG round trip) up to the Frechet method and rounding."""
    with torch.no_grad():  # warm-up (cuDNN autotuning, allocator)
        extractor(fid.quantize(sample_fn(0, min(batch_size, 8))))
    mems, pngs = [], []
    for r in range(repeats):
        mems.append(fid_in_memory(sample_fn, n, batch_size, extractor, device))
        sub = os.path.join(tmpdir, f"run{r}")
        os.makedirs(sub)
        pngs.append(fid_png_route(sample_fn, n, batch_size, extractor, device, sub, workers))
    mem, png = min(mems, key=lambda m: m["total_s"]), min(pngs, key=lambda p: p["total_s"])
    return {"n": n, "batch_size": batch_size, "workers": workers, "repeats": repeats, "in_memory": mem,
            "png_route": png, "png_over_memory_time": png["total_s"] / mem["total_s"],
            "all_totals_s": {"in_memory": [m["total_s"] for m in mems], "png_route": [p["total_s"] for p in pngs]},
            "fid_rel_diff": abs(png["fid"] - mem["fid"]) / max(abs(mem["fid"]), 1e-12)}


def sampling_throughput(net, device, resolution, batches, steps_list=(1, 2), min_s: float = 1.0) -> dict:
    """samples/s per (steps, batch), with the network on slices (default) and on the whole batch, interleaved."""
    from ayt import sampling
    default_chunk = sampling.CPU_CHUNK
    out = {}
    for steps in steps_list:
        for b in batches:
            times = {"sliced": [], "whole": []}
            for rep in range(3):
                for arm in ("sliced", "whole"):
                    sampling.CPU_CHUNK = default_chunk if arm == "sliced" else None
                    fn = sampling.sampler(net, "consistency", 3, resolution, 0, seed=0, device=device, steps=steps)
                    if rep == 0:
                        fn(0, b)  # warm-up
                    _sync(device)
                    t0, k = time.perf_counter(), 0
                    while k < 1 or time.perf_counter() - t0 < min_s / 3:
                        fn(k + 1, b)
                        _sync(device)
                        k += 1
                    times[arm].append((time.perf_counter() - t0) / k)
            sampling.CPU_CHUNK = default_chunk
            rec = {arm: round(b / min(t), 2) for arm, t in times.items()}
            rec["sliced_over_whole"] = round(rec["sliced"] / rec["whole"], 3)
            out[f"{steps}step_b{b}"] = rec
            print(f"  {steps}-step batch {b}: {rec['sliced']:.1f} samples/s sliced, {rec['whole']:.1f} whole", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--net", default="mini-shapes16", help="ayt.networks.NETWORK_CONFIGS name (random weights)")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--n", type=int, default=N_TARGET, help="samples of the FID comparison")
    ap.add_argument("--batch-size", type=int, default=None, help="FID batch (default 500 on GPU, 50 on CPU)")
    ap.add_argument("--sample-batches", default="4,16,64,256", help="batch sizes of the sampling throughput")
    ap.add_argument("--workers", type=int, default=None, help="PNG reader processes (default: min(8, cpus), as pytorch-fid)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two FID routes this many times")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/fid_throughput_<device>.json)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    bs = args.batch_size or (500 if device.type == "cuda" else 50)
    workers = args.workers if args.workers is not None else min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    from ayt.networks import build_network
    from ayt.sampling import sampler
    torch.manual_seed(0)
    net = build_network(args.net, img_resolution=args.resolution, img_channels=3).eval().to(device)
    result = {"benchmark": "fid_throughput", "machine": machine_info(device),
              "command": "python benchmarks/fid_throughput.py " + " ".join(sys.argv[1:]),
              "settings": {"net": args.net, "net_params_M": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
                           "resolution": args.resolution, "n": args.n, "batch_size": bs, "workers": workers,
                           "weights": "random init (speed only)", "dtype": "float32"}}
    print("sampling throughput", flush=True)
    result["sampling"] = sampling_throughput(net, device, args.resolution,
                                             [int(b) for b in args.sample_batches.split(",") if b])
    torch.manual_seed(0)
    inception = fid.InceptionV3FID().eval().requires_grad_(False).to(device)
    sample_fn = sampler(net, "consistency", 3, args.resolution, 0, seed=0, device=device, steps=1)
    print(f"FID-{args.n}: in memory vs PNG route", flush=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        result["fid"] = compare_routes(sample_fn, args.n, bs, inception, device, tmpdir, workers, args.repeats)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"fid_throughput_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    r = result["fid"]
    print(json.dumps(r, indent=2))
    print(f"wrote {out}")
    print(f"FID-{args.n}: in memory {r['in_memory']['total_s']:.1f} s ({r['in_memory']['samples_per_s']:.1f} samples/s) | "
          f"PNG route {r['png_route']['total_s']:.1f} s ({r['png_over_memory_time']:.2f}x) | FID rel. diff {r['fid_rel_diff']:.2g}")


if __name__ == "__main__":
    main()
