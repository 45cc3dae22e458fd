"""Explorer responsiveness: seconds from a widget change to the new PNG in the output area.

Builds `ayt.explorer.Explorer` on consistency runs (default: the demo's, made by
`python -m ayt demo --run-root /tmp/demo-runs`), times the first draw (which loads the checkpoint,
the training data and the feature net), then changes each widget in turn (t, seed, steps, and the
checkpoint: a new one, which loads, and back to a cached one) the way a user does, by setting the
widget's value, and records the wall time and the number of redraws of every change.

    python benchmarks/explorer_redraw.py --runs /tmp/demo-runs/demo-ayt

Results (with the machine) go to benchmarks/results/explorer_redraw.json.
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

from ayt.explorer import Explorer


def machine() -> dict:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": "cpu",
            "load_average_1min": round(os.getloadavg()[0], 2)}   # other processes sharing the CPU


def change(ex: Explorer, widget, value, what: str, log: list) -> None:
    """Set one widget's value; log the wall time until the new PNG is in the output area, the number
    of redraws and whether a checkpoint had to be loaded (a miss of the explorer's model cache)."""
    redraws, misses, t0 = ex.redraws, ex.models.misses, time.perf_counter()
    widget.value = value
    s = time.perf_counter() - t0
    out = ex.out.outputs[0]
    log.append({"change": what, "seconds": round(s, 3), "redraws": ex.redraws - redraws,
                "loaded_checkpoint": ex.models.misses > misses,
                "output": "image/png" if "image/png" in out.get("data", {}) else out["output_type"]})
    print(f"{what:28s} {s:6.3f} s  redraws {ex.redraws - redraws}" + ("  (loaded)" if log[-1]["loaded_checkpoint"]
                                                                      else ""), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["/tmp/demo-runs/demo-ayt"], help="consistency run directories")
    ap.add_argument("--n", type=int, default=8, help="images per row (the notebook's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default="benchmarks/results/explorer_redraw.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for r in args.runs:
        if not Path(r).is_dir():
            raise SystemExit(f"no run directory {r}: make the demo runs first "
                             "(python -m ayt demo --run-root /tmp/demo-runs)")
    t0 = time.perf_counter()
    ex = Explorer(args.runs, n=args.n)
    first = time.perf_counter() - t0
    print(f"{'first draw (loads the checkpoint)':34s} {first:6.3f} s", flush=True)
    log: list[dict] = []
    for t in (0.1, 2.0, 10.0, 80.0):
        change(ex, ex.t_w, t, f"t -> {t:g}", log)
    for seed in (1, 2):
        change(ex, ex.seed_w, seed, f"seed -> {seed}", log)
    change(ex, ex.steps_w, 2, "steps -> 2", log)
    change(ex, ex.steps_w, 1, "steps -> 1", log)
    its = list(ex.ckpt_w.options)
    if len(its) > 1:
        change(ex, ex.ckpt_w, its[0], f"checkpoint -> {its[0]}", log)
        change(ex, ex.ckpt_w, its[-1], f"checkpoint -> {its[-1]}", log)
    if len(args.runs) > 1:
        for r in args.runs[1:] + args.runs[:1]:
            change(ex, ex.run_w, r, f"run -> {Path(r).name}", log)
    cached = [e["seconds"] for e in log if not e["loaded_checkpoint"]]
    result = {"runs": args.runs, "n": args.n, "first_draw_s": round(first, 3), "changes": log,
              "after_first_load_s": {"median": round(statistics.median(cached), 3), "max": round(max(cached), 3),
                                     "count": len(cached)},
              "redraws_per_change": sorted({e["redraws"] for e in log}),
              "all_outputs_png": all(e["output"] == "image/png" for e in log),
              "command": "python benchmarks/explorer_redraw.py --runs " + " ".join(args.runs),
              "machine": machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"after the first load: median {result['after_first_load_s']['median']} s, max "
          f"{result['after_first_load_s']['max']} s per change; redraws per change {result['redraws_per_change']}; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
