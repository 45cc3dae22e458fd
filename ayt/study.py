"""The mini study, v2: AYT vs ECT at CPU scale, on the built-in shapes and on real photo crops.

    python -m ayt study [--run-root runs/study] [--workers 2] [--device cpu] [--datasets shapes,photos] [--family]

The protocol (docs/mini-study.md) in one command, resumable: finished runs are skipped,
interrupted ones resume from their last checkpoint, every started and finished run prints one
line with its log path, and every minute one line gives each running job's latest progress. Per dataset
(a sub-directory of the run root):

  0. shared pieces, trained once: the teacher `mini-diffusion` (EDM loss), the trained feature net
     `mini-feature-net`, an untrained copy (`mini-feature-net-random`, the control) and the
     independent evaluator (never the MFD network);
  1. learning-rate selection on SELECTION_SEED (not a reporting seed), batch 16: the arms
     ECT-fine (q = 256, fixed stage: AYT's schedule), ECT-official (q = 2, stage doubling) and AYT,
     each over LR_GRID, extended past an edge pick (up to MAX_EXTENSIONS times);
  2. reporting seeds 0-2 at the picks: AYT, the better ECT arm, and the control (AYT update with the
     untrained feature net at AYT's pick); while the better ECT's curve has not flattened (FLAT_TOL over
     the last quarter of the horizon), AYT's and ECT's reporting runs are continued to the next of HORIZONS;
  3. the batch claim: the better ECT at batch 64 for BIG_BATCH_ITERS iterations, seeds 0-2;
  4. reporting runs evaluated at EVAL_ITERS up to their length, selection runs at their end (1- and 2-step FD_eval,
     precision/recall, multi-scale SWD);
  5. with --family, after steps 0-4 of every dataset: the authors' family (FAMILY_ARMS): CCD vs CCD-AYT,
     CT vs CT-AYT and AYT with a denoising autoencoder's features vs the VGG's, on the reporting seeds at
     the learning rate each arm's discrete counterpart selected (FAMILY_LR_FROM).
Every arm at a given seed has the same teacher, feature net, data order and noise (the training loop
derives both from the seed). `summarize` turns the run directories into `<run-root>/mini-study.json`,
the file every README number comes from (a copy is committed as figures/mini-study.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from .cli import HelpFormatter
from .progress import fmt_time

DATASETS = ("shapes", "photos")
DATA_OVERRIDES = {"shapes": [], "photos": ["data.name=photos"]}  # on top of the mini-* presets
LR_GRID = (1e-4, 2e-4, 5e-4)
EXTEND_UP, EXTEND_DOWN, MAX_EXTENSIONS = 2.5, 0.5, 2
SELECTION_SEED = 100
SEEDS = (0, 1, 2)
ITERS = 2000                          # selection runs, the control and the family arms
# Reporting horizon of AYT and the better ECT: ITERS, continued (same runs, resumed with a larger `iters`) to the
# next horizon while ECT has not flattened: < FLAT_TOL relative change of its seed-mean 1-step FD_eval over the
# last quarter of the horizon (1500 -> 2000, then 3000 -> 4000).
HORIZONS = (2000, 4000)
FLAT_TOL = 0.10
EVAL_ITERS = (250, 500, 1000, 1500, 2000, 3000, 4000)  # those up to a run's length
BIG_BATCH, BIG_BATCH_ITERS = 64, 1000
N_EVAL, N_REF = 2000, 10000
TEACHER_SAMPLER = "heun18"            # the sampler `ayt eval` uses for diffusion runs (EDM Heun, 18 steps, 35 NFE)
METRIC = "fd_eval"
# The arms (docs/mini-study.md section 2): overrides on the mini-ect / mini-ayt presets.
ARMS: dict[str, tuple[str, list[str]]] = {
    "ect-fine": ("mini-ect", []),                                            # q = 256, stage 0 (AYT's schedule)
    "ect-official": ("mini-ect", ["ct.q=2", f"ct.double_every={ITERS // 8}"]),  # 8 stages, last one 1/256
    "ayt": ("mini-ayt", []),
}
ECT_ARMS = ("ect-fine", "ect-official")
# The authors' family (docs/mini-study.md section 7), same budget, evaluator and seeds as the arms above:
# continuous-time distillation from the study's teacher (CCD) and training without one (CT), each with a
# pixel-space and a feature-space (AYT) tangent, and AYT with the denoising autoencoder `mini-dae` as phi.
# CCD-AYT uses the per-sample 1/t weight (continuous.weighting's default), not train_ccd_ayt.py's broadcast.
FAMILY_ARMS: dict[str, tuple[str, list[str]]] = {
    "ccd": ("mini-ect", ["ct.mode=ccd"]),
    "ccd-ayt": ("mini-ect", ["ct.mode=ccd-ayt"]),
    "ct": ("mini-ect", ["ct.mode=cct"]),
    "ct-ayt": ("mini-ect", ["ct.mode=cct-ayt"]),
    "ayt-dae": ("mini-ayt", ["ct.feature_arch=dae"]),
}
# No learning-rate search of their own (it would double the family's cost): pixel-space arms run at the
# better ECT's pick, feature-space arms at AYT's, so each pair differs as ECT and AYT do in steps 1-3.
FAMILY_LR_FROM = {"ccd": "ect", "ccd-ayt": "ayt", "ct": "ect", "ct-ayt": "ayt", "ayt-dae": "ayt"}
# (baseline, challenger): the summary reports the iterations the challenger needs to reach the baseline.
FAMILY_PAIRS = (("ccd", "ccd-ayt"), ("ct", "ct-ayt"), ("ayt", "ayt-dae"))
ALL_ARMS = {**ARMS, **FAMILY_ARMS}
# Labels of the arms (figures) and of the summary's groups (report tables).
ARM_LABELS = {"ayt": "AYT", "ect-fine": "ECT (q=256)", "ect-official": "ECT (official schedule)"}
GROUP_LABELS = {"ayt": "AYT", "ect": "better ECT", "control": "control (AYT, untrained phi)",
                "ect_bs64": f"better ECT, batch {BIG_BATCH}", "ccd": "CCD", "ccd-ayt": "CCD-AYT", "ct": "CT",
                "ct-ayt": "CT-AYT", "ayt-dae": "AYT, autoencoder phi"}


@dataclasses.dataclass
class Study:
    """Where the study runs and how: one instance per invocation."""
    root: Path
    device: str = "cpu"
    workers: int = 2
    log: callable = print
    heartbeat: float = 60.0  # seconds between "running: ..." lines with each job's last progress (0: none)

    def __post_init__(self):
        self.pool = ThreadPoolExecutor(self.workers)
        self._lock = threading.Lock()
        self._started = time.time()
        self._running: dict[str, Path] = {}  # what -> its log, while the job runs
        if self.heartbeat > 0:
            threading.Thread(target=self._beat, daemon=True).start()

    def say(self, msg: str) -> None:
        with self._lock:
            self.log(f"[study {fmt_time(time.time() - self._started)}] {msg}")

    def _beat(self) -> None:
        """Every `heartbeat` seconds while jobs run: one line with each job's latest progress line (iteration,
        rate and ETA of a training run, images and ETA of an evaluation), so the driver never goes quiet."""
        while True:
            time.sleep(self.heartbeat)
            with self._lock:
                running = dict(self._running)
            if running:
                self.say("running: " + "; ".join(f"{what}: {last_progress(log)}" for what, log in running.items()))

    # ------------------------------------------------------------------------------------------
    # Subprocesses: one CPU thread each, output to a log file per run

    def _run(self, cmd: list[str], log: Path, what: str) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        self.say(f"start  {what}  (log {log})")
        with self._lock:
            self._running[what] = log
        try:
            with open(log, "a") as f:
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        finally:
            with self._lock:
                self._running.pop(what, None)
        if rc != 0:
            self.say(f"FAILED {what} (exit {rc}); see {log}")
            raise RuntimeError(f"{what} failed (exit {rc}); see {log}")
        self.say(f"done   {what}  in {fmt_time(time.time() - t0)}  (log {log})")

    def train(self, ds: str, preset: str, name: str, overrides: list[str], iters: int = 0) -> Path:
        """Train (or resume, or continue to `iters`) one run; skipped when it has trained that far."""
        root = self.root / ds
        run = root / name
        if _trained(run, iters):
            return run
        div = diverged_at(run)
        if div is not None:  # deterministic: resuming would diverge again
            self.say(f"skip   {ds}/{name}: it diverged at iteration {div} (non-finite loss)")
            return run
        try:
            self._run([sys.executable, "-m", "ayt", "train", "--preset", preset, "--resume", f"name={name}",
                       f"run_root={root}", f"device={self.device}", *DATA_OVERRIDES[ds], *overrides],
                      root / "logs" / f"{name}.log", f"{ds}/{name}")
        except RuntimeError:
            div = diverged_at(run)
            if div is None:
                raise
            self.say(f"{ds}/{name} diverged at iteration {div} (non-finite loss): a result, not retried")
        return run

    def evaluate(self, ds: str, run: Path, iters: int, at=EVAL_ITERS, samplers=("1step", "2step")) -> None:
        done = {(r["iteration"], r["sampler"]) for r in _records(run) if r["n"] == N_EVAL}
        todo = [it for it in at if it <= iters and not {(it, s) for s in samplers} <= done]
        if todo:
            self._run([sys.executable, "-m", "ayt", "eval", str(run), "--metric", METRIC,
                       "--checkpoints", ",".join(map(str, todo)), "--n", str(N_EVAL), "--runs", "1", "--no-dfid",
                       "--ref-images", str(N_REF), "--batch", "500", "--device", self.device,
                       "--evaluator", str(self.evaluator_path(ds))],
                      self.root / ds / "logs" / f"{run.name}.log", f"{ds}/{run.name} evaluation")

    def evaluator_path(self, ds: str) -> Path:
        return self.root / ds / "evaluator.pt"

    # ------------------------------------------------------------------------------------------
    # The protocol

    def shared(self, ds: str) -> None:
        """Teacher, trained and untrained feature nets, evaluator (step 0)."""
        futs = [self.pool.submit(self.train, ds, "mini-diffusion", "mini-diffusion", []),
                self.pool.submit(self.train, ds, "mini-feature-net", "mini-feature-net", [])]
        [f.result() for f in futs]
        self.train(ds, "mini-feature-net", "mini-feature-net-random", ["iters=0"])
        self._run([sys.executable, "-m", "ayt.study", "--build-evaluator", ds, "--run-root", str(self.root),
                   "--device", self.device], self.root / ds / "logs" / "evaluator.log", f"{ds} evaluator")
        self.evaluate_teacher(ds)

    def evaluate_teacher(self, ds: str) -> None:
        """The teacher's own scores (EDM's Heun sampler, 35 network evaluations), with the same evaluator and
        sample count: the quality the consistency runs start from and are compared against, for reference."""
        run = self.root / ds / "mini-diffusion"
        iters = _results(run)["train"]["iterations"]
        self.evaluate(ds, run, iters, (iters,), samplers=(TEACHER_SAMPLER,))

    def ct_run(self, ds: str, arm: str, lr: float, seed: int, batch: int = 16, control: bool = False,
               iters: Optional[int] = None) -> Path:
        """One consistency run and its evaluations; `iters` past ITERS continues a reporting run."""
        preset, extra = ALL_ARMS[arm]
        name = run_name(arm, lr, batch, seed, control)
        iters = iters or (BIG_BATCH_ITERS if batch == BIG_BATCH else ITERS)
        root = self.root / ds
        feature_net = root / ("mini-feature-net-random" if control else "mini-dae" if arm == "ayt-dae"
                              else "mini-feature-net")
        over = [*extra, f"optim.lr={lr}", f"seed={seed}", f"batch={batch}", f"iters={iters}",
                f"net.init={root / 'mini-diffusion'}", f"ct.feature_net={feature_net}"]
        run = self.train(ds, preset, name, over, iters)
        # selection runs are scored at their end only; reporting runs get the whole curve; a diverged run
        # keeps the evaluations it had (a continued run's shorter horizon) and gets no new ones
        if diverged_at(run) is None:
            self.evaluate(ds, run, iters, (ITERS,) if seed == SELECTION_SEED else EVAL_ITERS)
        return run

    def select(self, ds: str, arm: str) -> float:
        """The arm's learning rate: lowest final 1-step FD_eval on the selection seed (step 1)."""
        scores: dict[float, float] = {}
        todo = list(LR_GRID)
        while True:
            runs = [self.pool.submit(self.ct_run, ds, arm, lr, SELECTION_SEED) for lr in todo]
            scores.update({lr: final_score(f.result()) for lr, f in zip(todo, runs)})
            pick, edge = pick_lr(scores)
            if edge is None or len(scores) - len(LR_GRID) >= MAX_EXTENSIONS:
                self.say(f"{ds}: {arm} picks lr {pick:g} from {sorted(scores)}"
                         + (f" (still at the {edge} edge after {MAX_EXTENSIONS} extensions)" if edge else ""))
                return pick
            todo = [pick * (EXTEND_UP if edge == "upper" else EXTEND_DOWN)]
            self.say(f"{ds}: {arm} pick {pick:g} is at the {edge} edge: extending the grid to {todo[0]:g}")

    def dataset(self, ds: str) -> None:
        self.shared(ds)
        orchestrate = ThreadPoolExecutor(len(ARMS))
        picks = dict(zip(ARMS, orchestrate.map(lambda arm: self.select(ds, arm), ARMS)))
        sel = selection(self.root / ds)
        ect = better_ect(sel)
        # seed by seed, AYT beside the better ECT: each finished pair adds one seed to the headline
        pairs = {(s, arm): self.pool.submit(self.ct_run, ds, arm, picks[arm], s)
                 for s in SEEDS for arm in ("ayt", ect)}
        rest = [self.pool.submit(self.ct_run, ds, "ayt", picks["ayt"], s, 16, True) for s in SEEDS]
        rest += [self.pool.submit(self.ct_run, ds, ect, picks[ect], s, BIG_BATCH) for s in SEEDS]
        ect_runs = [pairs[s, ect].result() for s in SEEDS]
        [f.result() for f in pairs.values()]
        for short, long in zip(HORIZONS, HORIZONS[1:]):
            fl = flattening([curve(r) for r in ect_runs], short)
            if fl["flattened"]:
                break
            self.say(f"{ds}: ECT's 1-step FD_eval still changes by {100 * fl['relative_change']:.1f}% from "
                     f"{fl['from']} to {short}: continuing AYT and ECT to {long} iterations")
            longer = {(s, arm): self.pool.submit(self.ct_run, ds, arm, picks[arm], s, iters=long)
                      for s in SEEDS for arm in ("ayt", ect)}
            ect_runs = [longer[s, ect].result() for s in SEEDS]
            [f.result() for f in longer.values()]
        [j.result() for j in rest]

    def family(self, ds: str) -> None:
        """Step 5: the family arms on the reporting seeds, at their counterparts' picks (needs steps 1-3)."""
        self.train(ds, "mini-dae", "mini-dae", [])
        lrs = family_lrs(selection(self.root / ds))
        jobs = [self.pool.submit(self.ct_run, ds, arm, lrs[arm], s) for arm in FAMILY_ARMS for s in SEEDS]
        [j.result() for j in jobs]

    def run(self, datasets=DATASETS, family: bool = False) -> dict:
        self.root.mkdir(parents=True, exist_ok=True)
        for ds in datasets:  # one after the other: the first dataset's results come first
            self.dataset(ds)
        for ds in datasets if family else ():  # the family after the main protocol of every dataset
            self.family(ds)
        # every dataset under the run root, not only this invocation's: `--datasets shapes --family` must not
        # drop the photos' finished numbers from <run-root>/mini-study.json
        summary = summarize(self.root)
        summary["wall_clock_s_last_invocation"] = round(time.time() - self._started, 1)
        write_summary(self.root, summary)
        return summary


# ----------------------------------------------------------------------------------------------
# Pure helpers over run directories

def last_progress(log: Path, tail: int = 4096) -> str:
    """The last line of a job's log without its "[name] " prefix (e.g. "1225/2000 loss_ect 5.08 | 3.1 it/s |
    eta 4m02s"), or "starting" while it has none."""
    try:
        with open(log, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - tail, 0))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").replace("\r", "\n").splitlines()]
    except OSError:
        return "starting"
    last = next((ln for ln in reversed(lines) if ln and not ln.startswith("$ ")), "")
    return (last.split("] ", 1)[1] if last.startswith("[") and "] " in last else last) or "starting"


def run_name(arm: str, lr: float, batch: int, seed: int, control: bool = False) -> str:
    return f"{arm}-lr{lr:g}-bs{batch}-s{seed}" + ("-randfeat" if control else "")


def parse_run_name(name: str) -> Optional[dict]:
    """Inverse of run_name; None for the shared pieces."""
    for arm in ALL_ARMS:
        if name.startswith(arm + "-lr"):
            parts = name[len(arm) + 1:].split("-")
            try:
                return {"arm": arm, "lr": float(parts[0][2:]), "batch": int(parts[1][2:]), "seed": int(parts[2][1:]),
                        "control": parts[3:] == ["randfeat"]}
            except (ValueError, IndexError):
                return None
    return None


def _results(run: Path) -> dict:
    """The run's results.json ({} before it has one)."""
    res = run / "results.json"
    return json.loads(res.read_text()) if res.exists() else {}


def _trained(run: Path, iters: int = 0) -> bool:
    """The run has finished training, to at least `iters` iterations."""
    train = _results(run).get("train")
    return train is not None and train.get("iterations", 0) >= iters


def diverged_at(run: Path) -> Optional[int]:
    """The iteration at which the run stopped on a non-finite loss (results.json "diverged"), else None."""
    div = _results(run).get("diverged")
    return None if div is None else int(div["iteration"])


def _records(run: Path) -> list[dict]:
    return _results(run).get("eval", [])


def curve(run: Path, sampler: str = "1step", key: str = METRIC) -> dict[int, float]:
    """{iteration: value} of one evaluated quantity (fd_eval, precision, recall, swd, ...)."""
    out = {}
    for r in _records(run):
        if r["sampler"] == sampler and r["n"] == N_EVAL and r.get("metric") == METRIC and key in r:
            v = r[key]
            out[int(r["iteration"])] = float(v["mean"] if isinstance(v, dict) else v)
    return out


def final_score(run: Path, sampler: str = "1step", it: Optional[int] = None) -> float:
    """The final 1-step FD_eval; +inf for a run that diverged before it (the worst score in a selection)."""
    it = it or (BIG_BATCH_ITERS if f"-bs{BIG_BATCH}-" in run.name else ITERS)
    c = curve(run, sampler)
    if it not in c and diverged_at(run) is not None:
        return float("inf")
    if it not in c:
        raise KeyError(f"{run}: no {sampler} {METRIC} evaluation at iteration {it}")
    return c[it]


def pick_lr(scores: dict[float, float]) -> tuple[float, Optional[str]]:
    """(best lr, 'lower'/'upper' when it sits at an edge of the grid, else None). Ties (every run diverged:
    all +inf) go to the lowest learning rate, so the grid is extended downwards."""
    pick = min(scores, key=lambda lr: (scores[lr], lr))
    edge = "lower" if pick == min(scores) else "upper" if pick == max(scores) else None
    return pick, edge


def iterations_to_reach(curve: dict[int, float], target: float) -> Optional[float]:
    """First iteration at which a curve reaches `target` (linear interpolation between evaluations)."""
    prev = None
    for it in sorted(curve):
        if curve[it] <= target:
            if prev is None:
                return float(it)
            i0, v0 = prev
            return i0 + (it - i0) * (v0 - target) / (v0 - curve[it]) if v0 != curve[it] else float(it)
        prev = (it, curve[it])
    return None


def flattening(curves: list[dict[int, float]], horizon: int) -> dict:
    """Has a curve flattened by `horizon`? Relative change of the seed-mean 1-step FD_eval over the last
    quarter of the horizon (curves that lack either point are left out)."""
    start = horizon * 3 // 4
    have = [c for c in curves if start in c and horizon in c]
    if not have:
        return {"from": start, "to": horizon, "seeds": 0, "relative_change": None, "tolerance": FLAT_TOL,
                "flattened": False}
    a, b = np.mean([c[start] for c in have]), np.mean([c[horizon] for c in have])
    return {"from": start, "to": horizon, "seeds": len(have), "relative_change": float((a - b) / a),
            "tolerance": FLAT_TOL, "flattened": bool(abs(a - b) / a < FLAT_TOL)}


def _runs(ds_root: Path, with_diverged: bool = False) -> dict[str, dict]:
    """Consistency runs of one dataset that have evaluations (and, `with_diverged`, those that diverged):
    name -> parsed name."""
    out = {}
    for p in sorted(ds_root.iterdir()) if ds_root.is_dir() else []:
        meta = parse_run_name(p.name)
        if meta is not None and (curve(p) or with_diverged and diverged_at(p) is not None):
            out[p.name] = meta
    return out


def diverged_runs(ds_root: Path) -> dict[str, int]:
    """name -> iteration of every consistency run of the dataset that stopped on a non-finite loss."""
    its = {n: diverged_at(ds_root / n) for n in _runs(ds_root, with_diverged=True)}
    return {n: it for n, it in its.items() if it is not None}


def selection(ds_root: Path) -> dict:
    """Per arm: {lr: final 1-step FD_eval, None when the run diverged} on the selection seed, and the pick."""
    out = {}
    for name, m in _runs(ds_root, with_diverged=True).items():
        if m["seed"] == SELECTION_SEED and m["batch"] == 16 and not m["control"]:
            try:
                out.setdefault(m["arm"], {"scores": {}})["scores"][m["lr"]] = final_score(ds_root / name)
            except KeyError:
                continue
    for arm, s in out.items():
        s["pick"], s["edge"] = pick_lr(s["scores"])
        s["scores"] = {f"{lr:g}": v if np.isfinite(v) else None for lr, v in sorted(s["scores"].items())}
    return out


def selected(sel: dict) -> bool:
    """The selection (`selection`) has picks for AYT and at least one ECT arm: the reporting runs can start."""
    return "ayt" in sel and any(a in sel for a in ECT_ARMS)


def family_lrs(sel: dict) -> dict[str, float]:
    """Each family arm's learning rate: the pick of its discrete counterpart (FAMILY_LR_FROM)."""
    if not selected(sel):
        raise KeyError("the family arms borrow the selected learning rates: run the main protocol first")
    ect = better_ect(sel)
    return {arm: sel[ect if src == "ect" else "ayt"]["pick"] for arm, src in FAMILY_LR_FROM.items()}


def better_ect(sel: dict) -> str:
    """The ECT arm with the lower selection score at its pick (the baseline at its best)."""
    have = [a for a in ECT_ARMS if a in sel]
    if not have:
        raise KeyError("no ECT arm has finished its selection runs")
    return min(have, key=lambda a: _or_inf(sel[a]["scores"][f"{sel[a]['pick']:g}"]))


def _or_inf(score: Optional[float]) -> float:
    return float("inf") if score is None else score


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()), "seeds": len(a),
            "values": [float(v) for v in a]}


def _group(ds_root: Path, runs: dict, arm: str, lr: float, batch: int, control: bool) -> dict[int, Path]:
    return {m["seed"]: ds_root / n for n, m in runs.items() if m["arm"] == arm and m["lr"] == lr
            and m["batch"] == batch and m["control"] == control and m["seed"] in SEEDS}


def _finals(group: dict[int, Path], it: int, samplers=("1step", "2step")) -> dict:
    out = {}
    for sampler in samplers:
        for key in (METRIC, "precision", "recall", "swd"):
            vals = [curve(p, sampler, key).get(it) for p in group.values()]
            vals = [v for v in vals if v is not None]
            if vals:
                out[f"{key}_{sampler}"] = _stats(vals)
    return out


def _curve_stats(group: dict[int, Path], sampler: str = "1step") -> dict[str, dict]:
    """The figures' curves as numbers: per evaluated iteration, FD_eval over the group's seeds."""
    curves = [curve(p, sampler) for p in group.values()]
    return {str(i): _stats([c[i] for c in curves if i in c]) for i in sorted({i for c in curves for i in c})}


def reach(base: dict[int, Path], new: dict[int, Path], base_name: str, new_name: str, horizon: int = ITERS) -> dict:
    """Per seed: the baseline's 1-step FD_eval at `horizon` (its final) and the iterations `new` needs to
    reach it (linear interpolation, `new`'s curve up to the horizon; None when it never does), with the
    speed-up horizon / iterations; min-max over seeds only when every seed got there."""
    per_seed = []
    for seed, run in sorted(base.items()):
        target = curve(run).get(horizon)
        if seed not in new or target is None:
            continue
        it = iterations_to_reach({i: v for i, v in curve(new[seed]).items() if i <= horizon}, target)
        per_seed.append({"seed": seed, f"{base_name}_final": target, f"{new_name}_iterations_to_reach": it,
                         "speedup": horizon / it if it else None})
    out: dict = {"horizon": horizon, "per_seed": per_seed}
    if per_seed and all(s["speedup"] is not None for s in per_seed):
        out["speedup"] = _stats([s["speedup"] for s in per_seed])
        out[f"{new_name}_iterations_to_reach"] = _stats([s[f"{new_name}_iterations_to_reach"] for s in per_seed])
    return out


def summarize_family(ds_root: Path, sel: dict, ayt_group: dict[int, Path]) -> Optional[dict]:
    """Step 5's numbers: each family arm's finals and, per pair, the challenger's iterations to reach the
    baseline's final 1-step FD_eval. None when no family run has been evaluated."""
    runs = {n: m for n, m in _runs(ds_root).items() if m["arm"] in FAMILY_ARMS}
    if not runs:
        return None
    lrs = family_lrs(sel)
    groups = {arm: _group(ds_root, runs, arm, lr, 16, False) for arm, lr in lrs.items()}
    out: dict = {"lr": lrs, "lr_from": dict(FAMILY_LR_FROM),
                 "groups": {k: {"runs": sorted(p.name for p in g.values()), **_finals(g, ITERS),
                                "curve_1step": _curve_stats(g)} for k, g in groups.items()}}
    groups["ayt"] = ayt_group
    out["pairs"] = {f"{b}_vs_{c}": reach(groups[b], groups[c], b, c) for b, c in FAMILY_PAIRS}
    # complete: every arm's run at every seed evaluated at ITERS, or diverged (a result, not retried)
    out["complete"] = all(ITERS in curve(p) or diverged_at(p) is not None
                          for a in FAMILY_ARMS for p in [ds_root / run_name(a, lrs[a], 16, s) for s in SEEDS])
    return out


def shared_feature_nets(ds_root: Path) -> dict:
    """What the shared feature networks learned, from their results.json: per-label R^2 and the verdict of
    the trained VGG (recomputed under today's rule), reconstruction RMSE by noise level of the autoencoder."""
    from .runs import feature_net_verdict
    out = {}
    for name in ("mini-feature-net", "mini-dae"):
        res = ds_root / name / "results.json"
        fn = json.loads(res.read_text()).get("feature_net") if res.exists() else None
        if fn:
            out[name] = {**fn, "verdict": feature_net_verdict(fn["r2"])} if "r2" in fn else fn
    return out


def teacher_scores(ds_root: Path) -> Optional[dict]:
    """The teacher's scores at its last iteration (TEACHER_SAMPLER), None before it is evaluated."""
    run = ds_root / "mini-diffusion"
    its = [r["iteration"] for r in _records(run) if r["sampler"] == TEACHER_SAMPLER and r["n"] == N_EVAL]
    if not its:
        return None
    return {"run": run.name, "sampler": TEACHER_SAMPLER, "iteration": max(its),
            **_finals({0: run}, max(its), (TEACHER_SAMPLER,))}


def summarize_dataset(ds_root: Path) -> dict:
    runs = _runs(ds_root)
    sel = selection(ds_root)
    out: dict = {"complete": False, "selection": {a: {**s, "pick": s["pick"]} for a, s in sel.items()},
                 "feature_nets": shared_feature_nets(ds_root)}
    teacher = teacher_scores(ds_root)
    if teacher is not None:
        out["teacher"] = teacher
    if not selected(sel):
        return out
    ect = better_ect(sel)
    picks = {a: s["pick"] for a, s in sel.items()}
    groups = {"ayt": _group(ds_root, runs, "ayt", picks["ayt"], 16, False),
              "ect": _group(ds_root, runs, ect, picks[ect], 16, False),
              "control": _group(ds_root, runs, "ayt", picks["ayt"], 16, True),
              "ect_bs64": _group(ds_root, runs, ect, picks[ect], BIG_BATCH, False)}
    out["better_ect"] = ect
    out["groups"] = {k: {"runs": sorted(p.name for p in g.values()), "iteration": at,
                         **_finals(g, at), "curve_1step": _curve_stats(g)} for k, g in groups.items()
                     for at in [BIG_BATCH_ITERS if k == "ect_bs64" else ITERS]}
    # The reporting horizon: the longest of HORIZONS that every AYT and ECT reporting run has been evaluated at
    # (one seed's run counts as soon as it has), and whether ECT's curve has flattened by it.
    pair = [*groups["ayt"].values(), *groups["ect"].values()]
    horizon = max((h for h in HORIZONS if pair and all(h in curve(p) for p in pair)), default=ITERS)
    out["horizon"] = horizon
    ect_curves = [curve(p) for p in groups["ect"].values()]
    if any(ect_curves):
        out["ect_flattening"] = flattening(ect_curves, horizon)
    # Headline: iterations AYT needs to reach the better ECT's final 1-step FD_eval, per seed, at the horizon
    # (and at each shorter horizon, to show how the ratio depends on it).
    out["headline"] = reach(groups["ect"], groups["ayt"], "ect", "ayt", horizon)
    per_seed = out["headline"]["per_seed"]
    if horizon > ITERS:
        out["headline_by_horizon"] = {str(h): out["headline"] if h == horizon else
                                      reach(groups["ect"], groups["ayt"], "ect", "ayt", h) for h in HORIZONS if h <= horizon}
        out["long"] = {k: {"iteration": horizon, **_finals(groups[k], horizon)} for k in ("ayt", "ect")}
    # Batch claim: AYT at batch 16 vs the better ECT at batch 64, both at BIG_BATCH_ITERS iterations.
    ayt_at = [curve(p).get(BIG_BATCH_ITERS) for p in groups["ayt"].values()]
    big = [curve(p).get(BIG_BATCH_ITERS) for p in groups["ect_bs64"].values()]
    if all(v is not None for v in ayt_at + big) and ayt_at and big:
        out["batch_claim"] = {"iteration": BIG_BATCH_ITERS, "ayt_bs16": _stats(ayt_at), "ect_bs64": _stats(big)}
    # complete: every arm selected, every reporting group evaluated on all seeds, headline and batch claim,
    # and ECT flattened by the horizon (or the horizon at its last value)
    out["complete"] = bool(set(sel) == set(ARMS) and len(per_seed) == len(SEEDS) and "batch_claim" in out
                           and all(len(g) == len(SEEDS) for g in groups.values())
                           and (out["ect_flattening"]["flattened"] or horizon == HORIZONS[-1]))
    fam = summarize_family(ds_root, sel, groups["ayt"])
    if fam is not None:
        out["family"] = fam
    diverged = diverged_runs(ds_root)
    if diverged:
        out["diverged"] = diverged
    out["wall_clock_s"] = {n: _results(ds_root / n)["train"].get(
        "wall_clock_s_last_session") for n in runs}
    return out


def summarize(root: Path, datasets=DATASETS) -> dict:
    """The study's numbers from its run directories (pure: reads results.json files only)."""
    protocol = {"lr_grid": list(LR_GRID), "selection_seed": SELECTION_SEED, "seeds": list(SEEDS), "iters": ITERS,
                "horizons": list(HORIZONS), "eval_iters": list(EVAL_ITERS), "n_eval": N_EVAL, "n_ref": N_REF,
                "metric": METRIC, "big_batch": BIG_BATCH, "big_batch_iters": BIG_BATCH_ITERS, "flat_tolerance": FLAT_TOL,
                "arms": {a: {"preset": p, "overrides": o} for a, (p, o) in ARMS.items()},
                "family_arms": {a: {"preset": p, "overrides": o, "lr_from": FAMILY_LR_FROM[a]}
                                for a, (p, o) in FAMILY_ARMS.items()}}
    return {"protocol": protocol, "datasets": {ds: summarize_dataset(Path(root) / ds) for ds in datasets
                                               if (Path(root) / ds).is_dir()}}


def _cell(stats: Optional[dict], fmt: str = "{:.2f}") -> str:
    if not stats:
        return "-"
    if stats["seeds"] == 1:
        return fmt.format(stats["mean"])
    return f"{fmt.format(stats['mean'])} ({fmt.format(stats['min'])}-{fmt.format(stats['max'])})"


def _score_table(rows: list[tuple[str, dict]]) -> list[str]:
    """One table row per (group key, group finals); a group may appear at several iterations."""
    cols = [("fd_eval_1step", "{:.2f}"), ("fd_eval_2step", "{:.2f}"), ("swd_1step", "{:.1f}"),
            ("precision_1step", "{:.2f}"), ("recall_1step", "{:.2f}")]
    out = ["| run | seeds | iterations | FD_eval 1-step | FD_eval 2-step | SWD 1-step | precision | recall |",
           "|---|---|---|---|---|---|---|---|"]
    for k, g in rows:
        n = max((g[c]["seeds"] for c, _ in cols if c in g), default=0)
        if n == 0:  # nothing evaluated yet
            continue
        out.append(f"| {GROUP_LABELS.get(k, k)} | {n} | {g.get('iteration', ITERS)} | "
                   + " | ".join(_cell(g.get(c), f) for c, f in cols) + " |")
    return out


def _reach_line(name: str, r: dict, base: str, new: str) -> str:
    seeds = r.get("per_seed", [])
    if not seeds:
        return f"- {name}: no seed has both runs evaluated yet."
    b, n, h = GROUP_LABELS[base], GROUP_LABELS[new], r.get("horizon", ITERS)
    if "speedup" not in r:
        got = sum(s["speedup"] is not None for s in seeds)
        return f"- {name}: {n} reaches the final 1-step FD_eval of {b} on {got} of {len(seeds)} seeds within {h} iterations."
    it = r[f"{new}_iterations_to_reach"]
    return (f"- {name}: {n} reaches the final 1-step FD_eval of {b} "
            f"({_cell(_stats([s[f'{base}_final'] for s in seeds]))}) after {_cell(it, '{:.0f}')} iterations, "
            f"{_cell(r['speedup'])}x fewer than {h}.")


def report_markdown(summary: dict) -> str:
    """The summary as the README's Markdown (tables of scores, mean and min-max over seeds), so that every
    number the README quotes is rendered from the committed JSON (`python -m ayt study --report`)."""
    lines: list[str] = []
    for ds, d in summary.get("datasets", {}).items():
        lines.append(f"**{ds}**" + ("" if d.get("complete") else " (incomplete: runs still missing)"))
        lines.append("")
        for name, fn in d.get("feature_nets", {}).items():
            if "verdict" in fn:
                v = fn["verdict"]
                lines.append(f"- feature net `{name}`: R^2 >= {v['threshold']} on {', '.join(v['labels_above']) or 'no label'} "
                             f"({'learned' if v['learned'] else 'did NOT learn'}; best R^2 "
                             + ", ".join(f"{k} {x:.2f}" for k, x in sorted(fn["r2"].items(), key=lambda kv: -kv[1])[:4]) + ")")
            elif "rmse" in fn:
                lines.append(f"- autoencoder `{name}`: reconstruction RMSE by noise sigma "
                             + ", ".join(f"{k}: {x:.3f}" for k, x in fn["rmse"].items()))
        te = d.get("teacher")
        if te:
            k = f"_{te['sampler']}"
            lines.append(f"- teacher `{te['run']}` (EDM Heun sampler, 18 steps = 35 network evaluations), for reference: "
                         f"FD_eval {te[METRIC + k]['mean']:.2f}, SWD {te['swd' + k]['mean']:.1f}, precision "
                         f"{te['precision' + k]['mean']:.2f}, recall {te['recall' + k]['mean']:.2f}")
        sel = d.get("selection", {})
        for arm, s in sel.items():
            scores = ", ".join(f"{lr}: " + ("diverged" if v is None else f"{v:.2f}") for lr, v in s["scores"].items())
            lines.append(f"- selection, {ARM_LABELS.get(arm, arm)}: {scores}; pick {s['pick']:g}"
                         + (f" (at the {s['edge']} edge)" if s.get("edge") else ""))
        if "better_ect" in d:
            lines.append(f"- better ECT: {ARM_LABELS[d['better_ect']]}")
        fl = d.get("ect_flattening")
        if fl:
            lines.append(f"- ECT's 1-step FD_eval changes by {100 * fl['relative_change']:.1f}% from iteration "
                         f"{fl['from']} to {fl['to']}: {'flattened' if fl['flattened'] else 'NOT flattened'} "
                         f"(criterion: < {100 * fl['tolerance']:.0f}%)")
        if "headline" in d:
            lines.append(_reach_line("headline", d["headline"], "ect", "ayt"))
        for h, r in d.get("headline_by_horizon", {}).items():
            if int(h) != d["horizon"]:
                lines.append(_reach_line(f"at the shorter horizon {h}", r, "ect", "ayt"))
        bc = d.get("batch_claim")
        if bc:
            lines.append(f"- batch claim at iteration {bc['iteration']}: AYT at batch 16 {_cell(bc['ayt_bs16'])}, "
                         f"better ECT at batch {BIG_BATCH} {_cell(bc['ect_bs64'])} (1-step FD_eval)")
        if d.get("diverged"):
            lines.append("- diverged (non-finite loss; not retried, left out of the means): "
                         + ", ".join(f"{n} at iteration {i}" for n, i in d["diverged"].items()))
        table = _score_table([*d.get("groups", {}).items(), *d.get("long", {}).items()])
        if len(table) > 2:
            lines += ["", *table]
        fam = d.get("family")
        if fam:
            lines += ["", f"*Family arms* ({'complete' if fam['complete'] else 'incomplete'}; learning rates "
                      + ", ".join(f"{a} {lr:g}" for a, lr in fam["lr"].items()) + ")", ""]
            lines += [_reach_line(f"{b} vs {c}", fam["pairs"][f"{b}_vs_{c}"], b, c) for b, c in FAMILY_PAIRS]
            lines += ["", *_score_table(list(fam["groups"].items()))]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_summary(root: Path, summary: dict) -> Path:
    path = Path(root) / "mini-study.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def chosen_runs(ds_root: Path, seed: int = 0) -> dict[str, Path]:
    """{'ect': ..., 'ayt': ...}: the reporting runs at `seed` of AYT and of the better ECT arm, each at its
    selected learning rate (batch 16). Empty until the selection has finished."""
    sel = selection(Path(ds_root))
    if not selected(sel):
        return {}
    ect = better_ect(sel)
    runs = {"ect": Path(ds_root) / run_name(ect, sel[ect]["pick"], 16, seed),
            "ayt": Path(ds_root) / run_name("ayt", sel["ayt"]["pick"], 16, seed)}
    return {k: p for k, p in runs.items() if _trained(p)}


def chosen_family_runs(ds_root: Path, seed: int = 0) -> dict[str, Path]:
    """{arm: run} of the family arms (step 5) at `seed` and their borrowed learning rate, those trained."""
    sel = selection(Path(ds_root))
    if not selected(sel):
        return {}
    runs = {arm: Path(ds_root) / run_name(arm, lr, 16, seed) for arm, lr in family_lrs(sel).items()}
    return {k: p for k, p in runs.items() if _trained(p)}


def figure_runs(ds_root: Path, sampler: str = "1step", family: bool = False) -> list[dict]:
    """The reporting runs of one dataset as `ayt.plotting.describe_run` dicts, labelled by arm (the control
    as 'AYT (untrained phi)'), for `plotting.metric_vs_iterations`: AYT, the better ECT and the control at
    batch 16, the better ECT at batch 64; with `family`, the family arms and AYT instead."""
    from .plotting import describe_run
    sel = selection(Path(ds_root))
    if not selected(sel):
        return []
    ect = better_ect(sel)
    if family:
        wanted = {("ayt", sel["ayt"]["pick"], False), *((a, lr, False) for a, lr in family_lrs(sel).items())}
    else:
        wanted = {("ayt", sel["ayt"]["pick"], False), (ect, sel[ect]["pick"], False), ("ayt", sel["ayt"]["pick"], True)}
    out = []
    for name, m in _runs(Path(ds_root)).items():
        if m["seed"] in SEEDS and (m["arm"], m["lr"], m["control"]) in wanted:
            info = describe_run(Path(ds_root) / name, sampler, METRIC)
            if info and info["curve"]:
                info["method"] = ("AYT (untrained phi)" if m["control"] else
                                  ARM_LABELS.get(m["arm"]) or GROUP_LABELS[m["arm"]])
                out.append(info)
    return out


def sample_figures(root: Path, figures_dir: Path, n: int = 64, seed: int = 0) -> list[Path]:
    """1- and 2-step sample grids of the chosen ECT and AYT runs of every dataset and of its family arms at
    the same seed, where they have run (same noise for all), upscaled and titled with run, iteration and
    sampler (`ayt.plotting.sample_grid`)."""
    import torch
    from .plotting import sample_grid, sample_title, save_figure
    from .sampling import generate
    from .runs import load_run_model
    out = []
    for ds in DATASETS:
        for method, run in {**chosen_runs(Path(root) / ds, seed), **chosen_family_runs(Path(root) / ds, seed)}.items():
            net, cfg, state = load_run_model(run)
            for steps in (1, 2):
                x = generate(net, cfg.stage, n, state["img_channels"], cfg.data.resolution, state["label_dim"], seed,
                             torch.device("cpu"), steps=steps)
                title = sample_title(f"{ds}/{run.name}", state["iteration"], cfg.stage, steps, n, seed)
                out += save_figure(sample_grid(x, title, nrow=8),
                                   Path(figures_dir) / f"samples_study_{ds}_{method}_{steps}step", pdf=False)
    return out


def build_evaluator(root: Path, ds: str, device: str) -> Path:
    """Train (once) the dataset's independent evaluator into <root>/<ds>/evaluator.pt, and build the
    held-out reference data with it, before the parallel evaluations read both."""
    from .config import make_config
    from .evaluate import EvalConfig, FeatureSpace
    cfg = make_config("mini-diffusion", DATA_OVERRIDES[ds] + [f"run_root={root / ds}"])
    path = Path(root) / ds / "evaluator.pt"
    space = FeatureSpace(cfg, EvalConfig(metric=METRIC, evaluator=str(path), ref_images=N_REF, device=device), device,
                         log=lambda m: print(m, flush=True))
    print(f"[study] {ds}: reference {space.ref_note}", flush=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ayt study", description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--run-root", default="runs/study", help="where the study's run directories go")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel, one CPU thread each")
    ap.add_argument("--device", default="cpu", help="device of every run: cpu or cuda")
    ap.add_argument("--datasets", default=",".join(DATASETS),
                    help=f"comma-separated subset of {', '.join(DATASETS)} to run (the summary covers every "
                         "dataset under the run root)")
    ap.add_argument("--family", action="store_true",
                    help="after the main protocol, also run the family arms: CCD vs CCD-AYT, CT vs CT-AYT, AYT with "
                         "autoencoder vs VGG features (about 3.5 more hours per dataset on 2 CPU cores, measured on the shapes)")
    ap.add_argument("--summary-only", action="store_true", help="only rebuild mini-study.json from the run directories")
    ap.add_argument("--report", metavar="SUMMARY", help="only print a summary JSON as the README's Markdown tables")
    ap.add_argument("--sample-figures", metavar="DIR", help="only write sample grids of the chosen runs to DIR")
    ap.add_argument("--build-evaluator", metavar="DATASET", help=argparse.SUPPRESS)  # used by the driver
    args = ap.parse_args(argv)
    root = Path(args.run_root)
    datasets = tuple(d for d in args.datasets.split(",") if d)
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        ap.error(f"unknown dataset(s) {unknown}; known: {', '.join(DATASETS)}")
    if args.build_evaluator:
        print(f"[study] evaluator ready: {build_evaluator(root, args.build_evaluator, args.device)}", flush=True)
        return 0
    if args.report:
        if not Path(args.report).is_file():
            ap.error(f"--report {args.report}: no such summary file (python -m ayt study writes <run-root>/mini-study.json)")
        print(report_markdown(json.loads(Path(args.report).read_text())), end="")
        return 0
    if args.sample_figures:
        for p in sample_figures(root, Path(args.sample_figures)):
            print("wrote", p)
        return 0
    if args.summary_only:
        path = write_summary(root, summarize(root))
    else:
        summary = Study(root, args.device, args.workers, log=lambda m: print(m, flush=True)).run(datasets, args.family)
        path = root / "mini-study.json"
    print(f"[study] summary: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
