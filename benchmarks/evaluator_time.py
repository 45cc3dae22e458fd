"""How long the offline evaluation pieces take: building the photos data, training each evaluator, and
scoring 2,000 samples with FD_eval (+ extras) and with SWD.

Measures, on one device, with a fresh data root (nothing cached beforehand):
  * photos data: building the training and held-out crop sets (50,000 crops each by default, 16 px) from
    scikit-image's photographs, and reading them back from the cache;
  * evaluator training: the shapes evaluator (regression, 20,000 images) and the photos classifier
    (20,000 training crops), `--steps` steps each at batch 128 (3,000: the default of `ayt eval`), with the
    classifier's accuracy on 2,000 held-out crops;
  * scoring `--n` samples (2,000) on the photos data: FD_eval with its extras (features, Frechet
    distance, precision/recall, multi-scale SWD) and SWD alone, timed per piece. The "samples" are
    real training crops, so the scores are also the floor a perfect model of the training crops reaches
    against the held-out strip (recorded as `held_out_floor`); pure noise is scored once for scale.

Usage:
    python benchmarks/evaluator_time.py                  # the full measurement (~30 min on 2 busy CPU cores)
    python benchmarks/evaluator_time.py --steps 100 --crops 5000 --n 500   # a quick check
Results are printed and written to benchmarks/results/evaluator_time_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine_info(device: torch.device) -> dict:
    """fid_throughput's machine record, plus the scikit-image version and the load at the start."""
    import skimage
    from fid_throughput import machine_info as base_info  # benchmarks/ is this script's directory
    return {**base_info(device), "scikit-image": skimage.__version__,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--crops", type=int, default=50000, help="crops per photos split (data.num_images)")
    p.add_argument("--steps", type=int, default=3000, help="evaluator training steps (ayt eval: 3000)")
    p.add_argument("--n", type=int, default=2000, help="samples scored")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/evaluator_time_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    root = tempfile.mkdtemp(prefix="ayt-evaluator-time-")
    os.environ["AYT_DATA_ROOT"] = os.path.join(root, "data")  # fresh: nothing cached
    os.environ.setdefault("AYT_PROGRESS", "plain")
    from ayt import data as D
    from ayt import evaluate as E
    from ayt.config import make_config

    R = args.resolution
    result: dict = {"benchmark": "evaluator_time", "machine": machine_info(device),
                    "settings": {"resolution": R, "crops_per_split": args.crops, "evaluator_steps": args.steps,
                                 "evaluator_batch": 128, "n_scored": args.n, "photo_downscale": D.PHOTO_DOWNSCALE,
                                 "photo_evaluator_images": E.PHOTO_EVALUATOR_IMAGES,
                                 "swd": "ProGAN: 128 7x7 patches per image and level, 4 x 128 directions"},
                    "command": "python benchmarks/evaluator_time.py " + " ".join(argv if argv is not None else sys.argv[1:])}

    # 1. The photos data: build both splits from the photographs, then read them back from the cache.
    D.load_photos.cache_clear()
    _, t_train = _timed(lambda: D.PhotoCropsDataset(None, "train", R, args.crops, 0), device)
    _, t_test = _timed(lambda: D.PhotoCropsDataset(None, "test", R, args.crops, 0), device)
    _, t_cached = _timed(lambda: D.PhotoCropsDataset(None, "train", R, args.crops, 0), device)
    result["photos_data"] = {"build_train_s": t_train, "build_test_s": t_test, "load_cached_s": t_cached}
    print(f"[bench] photos data: train split {t_train:.2f} s, test split {t_test:.2f} s, cached {t_cached:.3f} s",
          flush=True)

    # 2. Evaluators, trained exactly as `ayt eval` trains them (progress lines come from ayt.progress).
    _, t_shapes = _timed(lambda: E.shapes_evaluator(R, None, device, steps=args.steps), device)
    cfg = make_config(None, {"stage": "diffusion", "data.name": "photos", "data.resolution": R,
                             "data.num_images": args.crops})
    from ayt.runs import build_dataset
    train_ds = build_dataset(cfg)
    test_ds = build_dataset(E._data_variant(cfg, split="test"))
    clf, t_clf = _timed(lambda: E.classifier_evaluator(cfg, train_ds, None, device, args.steps, test_ds), device)
    result["evaluator_training"] = {
        "shapes": {"seconds": t_shapes, "steps_per_s": args.steps / t_shapes, "train_images": 20000},
        "photos_classifier": {"seconds": t_clf, "steps_per_s": args.steps / t_clf,
                              "train_images": E.PHOTO_EVALUATOR_IMAGES, "held_out_accuracy": clf.meta["accuracy"],
                              "accuracy_images": 2000}}
    print(f"[bench] evaluators: shapes {t_shapes:.1f} s, photos classifier {t_clf:.1f} s "
          f"(held-out accuracy {clf.meta['accuracy']:.3f})", flush=True)

    # 3. Scoring n samples (real training crops stand in for generated ones; sampling is not timed).
    ecfg = E.EvalConfig(metric="fd_eval", n=args.n, runs=1, batch=500, ref_images=args.crops,
                        evaluator_steps=args.steps, device=str(device))
    space, t_space = _timed(lambda: E.FeatureSpace(cfg, ecfg, device, dataset=train_ds), device)
    idx = torch.randperm(len(train_ds), generator=torch.Generator().manual_seed(1))[:args.n]
    samples = torch.stack([train_ds[int(i)][0] for i in idx])
    noise = torch.rand(args.n, 3, R, R, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def replay(images):
        return lambda i, size: images[i * ecfg.batch:i * ecfg.batch + size]
    from ayt import fid
    from ayt.metrics import precision_recall
    feats, t_feat = _timed(lambda: space.features(samples), device)
    f = feats.double()
    _, t_fd = _timed(lambda: fid.frechet_distance(f.mean(0).numpy(), np.cov(f.numpy(), rowvar=False), space.mu,
                                                  space.sigma), device)
    _, t_pr = _timed(lambda: precision_recall(space.ref_feats[:2 * args.n], feats, k=3), device)
    _, t_swd = _timed(lambda: space.swd(samples), device)  # the real SWD set is drawn on this first call
    floor, t_score = _timed(lambda: space.score(replay(samples), args.n), device)
    far, _ = _timed(lambda: space.score(replay(noise), args.n), device)
    swd_space = E.FeatureSpace(cfg, E.EvalConfig(metric="swd", n=args.n, runs=1, batch=500, device=str(device)),
                               device, dataset=train_ds)
    _, t_swd_only = _timed(lambda: swd_space.score(replay(samples), args.n), device)
    result["scoring"] = {
        "n": args.n, "reference": space.ref_note,
        "feature_space_setup_s": t_space,
        "fd_eval_with_extras_s": t_score,
        "pieces_s": {"features": t_feat, "frechet_distance": t_fd, "precision_recall": t_pr,
                     "swd_first_call_incl_real_set": t_swd},
        "swd_metric_s": t_swd_only,
    }
    result["held_out_floor"] = {"what": f"{args.n} training crops scored against the held-out strip",
                                **{k: float(v) for k, v in floor.items()}}
    result["uniform_noise"] = {"what": f"{args.n} images of uniform noise", **{k: float(v) for k, v in far.items()}}
    print(f"[bench] scoring {args.n} samples: FD_eval + extras {t_score:.1f} s (features {t_feat:.2f} s, "
          f"FD {t_fd:.2f} s, P/R {t_pr:.2f} s, SWD {t_swd:.1f} s), SWD alone {t_swd_only:.1f} s", flush=True)
    print(f"[bench] held-out floor: {json.dumps(result['held_out_floor'])}", flush=True)
    result["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"evaluator_time_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    print(f"[bench] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
