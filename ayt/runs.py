"""Runs: build the data and networks a config names, and load them back from run directories /
checkpoints / EDM pickles.

The training loop (ayt.train), evaluation (ayt.evaluate), `python -m ayt sample`, the analysis
(ayt.analysis), the continuous modes' teacher and feature net (ayt.continuous), the notebooks' glue
(ayt.notebook), the explorer and the study all build and load networks here; none of them needs the
training loop to do so.

  build_dataset, build_diffusion_net      the data set and the diffusion / consistency network of a config
  resolve_pretrained, load_init_weights   net.init: a run directory, an ayt checkpoint, one of EDM's released
                                          .pkl files (downloaded once) or a .pt state dict
  read_ayt_checkpoint                     a run directory's newest readable checkpoint, or a file's, if it is one
  load_feature_net                        a frozen feature network phi (ct.feature_net) for the MFD
  load_run_model                          a run's network, config and checkpoint for sampling and evaluation
  feature_net_verdict, warn_if_feature_net_untrained   did a feature run learn (its per-label R^2)?

Checkpoint files and run-directory layout: ayt.checkpoint and docs/architecture.md section 4.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint as ck
from .config import ConfigError, TrainConfig, from_dict
from .data import dataset_kwargs, get_dataset
from .features import build_feature_net, feature_net_from_state, freeze
from .networks import NETWORK_CONFIGS, build_network, load_edm_checkpoint, load_into

# EDM's released checkpoints (Karras et al. 2022), downloaded on demand when net.init names one.
EDM_PRETRAINED_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
EDM_PRETRAINED = ("edm-cifar10-32x32-uncond-vp.pkl", "edm-cifar10-32x32-cond-vp.pkl",
                  "edm-cifar10-32x32-uncond-ve.pkl", "edm-imagenet-64x64-cond-adm.pkl",
                  "edm-ffhq-64x64-uncond-vp.pkl", "edm-afhqv2-64x64-uncond-vp.pkl")


# ----------------------------------------------------------------------------------------------
# Building the data and the networks a config names

def build_dataset(cfg: TrainConfig):
    """The data set cfg.data names (ayt.data), checked against data.resolution."""
    d = cfg.data
    ds = get_dataset(**dataset_kwargs(d))
    if ds.resolution != d.resolution:
        raise ConfigError(f"data.resolution={d.resolution} but the dataset {d.name!r} has {ds.resolution}x{ds.resolution} images")
    return ds


def build_diffusion_net(cfg: TrainConfig, img_channels: int, label_dim: int) -> torch.nn.Module:
    """The EDM-preconditioned network of cfg.net (architecture, dropout) at cfg.data.resolution, randomly
    initialised (the diffusion and consistency stages; `load_init_weights` loads net.init into it)."""
    if cfg.net.arch not in NETWORK_CONFIGS:
        raise ConfigError(f"unknown net.arch {cfg.net.arch!r}; known: {', '.join(NETWORK_CONFIGS)}")
    kwargs = dict(NETWORK_CONFIGS[cfg.net.arch])
    if cfg.net.dropout is not None:
        kwargs["dropout"] = cfg.net.dropout
    return build_network(kwargs, img_resolution=cfg.data.resolution, img_channels=img_channels, label_dim=label_dim)


def resolve_pretrained(path: str) -> Path:
    """A local path, or one of EDM's released checkpoints (downloaded once into data/pretrained/)."""
    p = Path(path)
    if p.exists():
        return p
    if p.name in EDM_PRETRAINED:
        dest = Path("data/pretrained") / p.name
        if dest.exists():
            return dest
        url = EDM_PRETRAINED_URL + p.name
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(dest), progress=False)
            return dest
        except Exception as e:
            raise FileNotFoundError(f"EDM checkpoint {p.name} is not at {p} or {dest} and could not be downloaded "
                                    f"from {url} ({e}). Download it by hand and pass its path as net.init.") from e
    hint = (f" (presets name the runs they build on as runs/<name>, relative to the working directory; with "
            f"another run_root, pass the run's path, e.g. net.init=<run_root>/{p.name})" if p.parts[:1] == ("runs",) else "")
    raise FileNotFoundError(f"net.init: no such file or run directory: {p}{hint}")


def load_init_weights(net: torch.nn.Module, path: str) -> str:
    """Initialise `net` from a run directory / ayt checkpoint (its EMA), an EDM .pkl or a .pt state dict."""
    p = resolve_pretrained(path)
    ckpt = read_ayt_checkpoint(p) if p.is_dir() or p.suffix == ".pt" else None
    if ckpt is not None:
        stage = ckpt.get("stage") or from_dict(ckpt["config"]).stage
        if stage == "feature":
            raise ck.CheckpointError(f"net.init={path} is a feature-network run (stage 'feature'), it does not "
                                     "match this model. net.init takes a diffusion or consistency run directory, "
                                     "an ayt checkpoint of one, an EDM .pkl or a .pt state dict; the feature network "
                                     "goes into ct.feature_net")
        ck.load_state_dict_strict(net, ckpt["ema"], f"net.init checkpoint {p}")
        return f"ayt checkpoint {p} (EMA, iteration {ckpt['iteration']})"
    load_into(net, load_edm_checkpoint(str(p)), strict=True)
    return f"{p}"


def read_ayt_checkpoint(p: Path) -> Optional[dict]:
    """A run directory's newest readable checkpoint or snapshot, or the file's checkpoint if it is an ayt
    checkpoint (else None); the file is read once."""
    if p.is_dir():
        return ck.load_run_checkpoint(p, "ema")[1]
    try:
        obj = ck.read_torch_file(p)
    except ck.CheckpointError:
        return None
    return ck.check_checkpoint(obj, p) if ck.is_checkpoint(obj) else None


def load_feature_net(path: str, arch: str, resolution: int, in_channels: int, num_outputs: int) -> torch.nn.Module:
    """A frozen feature network phi from a feature run directory / ayt checkpoint (architecture read
    from its config) or from a plain state dict (e.g. the authors' release; architecture from args)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"ct.feature_net: no such run directory or file: {p} "
                                "(train one first: python -m ayt train --preset <...>-feature-net)")
    obj = ck.load_run_checkpoint(p, "model")[1] if p.is_dir() else ck.read_torch_file(p)
    if ck.is_checkpoint(obj):
        if int(obj.get("iteration", 0)) > 0:  # an iters=0 net is an intended untrained control
            warn_if_feature_net_untrained(p)
        ckpt = ck.check_checkpoint(obj, p)
        if ck.is_snapshot(ckpt):
            raise ck.CheckpointError(f"ct.feature_net={p} is an EMA-only snapshot; pass the feature run directory "
                                     "or one of its full checkpoints (checkpoints/ckpt-*.pt)")
        fcfg = from_dict(ckpt["config"])
        if fcfg.stage != "feature":
            raise ck.CheckpointError(f"ct.feature_net={p} is a {fcfg.stage!r} run, not a feature-network run")
        if fcfg.data.resolution != resolution:
            raise ConfigError(f"feature net {p} was trained at {fcfg.data.resolution} px; this run is at {resolution} px")
        phi = build_feature_net(fcfg.feature.arch, resolution=resolution, in_channels=in_channels,
                                num_outputs=ckpt["num_outputs"])
        ck.load_state_dict_strict(phi, ckpt["model"], f"feature net {p}")
    else:  # a plain state dict, e.g. the authors' clf_iter*.pt (DataParallel 'module.' prefixes are stripped)
        try:
            phi = feature_net_from_state(obj, arch, str(p), resolution=resolution, in_channels=in_channels,
                                         num_outputs=num_outputs)
        except ValueError as e:
            raise ck.CheckpointError(f"ct.feature_net={p}: {e}") from None
    return freeze(phi)


def load_run_model(path, which: str = "ema", device="cpu") -> tuple[torch.nn.Module, TrainConfig, dict]:
    """(network in eval mode, its run config, the checkpoint dict) from a run directory (its newest readable
    checkpoint or snapshot, see `ayt.checkpoint.load_run_checkpoint`), checkpoint or snapshot file.
    which: "ema" (what sampling and evaluation use) or "model" (the raw weights; full checkpoints only)."""
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    ckpt_path, state = ck.load_run_checkpoint(path, which)
    cfg = from_dict(state["config"])
    if cfg.stage == "feature":
        net = build_feature_net(cfg.feature.arch, resolution=cfg.data.resolution, in_channels=state["img_channels"],
                                num_outputs=state["num_outputs"])
    else:
        net = build_diffusion_net(cfg, state["img_channels"], state["label_dim"])
    ck.load_state_dict_strict(net, state[which], f"checkpoint {ckpt_path}")
    return net.to(device).eval(), cfg, state


# ----------------------------------------------------------------------------------------------
# Judging a feature run

# A feature network "learned" when at least LEARNED_LABELS of its labels reach R^2 >= LEARNED_R2 on
# held-out augmented images (R^2 = 0: no better than predicting the mean label). On the shapes the
# degradation labels (noise, blur) are learned first and the colour/rotation labels hardly at all (the
# data already randomises them), so two labels is the bar; a net below it is close to the untrained
# control arm of the mini study (docs/mini-study.md), which gives no gain over ECT.
LEARNED_R2, LEARNED_LABELS = 0.5, 2


def feature_net_verdict(r2: dict[str, float], threshold: float = LEARNED_R2, min_labels: int = LEARNED_LABELS) -> dict:
    """{'learned': bool, 'labels_above': [...], 'threshold', 'min_labels'} from per-label R^2 (NaN: label never on)."""
    above = [k for k, v in r2.items() if v is not None and math.isfinite(v) and v >= threshold]
    need = min(min_labels, len(r2))
    return {"learned": len(above) >= need, "labels_above": above, "threshold": threshold, "min_labels": need}


def feature_net_verdict_line(verdict: dict, where) -> str:
    """The log line of a `feature_net_verdict` for the feature net at `where` (a loud warning when it did not learn)."""
    above = ", ".join(verdict["labels_above"]) or "none"
    if verdict["learned"]:
        return (f"[ayt] feature net {where} learned: {len(verdict['labels_above'])} labels reach R^2 >= "
                f"{verdict['threshold']} ({above})")
    return (f"[ayt] WARNING: feature net {where} did NOT learn: only {len(verdict['labels_above'])} label(s) reach "
            f"R^2 >= {verdict['threshold']} (need {verdict['min_labels']}; {above}). Its MFD gradient is close to an "
            "untrained network's, which gives no gain over ECT: train it longer (iters) or with a higher "
            "feature.p before using it for AYT.")


def warn_if_feature_net_untrained(path: Path) -> Optional[dict]:
    """Print the loud warning for a feature run directory whose results.json says it did not learn."""
    res = Path(path) / "results.json" if Path(path).is_dir() else Path(path).parent.parent / "results.json"
    if not res.exists():
        return None
    fn = json.loads(res.read_text()).get("feature_net")
    if not fn or "r2" not in fn:
        return None
    verdict = feature_net_verdict(fn["r2"])
    if not verdict["learned"]:
        print(feature_net_verdict_line(verdict, path), file=sys.stderr, flush=True)
    return verdict
