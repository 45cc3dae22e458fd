"""Command line: python -m ayt {train,sample,demo,presets} ...   (see README)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import PRESETS, ConfigError, describe_settings, make_config

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
        cfg = make_config(preset, [f"run_root={args.run_root}"] + args.overrides)
        # the later stages read the earlier ones from the same run root
        if cfg.net.init and cfg.net.init.startswith("runs/"):
            cfg.net.init = str(Path(args.run_root) / Path(cfg.net.init).name)
        if cfg.ct.feature_net and cfg.ct.feature_net.startswith("runs/"):
            cfg.ct.feature_net = str(Path(args.run_root) / Path(cfg.ct.feature_net).name)
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


def main(argv=None) -> int:
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

    pr = sub.add_parser("presets", help="list presets and their settings")
    pr.set_defaults(fn=lambda a: print(_presets_text()) or 0)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
