"""Command line: python -m ayt {train,sample,eval,demo,study,notebook,presets} ...   (see README)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import PRESETS, ConfigError, describe_settings, make_config, relocated_run_references

DEMO_STAGES = ("demo-feature-net", "demo-diffusion", "demo-ayt")


def _presets_text() -> str:
    return "presets:\n" + "\n".join(f"  {name:24s} stage={p.get('stage', 'consistency')}" for name, p in PRESETS.items())


def cmd_train(args) -> int:
    from .train import train
    cfg = make_config(args.preset, args.overrides)
    train(cfg, resume=args.resume)
    return 0


def cmd_demo(args) -> int:
    """The whole pipeline on the built-in shapes data: feature net, diffusion pretraining, AYT tuning."""
    from .train import train
    t0 = time.time()
    for preset in DEMO_STAGES:
        base = [f"run_root={args.run_root}"] + args.overrides
        cfg = make_config(preset, base)  # the later stages read the earlier ones from the same run root:
        cfg = make_config(preset, base + relocated_run_references(cfg, args.overrides))
        train(cfg, resume=True)
    print(f"[ayt] demo finished in {time.time() - t0:.0f} s; samples in {Path(args.run_root) / 'demo-ayt' / 'samples'}")
    return 0


def cmd_sample(args) -> int:
    import torch
    import torchvision
    from .sampling import generate
    from .train import load_run_model
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, cfg, state = load_run_model(args.run, "ema", device)
    if cfg.stage == "feature":
        raise ConfigError(f"{args.run} is a feature-network run; nothing to sample")
    x = generate(net, cfg.stage, args.n, state["img_channels"], cfg.data.resolution, state["label_dim"],
                 args.seed, device, steps=args.steps)
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
                      dfid_sigmas=tuple(args.dfid), batch=args.batch, seed=args.seed, ref=args.ref,
                      ref_images=args.ref_images, inception=args.inception, evaluator=args.evaluator,
                      extras=not args.no_extras, device=args.device)
    d = setup_distributed(args.device)  # under torchrun: samples and features split across ranks
    if ecfg.device is None:
        ecfg.device = str(d.device)
    for run in args.runs_dirs:
        evaluate_run(run, ecfg, args.checkpoints, log=print if d.is_main else (lambda *a: None))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["study"]:
        from .study import main as study_main
        return study_main(argv[1:])
    if argv[:1] == ["notebook"]:
        from .notebook import main as notebook_main
        return notebook_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m ayt", description="Align Your Tangent: training and sampling.",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_presets_text())
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a feature net, a diffusion model, or a consistency model",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=_presets_text() + "\n\nsettings (key=value, defaults = paper reference):\n" + describe_settings())
    t.add_argument("--preset", help="named preset (see below)")
    t.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    t.add_argument("overrides", nargs="*", help="settings as key=value, e.g. optim.lr=5e-4 iters=1000")
    t.set_defaults(fn=cmd_train)

    dm = sub.add_parser("demo", help="the whole pipeline on the built-in shapes data in a few CPU minutes")
    dm.add_argument("--run-root", default="runs", help="where the three demo runs go")
    dm.add_argument("overrides", nargs="*", help="settings applied to every demo stage, e.g. device=cpu")
    dm.set_defaults(fn=cmd_demo)

    s = sub.add_parser("sample", help="write a sample grid from a run's EMA network")
    s.add_argument("run", help="run directory or checkpoint file")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--steps", type=int, default=1, choices=(1, 2), help="consistency sampling steps")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device")
    s.add_argument("--out")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="FID / FD_eval of runs' checkpoints (1- and 2-step, dFID); appends to results.json")
    e.add_argument("runs_dirs", nargs="+", metavar="RUN", help="run directories")
    e.add_argument("--checkpoints", default="latest", help="latest | all | comma-separated iterations")
    e.add_argument("--metric", default="auto", choices=("auto", "fid", "fd_eval"),
                   help="auto: fd_eval (shapes evaluator) on the built-in shapes data, FID otherwise")
    e.add_argument("--n", type=int, default=50000, help="samples per sampling run")
    e.add_argument("--runs", type=int, default=3, help="sampling runs per checkpoint (mean, std, min)")
    e.add_argument("--steps", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    e.add_argument("--dfid", type=float, nargs="*", default=[0.2, 0.4, 0.8], help="dFID sigmas (none: --dfid)")
    e.add_argument("--batch", type=int, default=500)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--ref", help="reference statistics .npz (keys mu, sigma), e.g. pytorch-fid's or EDM's CIFAR-10 file")
    e.add_argument("--ref-images", type=int, default=50000, help="images for computed reference statistics")
    e.add_argument("--inception", help="pt_inception-2015-12-05-6726825d.pth (else $AYT_INCEPTION_WEIGHTS, hub cache)")
    e.add_argument("--evaluator", help="shapes evaluator file (default: trained once, cached under data/evaluators)")
    e.add_argument("--no-extras", action="store_true", help="fd_eval: skip precision/recall, SWD, manifold error")
    e.add_argument("--device")
    e.set_defaults(fn=cmd_eval)

    sub.add_parser("study", help="the mini study: AYT vs ECT on the shapes data, on CPU (see --help)", add_help=False)
    sub.add_parser("notebook", help="execute a notebook headless with papermill: NOTEBOOK [-p NAME VALUE ...] "
                   "(see --help)", add_help=False)

    pr = sub.add_parser("presets", help="list presets and their settings")
    pr.set_defaults(fn=lambda a: print(_presets_text()) or 0)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
