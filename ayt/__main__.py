"""Command line: python -m ayt {train,sample,eval,plot,demo,study,notebook,presets} ...   (see README).

Exit codes: 0 done; 1 the run failed (non-finite loss, disk full or another I/O error; the last
checkpoint is intact); 2 bad input or a refused start (settings, files, checkpoints, a run in use).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cli import HelpFormatter
from .config import (PRESET_PURPOSES, PRESETS, ConfigError, TrainConfig, describe_settings, format_settings,
                     make_config, relocated_run_references)

DEMO_STAGES = ("demo-feature-net", "demo-diffusion", "demo-ect", "demo-ayt")
DEMO_EVAL_SAMPLES = 1000  # samples per score in the demo's closing comparison
CPU_PAPER_SCALE_N = 10000  # eval: sample counts from here on are paper scale (a warning on a CPU)


def _presets_text() -> str:
    return "presets (python -m ayt presets NAME shows one's settings):\n" + "\n".join(
        f"  {name:23s} {p.get('stage', 'consistency'):12s} {PRESET_PURPOSES[name]}" for name, p in PRESETS.items())


def cmd_presets(args) -> int:
    if args.name is None:
        print(_presets_text())
        return 0
    cfg = make_config(args.name)
    print(f"preset {args.name} (stage {cfg.stage}): {PRESET_PURPOSES[args.name]}\n"
          f"settings (* = set by the preset, with the default it replaces; defaults = paper reference):")
    print(format_settings(cfg, TrainConfig()))
    return 0


def cmd_train(args) -> int:
    from .train import train
    cfg = make_config(args.preset, args.overrides)
    if args.dry_run:
        return dry_run(cfg, args.resume)
    train(cfg, resume=args.resume, allow_world_change=args.allow_world_change)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def dry_run(cfg: TrainConfig, resume: bool) -> int:
    """What `train` would do: the resolved settings, the run directory, fresh start or resume. Reads only."""
    from . import checkpoint as ck
    from .tracking import TB_DIR, check_available
    from .train import prepare_run_dir
    run_dir = prepare_run_dir(cfg, resume)  # the same refusals as a real start (existing run, changed settings)
    check_available(cfg.log)
    print("settings (* = differs from the defaults, which are the paper reference):")
    print(format_settings(cfg, TrainConfig()))
    latest = ck.latest_checkpoint(run_dir) if resume else None
    state = "exists" if run_dir.exists() else "does not exist yet"
    print(f"run directory: {run_dir} ({state})")
    if latest is None:
        print(f"would start fresh: iterations 0 -> {cfg.iters}")
    else:
        it = max(i for i, _ in ck.list_checkpoints(run_dir))
        print(f"would resume from {latest}: iterations {it} -> {cfg.iters}"
              + (" (already complete: only results.json would be rewritten)" if it >= cfg.iters else ""))
    if cfg.log.tensorboard:
        print(f"live metrics: {run_dir / TB_DIR / 'train'} (tensorboard --logdir {cfg.run_root})")
    print("dry run: nothing was created or changed")
    return 0


def cmd_demo(args) -> int:
    """The whole pipeline on the built-in shapes data: a feature net that learns, diffusion pretraining,
    then ECT and AYT tuning from the same teacher, scored side by side."""
    from .evaluate import EvalConfig, evaluate_run
    from .runs import warn_if_feature_net_untrained
    from .train import train
    t0 = time.time()
    runs = {}
    for preset in DEMO_STAGES:
        base = [f"run_root={args.run_root}"] + args.overrides
        cfg = make_config(preset, base)  # the later stages read the earlier ones from the same run root:
        cfg = make_config(preset, base + relocated_run_references(cfg, args.overrides))
        runs[preset] = train(cfg, resume=True)
        if cfg.stage == "feature":
            warn_if_feature_net_untrained(runs[preset])
    ecfg = EvalConfig(metric="swd", n=args.eval_samples, runs=1, steps=(1, 2), dfid_sigmas=(), extras=False)
    print(f"[ayt] demo: scoring ECT and AYT on {ecfg.n} samples each (multi-scale SWD in pixels, x1e3; lower is better)",
          flush=True)
    scores = {p: {r["sampler"]: r["swd"]["mean"] for r in evaluate_run(runs[p], ecfg, "latest", log=lambda *a: None)}
              for p in ("demo-ect", "demo-ayt")}
    print(f"[ayt] demo finished in {time.time() - t0:.0f} s")
    for p in ("demo-ect", "demo-ayt"):
        print(f"  {p:9s} SWD 1-step {scores[p]['1step']:8.3f}   2-step {scores[p]['2step']:8.3f}   "
              f"samples: {runs[p] / 'samples'}")
    return 0


def cmd_sample(args) -> int:
    import torch
    import torchvision
    from .sampling import generate
    from .runs import load_run_model
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, cfg, state = load_run_model(args.run, "ema", device)
    if cfg.stage == "feature":
        raise ConfigError(f"{args.run} is a feature-network run; nothing to sample")
    x = generate(net, cfg.stage, args.n, state["img_channels"], cfg.data.resolution, state["label_dim"],
                 args.seed, device, steps=args.steps, progress=True)
    run_dir = Path(cfg.run_root) / cfg.name if Path(args.run).is_file() else Path(args.run)
    out = Path(args.out or run_dir / "samples" / f"sample-{state['iteration']:08d}-{args.steps}step-seed{args.seed}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image((x + 1) / 2, str(out), nrow=int(max(1, args.n ** 0.5)))
    print(f"[ayt] {args.n} samples from {args.run} (iteration {state['iteration']}) -> {out}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import EvalConfig, evaluate_run
    from .train import setup_distributed
    ecfg = EvalConfig(metric=args.metric, n=args.n, runs=args.runs, steps=tuple(args.steps),
                      dfid_sigmas=tuple(args.dfid_sigmas) if args.dfid else (), batch=args.batch, seed=args.seed,
                      ref=args.ref, ref_images=args.ref_images, inception=args.inception, evaluator=args.evaluator,
                      evaluator_steps=args.evaluator_steps, swd_images=args.swd_images,
                      extras=not args.no_extras, device=args.device)
    d = setup_distributed(args.device)  # under torchrun: samples and features split across ranks
    if ecfg.device is None:
        ecfg.device = str(d.device)
    warning = cpu_cost_warning(ecfg, args.runs_dirs[0])
    if warning and d.is_main:
        print(warning, file=sys.stderr, flush=True)
    for run in args.runs_dirs:
        evaluate_run(run, ecfg, args.checkpoints, log=print if d.is_main else (lambda *a: None), track=args.track)
    return 0


def cpu_cost_warning(ecfg, run_dir=None) -> str | None:
    """One line when paper-scale evaluation settings (n >= 10,000, or several sampling runs with dFID)
    are about to run on a CPU: the number of images per checkpoint and the flags that shrink it."""
    import json
    import torch
    from .evaluate import samples_per_checkpoint
    if torch.device(ecfg.device).type != "cpu":
        return None
    if ecfg.n < CPU_PAPER_SCALE_N and not (ecfg.runs > 1 and ecfg.dfid_sigmas):
        return None
    cfg_file = Path(run_dir) / "config.json" if run_dir is not None else None
    stage = json.loads(cfg_file.read_text()).get("stage", "consistency") if cfg_file and cfg_file.exists() \
        else "consistency"
    samplers = 1 if stage == "diffusion" else len(ecfg.steps)
    dfid = 0 if stage == "diffusion" else len(ecfg.dfid_sigmas)
    total = samples_per_checkpoint(stage, ecfg)
    return (f"warning: paper-scale evaluation on a CPU: {ecfg.runs} run(s) x {ecfg.n} samples x ({samplers} "
            f"sampler(s) + {dfid} dFID sigma(s)) = {total:,} generated images per checkpoint, each through the "
            f"feature network; expect hours. Shrink it with --n 2000 --runs 1 --no-dfid, or run on a GPU.")


def cmd_plot(args) -> int:
    """Loss curves (metrics.jsonl) and score curves (results.json evaluations) of runs, as PNG."""
    import json
    from .plotting import eval_curve, loss_curves, metric_vs_iterations, read_metrics, save_figure
    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not (r / "config.json").exists():
            raise FileNotFoundError(f"{r} is not a run directory (no config.json)")
    names = [r.name for r in runs]
    stem = "+".join(names) if len("+".join(names)) <= 80 else f"{names[0]}+{len(names) - 1}-more"
    out_dir = Path(args.out)
    written: list[Path] = []
    logged = {r.name: read_metrics(r) for r in runs}
    if any(logged.values()):
        keys = [k.strip() for k in args.keys.split(",") if k.strip()] if args.keys else None
        if keys:
            found = {k for recs in logged.values() for rec in recs for k in rec}
            missing = [k for k in keys if k not in found]
            if missing:
                raise ValueError(f"--keys {','.join(missing)}: not logged in metrics.jsonl of {', '.join(names)}; "
                                 f"logged: {', '.join(sorted(found - {'iteration'}))}")
        fig = loss_curves(runs, keys, title=f"training curves: {', '.join(names)}")
        written += save_figure(fig, out_dir / f"{stem}-losses", pdf=False)
    results = {r: json.loads((r / "results.json").read_text()) if (r / "results.json").exists() else {} for r in runs}
    samplers = sorted({rec["sampler"] for res in results.values() for rec in res.get("eval", [])})
    for sampler in samplers:
        curves = []
        for r, res in results.items():
            curve = eval_curve(res, sampler)
            if curve:
                cfg = json.loads((r / "config.json").read_text())
                curves.append({"method": r.name, "batch": cfg.get("batch"), "lr": cfg.get("optim", {}).get("lr"),
                               "curve": curve})
        metric = next(rec["metric"] for res in results.values() for rec in res.get("eval", [])
                      if rec["sampler"] == sampler)
        label = {"fid": "FID", "dfid": "dFID", "fd_eval": "FD_eval", "dfd_eval": "dFD_eval"}.get(metric, metric)
        fig = metric_vs_iterations(curves, label, best_lr=False, title=f"{label}, sampler {sampler}")
        written += save_figure(fig, out_dir / f"{stem}-{metric}-{sampler.replace('@', '-sigma')}", pdf=False)
    if not written:
        raise ValueError(f"nothing to plot: {', '.join(map(str, runs))} have no metrics.jsonl records and no "
                         "evaluations in results.json")
    for p in written:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ayt", description="Align Your Tangent: training and sampling.",
                                formatter_class=HelpFormatter, epilog=_presets_text())
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    device_help = "torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)"

    t = sub.add_parser("train", help="train a feature net, a diffusion model, or a consistency model",
                       formatter_class=HelpFormatter, description="Train one run: defaults <- preset <- key=value.",
                       epilog=_presets_text() + "\n\nsettings (key=value, defaults = paper reference):\n" + describe_settings())
    t.add_argument("--preset", help="named preset (listed below; default: none, the paper-reference defaults)")
    t.add_argument("--resume", action="store_true", help="continue the run from its newest readable checkpoint")
    t.add_argument("--allow-world-change", action="store_true",
                   help="resume with another number of processes or batch_per_device than the checkpoint was "
                        "written with (the run will not be bitwise identical to an uninterrupted one)")
    t.add_argument("--dry-run", action="store_true",
                   help="print the resolved settings, the run directory and whether the run would start fresh or "
                        "resume, then exit without creating anything")
    t.add_argument("overrides", nargs="*", help="settings as key=value, e.g. optim.lr=5e-4 iters=1000 (default: none)")
    t.set_defaults(fn=cmd_train)

    dm = sub.add_parser("demo", help="the whole pipeline on the built-in shapes data in a few CPU minutes",
                        formatter_class=HelpFormatter, description=f"Runs the presets {', '.join(DEMO_STAGES)}.")
    dm.add_argument("--run-root", default="runs", help="where the four demo runs go")
    dm.add_argument("--eval-samples", type=int, default=DEMO_EVAL_SAMPLES, help="samples per closing score")
    dm.add_argument("overrides", nargs="*", help="settings applied to every demo stage, e.g. device=cpu (default: none)")
    dm.set_defaults(fn=cmd_demo)

    s = sub.add_parser("sample", help="write a sample grid from a run's EMA network", formatter_class=HelpFormatter,
                       description="Draw samples from a run's EMA network and write them as one PNG grid.")
    s.add_argument("run", help="run directory (its latest checkpoint) or checkpoint file")
    s.add_argument("--n", type=_positive_int, default=64, help="number of samples in the grid")
    s.add_argument("--steps", type=int, default=1, choices=(1, 2),
                   help="consistency sampling steps (diffusion runs always use the 18-step Heun sampler)")
    s.add_argument("--seed", type=int, default=0, help="seed of the noise (batch i uses the seed (seed, i))")
    s.add_argument("--device", help=device_help)
    s.add_argument("--out", help="PNG file to write (default: <run>/samples/sample-<iteration>-<steps>step-seed<seed>.png)")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="FID / FD_eval / SWD of runs' checkpoints (1- and 2-step, dFID); appends to "
                       "results.json",
                       formatter_class=HelpFormatter,
                       description="Evaluate checkpoints; records go to <run>/results.json (key 'eval') and, with "
                                   "the run's log.* settings, to TensorBoard (<run>/tb/eval) and W&B. The defaults "
                                   "are the paper's protocol (50k samples x 3 runs, dFID at 3 sigmas): on a CPU use "
                                   "e.g. --n 2000 --runs 1 --no-dfid.")
    e.add_argument("runs_dirs", nargs="+", metavar="RUN", help="run directories")
    e.add_argument("--checkpoints", default="latest", help="latest | all | comma-separated iterations")
    e.add_argument("--metric", default="auto", choices=("auto", "fid", "fd_eval", "swd"),
                   help="auto: FID when the Inception weights are on disk, else FD_eval (a classifier evaluator "
                        "trained once on the run's labelled data, or the shapes evaluator), else SWD (multi-scale "
                        "sliced Wasserstein, no network); one line says which and why")
    e.add_argument("--n", type=int, default=50000, help="samples per sampling run")
    e.add_argument("--runs", type=int, default=3, help="sampling runs per checkpoint (mean, std, min)")
    e.add_argument("--steps", type=int, nargs="+", default=[1, 2], choices=(1, 2),
                   help="consistency samplers to evaluate (1- and/or 2-step)")
    e.add_argument("--dfid", action=argparse.BooleanOptionalAction, default=True,
                   help="also compute dFID (one-step denoising FID at --dfid-sigmas; consistency runs)")
    e.add_argument("--dfid-sigmas", type=float, nargs="+", default=[0.2, 0.4, 0.8], metavar="SIGMA",
                   help="noise levels of dFID")
    e.add_argument("--batch", type=int, default=500, help="images per batch when sampling and extracting features")
    e.add_argument("--seed", type=int, default=0, help="sampling run k uses seed + 1000 k")
    e.add_argument("--ref", help="reference statistics .npz (keys mu, sigma), e.g. pytorch-fid's or EDM's CIFAR-10 "
                                 "file (default: computed from the run's data, cached in data/fid-refs/)")
    e.add_argument("--ref-images", type=int, default=50000,
                   help="real images for computed reference statistics (FID) and reference features (FD_eval)")
    e.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth (default: $AYT_INCEPTION_WEIGHTS, "
                                       "then the torch hub cache)")
    e.add_argument("--evaluator", help="FD_eval evaluator file: loaded if it exists, else trained and saved there "
                   "(default: data/evaluators/<dataset key>.pt)")
    e.add_argument("--evaluator-steps", type=int, default=3000, help="training steps of a new FD_eval evaluator")
    e.add_argument("--swd-images", type=int, default=8192, help="SWD: at most this many images per set (ProGAN: 8192)")
    e.add_argument("--no-extras", action="store_true", help="fd_eval: skip precision/recall, SWD, manifold error")
    e.add_argument("--track", action=argparse.BooleanOptionalAction, default=True,
                   help="log the scores to the run's TensorBoard / W&B as its log.* settings say")
    e.add_argument("--device", help=device_help)
    e.set_defaults(fn=cmd_eval)

    pl = sub.add_parser("plot", help="loss and score curves of runs as PNG", formatter_class=HelpFormatter,
                        description="Loss curves from <run>/metrics.jsonl and score-vs-iteration curves (one figure "
                                    "per sampler) from the evaluations in <run>/results.json; prints the files.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories (one line per run in every panel)")
    pl.add_argument("--out", default="runs/plots", help="directory for the PNG files")
    pl.add_argument("--keys", help="comma-separated logged quantities, e.g. loss,lr (default: every logged loss "
                                   "statistic)")
    pl.set_defaults(fn=cmd_plot)

    sub.add_parser("study", help="the mini study: AYT vs ECT on the shapes data, on CPU (see --help)", add_help=False)
    sub.add_parser("notebook", help="execute a notebook headless with papermill: NOTEBOOK [-p NAME VALUE ...] "
                   "(see --help)", add_help=False)

    pr = sub.add_parser("presets", help="list presets (stage, purpose), or one preset's resolved settings",
                        formatter_class=HelpFormatter)
    pr.add_argument("name", nargs="?", choices=list(PRESETS), metavar="NAME",
                    help="print every setting of this preset, marking those it changes (default: list all presets)")
    pr.set_defaults(fn=cmd_presets)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["study"]:
        from .study import main as study_main
        return study_main(argv[1:])
    if argv[:1] == ["notebook"]:
        from .nbrun import main as notebook_main
        return notebook_main(argv[1:])
    p = build_parser()

    args = p.parse_args(argv)
    from .checkpoint import RunInUseError
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError, RunInUseError) as e:  # bad input, refused start
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as e:  # the run failed: non-finite loss, disk full, I/O
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
