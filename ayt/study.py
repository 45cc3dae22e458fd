"""The mini study (docs/mini-study.md): AYT vs ECT on the built-in shapes data, on CPU.

    python -m ayt study [--run-root runs] [--workers 2]

Protocol, all from one command, resumable (completed runs are skipped, interrupted ones resume):
  0. shared pieces: `mini-diffusion` (EDM pretraining), `mini-feature-net` (trained MFD net),
     `mini-feature-net-random` (the same net, untrained: the control), and the shapes evaluator;
  1. learning-rate sweep at batch 16, seed 0: ECT and AYT at each lr in LRS;
  2. the best lr per method (lowest final 1-step FD_eval) with seeds 1 and 2 (seed 0 reused);
  3. batch 64 at the chosen lrs (seed 0), for the small-batch claim;
  4. the control: AYT with the untrained feature net at AYT's chosen lr.
Every consistency run has the same pretrained init, data order and noise per seed (the loop derives
both from the seed). Each run is evaluated at EVAL_ITERS with N_EVAL samples (1- and 2-step FD_eval,
precision/recall, pixel SWD, manifold error); `summarize` turns the run directories into the study's
numbers (written to <run_root>/mini-study.json).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from .cli import HelpFormatter
from .progress import fmt_time

LRS = (1e-4, 5e-4)
SEEDS = (0, 1, 2)
EVAL_ITERS = (250, 500, 1000, 1500, 2000)
BIG_BATCH, BIG_BATCH_ITERS = 64, 1000   # batch-64 runs cost ~3x per step on CPU: half the iterations
N_EVAL = 2000
METRIC = "fd_eval"


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    what = f"{cmd[3]} {log.stem}"  # e.g. "train mini-ect-lr0.0001-bs16-s0"
    print(f"[study] started  {what} (log {log})", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"command failed (exit {rc}), see {log}: {' '.join(cmd)}")
    print(f"[study] finished {what} in {fmt_time(time.time() - t0)} (log {log})", flush=True)


def _train(root: Path, preset: str, name: str, overrides: list[str]) -> Path:
    run = root / name
    res = run / "results.json"
    if res.exists() and "train" in json.loads(res.read_text()):
        return run
    _run([sys.executable, "-m", "ayt", "train", "--preset", preset, "--resume", f"name={name}",
          f"run_root={root}", "device=cpu", *overrides], root / "logs" / f"{name}.log")
    return run


def _evaluate(root: Path, run: Path, iters: int) -> None:
    res = json.loads((run / "results.json").read_text())
    done = {(r["iteration"], r["sampler"]) for r in res.get("eval", []) if r["n"] == N_EVAL}
    todo = [it for it in EVAL_ITERS if it <= iters and ((it, "1step") not in done or (it, "2step") not in done)]
    if todo:
        _run([sys.executable, "-m", "ayt", "eval", str(run), "--checkpoints", ",".join(map(str, todo)),
              "--n", str(N_EVAL), "--runs", "1", "--no-dfid", "--batch", "500", "--device", "cpu",
              "--evaluator", str(root / "evaluators" / "shapes-16px.pt")], root / "logs" / f"{run.name}.log")


def ct_run(root: Path, method: str, lr: float, seed: int, batch: int, feature_net: Optional[str] = None) -> Path:
    name = f"mini-{method}-lr{lr:g}-bs{batch}-s{seed}" + ("-randfeat" if feature_net else "")
    iters = BIG_BATCH_ITERS if batch >= BIG_BATCH else EVAL_ITERS[-1]
    over = [f"optim.lr={lr}", f"seed={seed}", f"batch={batch}", f"iters={iters}", f"net.init={root / 'mini-diffusion'}",
            f"ct.feature_net={feature_net or root / 'mini-feature-net'}"]
    run = _train(root, f"mini-{method}", name, over)
    _evaluate(root, run, iters)
    return run


def final_score(run: Path, sampler: str = "1step", it: int = EVAL_ITERS[-1]) -> float:
    curve = _curve(run, sampler)
    if it not in curve:
        raise KeyError(f"{run}: no {sampler} evaluation at iteration {it}")
    return curve[it]


def run_study(root: Path, workers: int = 2) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pool = ThreadPoolExecutor(workers)
    # 0. shared pieces
    from .evaluate import shapes_evaluator
    futs = [pool.submit(_train, root, "mini-diffusion", "mini-diffusion", []),
            pool.submit(_train, root, "mini-feature-net", "mini-feature-net", [])]
    [f.result() for f in futs]
    _train(root, "mini-feature-net", "mini-feature-net-random", ["iters=0"])
    shapes_evaluator(16, str(root / "evaluators" / "shapes-16px.pt"))
    # 1. learning-rate sweep
    sweep = {(m, lr): pool.submit(ct_run, root, m, lr, 0, 16) for m in ("ect", "ayt") for lr in LRS}
    sweep_scores = {k: final_score(f.result()) for k, f in sweep.items()}
    best = {m: min(LRS, key=lambda lr: sweep_scores[(m, lr)]) for m in ("ect", "ayt")}
    # 2-4. seeds, batch 64, control
    jobs = [pool.submit(ct_run, root, m, best[m], s, 16) for m in ("ect", "ayt") for s in SEEDS[1:]]
    jobs += [pool.submit(ct_run, root, m, best[m], 0, BIG_BATCH) for m in ("ect", "ayt")]
    jobs.append(pool.submit(ct_run, root, "ayt", best["ayt"], 0, 16, str(root / "mini-feature-net-random")))
    [j.result() for j in jobs]
    summary = summarize(root)
    summary["wall_clock_s"] = round(time.time() - t0, 1)
    (root / "mini-study.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _curve(run: Path, sampler: str) -> dict[int, float]:
    res = json.loads((run / "results.json").read_text())
    return {r["iteration"]: r[METRIC]["mean"] for r in res.get("eval", [])
            if r["sampler"] == sampler and r["n"] == N_EVAL}


def iterations_to_reach(curve: dict[int, float], target: float) -> Optional[float]:
    """First iteration at which a curve reaches `target` (linear interpolation between evaluations)."""
    its = sorted(curve)
    prev = None
    for it in its:
        if curve[it] <= target:
            if prev is None:
                return float(it)
            (i0, v0) = prev
            return i0 + (it - i0) * (v0 - target) / (v0 - curve[it]) if v0 != curve[it] else float(it)
        prev = (it, curve[it])
    return None


def chosen_runs(root: Path) -> dict[str, Path]:
    """The seed-0, batch-16 runs of each method at its chosen (best-swept) learning rate."""
    scores = {}
    for run in root.glob("mini-*-lr*-bs16-s0"):
        method = run.name.split("-")[1]
        try:
            score = final_score(run)
        except (KeyError, FileNotFoundError):
            continue
        scores.setdefault(method, []).append((score, run))
    return {m: min(v, key=lambda x: x[0])[1] for m, v in sorted(scores.items())}


def summarize(root: Path) -> dict:
    """The study's numbers from its run directories."""
    runs = sorted(p for p in root.glob("mini-e*-lr*") if (p / "results.json").exists()) + \
        sorted(p for p in root.glob("mini-a*-lr*") if (p / "results.json").exists())
    table = {}
    for run in runs:
        try:
            table[run.name] = {s: _curve(run, s) for s in ("1step", "2step")}
        except (KeyError, json.JSONDecodeError):
            continue
    out: dict = {"metric": METRIC, "n_eval": N_EVAL, "runs": table, "groups": {}}

    def group(method: str, batch: int, rand: bool = False) -> dict[str, list[Path]]:
        by_lr: dict[str, list[Path]] = {}
        for name in table:
            parts = name.split("-")
            if parts[1] != method or f"bs{batch}" not in parts or (("randfeat" in parts) != rand):
                continue
            by_lr.setdefault(parts[2][2:], []).append(root / name)
        return by_lr

    variants = [("ect", 16, False), ("ect", 64, False), ("ayt", 16, False), ("ayt", 64, False), ("ayt", 16, True)]
    for method, batch, rand in variants:  # rand: the control with an untrained feature net
        for lr, members in group(method, batch, rand).items():
            for sampler in ("1step", "2step"):
                last = BIG_BATCH_ITERS if batch >= BIG_BATCH else EVAL_ITERS[-1]
                finals = [table[m.name][sampler].get(last) for m in members]
                finals = [f for f in finals if f is not None]
                if finals:
                    tag = "-randfeat" if rand else ""
                    out["groups"][f"{method}{tag}-bs{batch}-lr{lr}-{sampler}"] = {
                        "iteration": last, "seeds": len(finals), "mean": float(np.mean(finals)), "min": float(np.min(finals)),
                        "max": float(np.max(finals)), "runs": [m.name for m in members]}
    # headline: iterations AYT needs to reach ECT's final value (bs16, each method at its chosen lr, per seed)
    chosen = chosen_runs(root)
    lr_of = {m: p.name.split("-")[2] for m, p in chosen.items()}
    speed = []
    for name, curves in table.items():
        if "ect" not in lr_of or "ayt" not in lr_of or not name.startswith(f"mini-ect-{lr_of['ect']}-bs16-"):
            continue
        seed = name.split("-")[-1]
        twin = [n for n in table if n == f"mini-ayt-{lr_of['ayt']}-bs16-{seed}"]
        for t in twin:
            ect_final = curves["1step"].get(EVAL_ITERS[-1])
            if ect_final is None:
                continue
            reach = iterations_to_reach(table[t]["1step"], ect_final)
            speed.append({"ect": name, "ayt": t, "ect_final": ect_final, "ayt_iters_to_reach": reach,
                          "speedup": (EVAL_ITERS[-1] / reach) if reach else None})
    out["speedup"] = speed
    out["chosen"] = {m: p.name for m, p in chosen.items()}
    return out


def sample_figures(root: Path, figures_dir: Path, n: int = 64, seed: int = 0) -> list[Path]:
    """1- and 2-step sample grids of the chosen ECT and AYT runs (same noise for both), upscaled and
    titled with run, iteration and sampler (`ayt.plotting.sample_grid`)."""
    import torch
    from .plotting import sample_grid, sample_title, save_figure
    from .sampling import generate
    from .train import load_run_model
    out = []
    for method, run in chosen_runs(root).items():
        net, cfg, state = load_run_model(run)
        for steps in (1, 2):
            x = generate(net, cfg.stage, n, state["img_channels"], cfg.data.resolution, state["label_dim"], seed,
                         torch.device("cpu"), steps=steps)
            title = sample_title(run.name, state["iteration"], cfg.stage, steps, n, seed)
            out += save_figure(sample_grid(x, title, nrow=8), Path(figures_dir) / f"samples_mini_{method}_{steps}step",
                               pdf=False)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ayt study", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--run-root", default="runs", help="where the study's runs, logs and mini-study.json go")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (one CPU thread each)")
    ap.add_argument("--summarize", action="store_true", help="only recompute mini-study.json from the runs")
    ap.add_argument("--sample-figures", metavar="DIR", help="only write sample grids of the chosen runs to DIR")
    args = ap.parse_args(argv)
    root = Path(args.run_root)
    if args.sample_figures:
        for p in sample_figures(root, Path(args.sample_figures)):
            print("wrote", p)
        return 0
    summary = summarize(root) if args.summarize else run_study(root, args.workers)
    if args.summarize:
        (root / "mini-study.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0
