"""FID feature-extraction throughput: in-memory quantisation (ayt.fid) vs the PNG round trip.

Measures, on one device:
  * images/s of InceptionV3FID (pytorch-fid layout, random weights: the speed does not depend on
    the weight values, so nothing is downloaded) on 32x32 images resized to 299x299, fed as
    quantised uint8 tensors kept in memory (what `ayt.fid.fid_from_generator` does);
  * the same images written as PNG files with PIL, read back and extracted (what the AYT
    reference code does via pytorch-fid), timed per phase, and checked to give identical features;
  * the time of the Frechet distance on 2048-d statistics;
  * the resulting wall time of a 10k-sample FID. When `--n` < 10000 the 10k figure is
    extrapolated linearly from the measured per-image time (marked "extrapolated" in the JSON).

Usage:
    python benchmarks/fid_throughput.py --device cpu --n 256
    python benchmarks/fid_throughput.py --device cuda --n 10000 --batch-size 250
Results are printed and written to benchmarks/results/fid_throughput_<device>.json.
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


def _images(b: int, size: int, res: int) -> torch.Tensor:
    """Batch b of deterministic random 'generated' images in [-1, 1], [size, 3, res, res]."""
    g = torch.Generator().manual_seed(b)
    return torch.rand(size, 3, res, res, generator=g) * 2 - 1


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


def write_read_png(n, batch_size, res, tmpdir):
    """EDM/AYT path up to the feature extractor: quantise, save PNGs with PIL, read them back.

    Returns (write seconds, read seconds, list of HWC uint8 arrays in file order)."""
    t0 = time.perf_counter()
    for b in range((n + batch_size - 1) // batch_size):
        u = fid.quantize(_images(b, min(batch_size, n - b * batch_size), res))
        for i, a in enumerate(u.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(a, "RGB").save(os.path.join(tmpdir, f"{b * batch_size + i:06d}.png"))
    write_s = time.perf_counter() - t0
    files = sorted(os.listdir(tmpdir))
    t0 = time.perf_counter()
    arrays = [np.array(Image.open(os.path.join(tmpdir, f)).convert("RGB")) for f in files]
    read_s = time.perf_counter() - t0
    return write_s, read_s, arrays


def extract_both(net, n, png_arrays, batch_size, res, device):
    """Feature extraction for both paths, interleaved batch by batch so that both see the same
    machine load: in memory (quantise + Inception) and from the PNG arrays (stack + Inception).

    Returns (in-memory seconds, PNG seconds, in-memory stats, PNG stats). Generating the random
    'samples' is not timed (it stands in for the sampler, which both paths share)."""
    mem_stats = fid.FeatureStats(fid.FEATURE_DIM, device=device)
    png_stats = fid.FeatureStats(fid.FEATURE_DIM, device=device)
    mem_s = png_s = 0.0
    png_n = len(png_arrays)
    for b in range((n + batch_size - 1) // batch_size):
        x = _images(b, min(batch_size, n - b * batch_size), res)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            mem_stats.update(net(fid.quantize(x.to(device))))
        _sync(device)
        mem_s += time.perf_counter() - t0
        lo, hi = b * batch_size, min((b + 1) * batch_size, png_n)
        if lo < hi:
            t0 = time.perf_counter()
            u = torch.from_numpy(np.stack(png_arrays[lo:hi])).permute(0, 3, 1, 2).contiguous()
            with torch.no_grad():
                png_stats.update(net(u.to(device)))
            _sync(device)
            png_s += time.perf_counter() - t0
    return mem_s, png_s, mem_stats, png_stats


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


def compare_routes(sample_fn, n, batch_size, extractor, device, tmpdir, workers: int = 4) -> dict:
    """FID-n wall time in memory vs the PNG route on the same samples and device; the two FIDs agree
    (the in-memory quantisation is the PNG round trip) up to the Frechet method and kernel rounding."""
    with torch.no_grad():  # warm-up (cuDNN autotuning, allocator)
        extractor(fid.quantize(sample_fn(0, min(batch_size, 8))))
    mem = fid_in_memory(sample_fn, n, batch_size, extractor, device)
    png = fid_png_route(sample_fn, n, batch_size, extractor, device, tmpdir, workers)
    return {"n": n, "batch_size": batch_size, "workers": workers, "in_memory": mem, "png_route": png,
            "png_over_memory_time": png["total_s"] / mem["total_s"],
            "fid_rel_diff": abs(png["fid"] - mem["fid"]) / max(abs(mem["fid"]), 1e-12)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--n", type=int, default=N_TARGET, help="images per path (10k figure extrapolated if smaller)")
    ap.add_argument("--png-n", type=int, default=None, help="images for the PNG round trip (default: --n)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 250 on GPU, 50 on CPU")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--sqrtm", action="store_true", help="also time pytorch-fid's scipy sqrtm Frechet distance")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/fid_throughput_<device>.json)")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    bs = args.batch_size or (250 if device.type == "cuda" else 50)
    n, png_n, res = args.n, args.png_n or args.n, args.resolution
    if n < 2 or png_n < 2:
        raise SystemExit("--n and --png-n must be at least 2")

    torch.manual_seed(0)  # random weights; only the speed is measured
    net = fid.InceptionV3FID().eval().requires_grad_(False).to(device)
    with torch.no_grad():  # warm-up (cuDNN autotuning, allocator, thread pools)
        net(fid.quantize(_images(10_000, min(bs, 8), res)).to(device))
    _sync(device)

    with tempfile.TemporaryDirectory() as tmpdir:
        write_s, read_s, arrays = write_read_png(png_n, bs, res, tmpdir)
    mem_s, png_extract_s, mem_stats, png_stats = extract_both(net, n, arrays, bs, res, device)

    # Same images -> same uint8 -> same features: the PNG round trip changes nothing but the time.
    check = {}
    if n == png_n:
        check["png_vs_memory_max_abs_mean_diff"] = float(np.abs(mem_stats.mean() - png_stats.mean()).max())

    t0 = time.perf_counter()
    mem_stats.mean(), mem_stats.cov()
    stats_s = time.perf_counter() - t0
    # Frechet distance timing on full-rank 2048-d statistics (measured ones are singular for n < 2048).
    rng = np.random.default_rng(0)
    sigma1, sigma2 = (np.cov(rng.standard_normal((2 * fid.FEATURE_DIM, fid.FEATURE_DIM)), rowvar=False)
                      for _ in range(2))
    mu1, mu2 = rng.standard_normal(fid.FEATURE_DIM), rng.standard_normal(fid.FEATURE_DIM)
    t0 = time.perf_counter()
    fd = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    fd_s = time.perf_counter() - t0
    fd_sqrtm_s = None
    if args.sqrtm:
        t0 = time.perf_counter()
        fd_sqrtm = fid.frechet_distance(mu1, sigma1, mu2, sigma2, method="sqrtm")
        fd_sqrtm_s = time.perf_counter() - t0
        check["frechet_eigh_minus_sqrtm_rel"] = (fd - fd_sqrtm) / fd_sqrtm

    per_img_mem = mem_s / n
    per_img_png = (write_s + read_s + png_extract_s) / png_n
    result = {
        "benchmark": "fid_throughput",
        "machine": machine_info(device),
        "settings": {"n": n, "png_n": png_n, "batch_size": bs, "resolution": res, "input_size": fid.INPUT_SIZE,
                     "weights": "random init (speed only)", "dtype": "float32"},
        "in_memory": {"seconds": mem_s, "images_per_s": n / mem_s},
        "png_round_trip": {"write_s": write_s, "read_s": read_s, "extract_s": png_extract_s,
                           "write_read_ms_per_image": 1000 * (write_s + read_s) / png_n,
                           "images_per_s": png_n / (write_s + read_s + png_extract_s),
                           "extract_images_per_s": png_n / png_extract_s},
        "frechet": {"feature_dim": fid.FEATURE_DIM, "stats_s": stats_s, "eigh_s": fd_s, "sqrtm_s": fd_sqrtm_s},
        "fid_10k": {
            "extrapolated": n < N_TARGET or png_n < N_TARGET,
            "in_memory_s": per_img_mem * N_TARGET + stats_s + fd_s,
            "png_round_trip_s": per_img_png * N_TARGET + stats_s + fd_s,
        },
        "check": check,
    }
    print(json.dumps(result, indent=2))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"fid_throughput_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    print(f"in-memory {n / mem_s:.1f} img/s | PNG round trip {png_n / (write_s + read_s + png_extract_s):.1f} img/s"
          f" | 10k FID ~{result['fid_10k']['in_memory_s']:.0f} s in memory,"
          f" ~{result['fid_10k']['png_round_trip_s']:.0f} s via PNG"
          + (" (extrapolated)" if result["fid_10k"]["extrapolated"] else ""))


if __name__ == "__main__":
    main()
