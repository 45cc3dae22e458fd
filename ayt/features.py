"""Manifold feature networks phi (docs/method.md section 3.1).

Every network exposes one interface:

    feats = net.features(x)    # list[Tensor]: every downsampling stage, then the head as [N, L, 1, 1]
    y = net(x)                 # [N, L]: the regression head (augmentation labels)

The manifold feature distance (ayt.losses) consumes `features`. The reference phi is a CIFAR-style
VGG16 with BatchNorm whose parameter names equal the authors' `VGG` (1202kbs/AYT
`src/ayt/classifiers.py`), so their released state dicts load with strict=True:

    layers.32x32_block0.conv.weight, layers.32x32_block0.bn.running_mean, ..., layers.classifier.weight

Networks: VGG (depths 11/13/16/19, custom configurations, max-pool or strided downsampling; also
registered under the authors' VGGMod names), ResNet18 / ResNet10 (CIFAR style), MLPFeatures (vector data,
the 2-D disk experiment); DenseNet, ViT and a denoising autoencoder live in ayt.feature_nets. `build_feature_net`
is the registry, `freeze` prepares a trained phi for the MFD, `feature_net_from_file` loads a
plain state-dict file.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor
Cfg = Sequence[Union[int, str]]

# CIFAR VGG configurations: integers are 3x3 conv-BN-ReLU blocks of that width, 'M' a 2x downsampling.
VGG_CONFIGS: dict[int, list[Union[int, str]]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# Small VGG for quick experiments: 1,178,031 parameters with a 15-label head.
MINI_VGG_CONFIG: list[Union[int, str]] = [32, 32, "M", 64, 64, "M", 128, 128, "M", 256, 256, "M"]


def _halvings(resolution: int) -> int:
    """How many times resolution can be halved exactly (its 2-adic valuation)."""
    k = 0
    while resolution % 2 == 0 and resolution > 1:
        resolution //= 2
        k += 1
    return k


def vgg_config(cfg: Cfg, resolution: int, widths: Optional[Sequence[int]] = None) -> list[Union[int, str]]:
    """The configuration a VGG uses at `resolution` (see `VGG`).

    widths: optional per-stage widths (a stage is the run of blocks before each 'M', plus any
    blocks after the last one) that replace every block width of that stage.
    Trailing stages are dropped when the image cannot be halved that often: a stage is kept only
    while the spatial size stays a whole number, so VGG16 (5 stages, 32 px -> 1x1) keeps 4
    stages at 16 px and all 5 at 64 px (ending at 2x2).
    """
    cfg = list(cfg)
    for e in cfg:
        if not (e == "M" or (isinstance(e, int) and e > 0)):
            raise ValueError(f"VGG configuration entries must be positive ints or 'M', got {e!r}")
    if not any(isinstance(e, int) for e in cfg):
        raise ValueError("a VGG configuration needs at least one conv block")
    if widths is not None:
        stages, stage = [], 0
        for e in cfg:
            stages.append(stage)
            stage += e == "M"
        n_stages = stage + (cfg[-1] != "M")
        if len(widths) != n_stages:
            raise ValueError(f"widths has {len(widths)} entries, the configuration has {n_stages} stages")
        cfg = [e if e == "M" else int(widths[s]) for e, s in zip(cfg, stages)]
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    keep = _halvings(resolution)
    n_pool = cfg.count("M")
    if n_pool > keep:
        if keep == 0:
            raise ValueError(f"resolution {resolution} cannot be halved; a VGG needs an even resolution")
        cut = [i for i, e in enumerate(cfg) if e == "M"][keep - 1]
        cfg = cfg[:cut + 1]
    return cfg



def _check_images(x: Tensor, channels: int, resolution: int) -> None:
    """Raise a clear error unless x is [N, channels, resolution, resolution]."""
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2:] != (resolution, resolution):
        raise ValueError(f"expected [N, {channels}, {resolution}, {resolution}] inputs, got {tuple(x.shape)}")

class VGGBlock(nn.Module):
    """3x3 conv (stride 1, or 2 for strided downsampling) -> BatchNorm (or identity) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, batchnorm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.bn = nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


class VGG(nn.Module):
    """CIFAR-style VGG feature network (docs/method.md section 3.1; the authors' `VGG` / `VGGMod`).

    Args:
        depth: 11, 13, 16 or 19 (VGG_CONFIGS); ignored when `cfg` is given.
        resolution: input size R (square). Stage names carry the resolution
            (`layers.{R}x{R}_block0`); stages that would halve an odd size are dropped (vgg_config).
        in_channels, num_outputs: input channels; L, the width of the regression head.
        widths: per-stage widths replacing the configuration's.
        cfg: a custom configuration such as MINI_VGG_CONFIG.
        downsample: 'maxpool' (2x2 max pooling, the reference) or 'stride' (the last conv of each
            stage has stride 2 and the pool is an identity, as the authors' VGGMod with
            use_maxpool=False; the same parameter names).
        batchnorm: BatchNorm after every conv (reference) or none.

    Layers (in `self.layers`, an nn.ModuleDict, in execution order): `{r}x{r}_block{i}`,
    `{r}x{r}_maxpool` ending each stage, `{r}x{r}_avgpool` over the final r x r map, and
    `classifier` = Linear(last width, L).
    features(x) -> the output of every `_maxpool` layer, then the head as [N, L, 1, 1]; at 32 px
    VGG16 gives 64x16x16, 128x8x8, 256x4x4, 512x2x2, 512x1x1, Lx1x1.
    """

    def __init__(self, depth: int = 16, resolution: int = 32, in_channels: int = 3, num_outputs: int = 15,
                 widths: Optional[Sequence[int]] = None, cfg: Optional[Cfg] = None,
                 downsample: str = "maxpool", batchnorm: bool = True):
        super().__init__()
        if cfg is None:
            if depth not in VGG_CONFIGS:
                raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth}")
            cfg = VGG_CONFIGS[depth]
        if downsample not in ("maxpool", "stride"):
            raise ValueError(f"downsample must be 'maxpool' or 'stride', got {downsample!r}")
        cfg = vgg_config(cfg, resolution, widths)
        if downsample == "stride":
            for i, e in enumerate(cfg):
                if e == "M" and (i == 0 or cfg[i - 1] == "M"):
                    raise ValueError("strided downsampling needs a conv block before every 'M'")
        self.cfg = cfg
        self.resolution = resolution
        self.in_channels = in_channels
        self.num_outputs = num_outputs
        self.downsample = downsample

        self.layers = nn.ModuleDict()
        res, ch, idx = resolution, in_channels, 0
        for i, e in enumerate(cfg):
            if e == "M":
                self.layers[f"{res}x{res}_maxpool"] = (nn.MaxPool2d(kernel_size=2, stride=2)
                                                       if downsample == "maxpool" else nn.Identity())
                res, idx = res // 2, 0
            else:
                stride = 2 if (downsample == "stride" and i + 1 < len(cfg) and cfg[i + 1] == "M") else 1
                self.layers[f"{res}x{res}_block{idx}"] = VGGBlock(ch, e, stride=stride, batchnorm=batchnorm)
                ch, idx = e, idx + 1
        self.layers[f"{res}x{res}_avgpool"] = nn.AvgPool2d(kernel_size=res, stride=res)
        self.layers["classifier"] = nn.Linear(ch, num_outputs)

    def _check(self, x: Tensor) -> None:
        _check_images(x, self.in_channels, self.resolution)

    def features(self, x: Tensor) -> list[Tensor]:
        """Stage outputs and the head ([N, L, 1, 1]) for x [N, C, R, R]."""
        self._check(x)
        feats = []
        for name, layer in self.layers.items():
            if name == "classifier":
                x = layer(x.flatten(1))
                feats.append(x[:, :, None, None])
            else:
                x = layer(x)
                if name.endswith("_maxpool"):
                    feats.append(x)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Regression head [N, L]."""
        self._check(x)
        for name, layer in self.layers.items():
            x = layer(x.flatten(1) if name == "classifier" else x)
        return x


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 conv-BN, identity or 1x1 conv-BN shortcut)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet18 (3x3 stem, no stem pooling; the authors' `ResNet` with [2, 2, 2, 2]).

    Parameter names as the authors' (conv1, bn1, layer1..layer4, linear). features(x) -> the
    outputs of layer1..layer4 (64xRxR, 128xR/2, 256xR/4, 512xR/8) and the head [N, L, 1, 1];
    the head follows a global average pool (the authors' 4x4 pool at 32 px).
    """

    def __init__(self, resolution: int = 32, in_channels: int = 3, num_outputs: int = 15,
                 widths: Sequence[int] = (64, 128, 256, 512), num_blocks: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        if resolution % 8 != 0:
            raise ValueError(f"ResNet18 halves the resolution 3 times; {resolution} is not a multiple of 8")
        if len(widths) != 4 or len(num_blocks) != 4:
            raise ValueError("ResNet18 needs 4 widths and 4 block counts")
        self.resolution = resolution
        self.in_channels = in_channels
        self.num_outputs = num_outputs
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (w, n) in enumerate(zip(widths, num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, stride=(2 if (i > 0 and j == 0) else 1)))
                in_planes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_outputs)

    def _check(self, x: Tensor) -> None:
        _check_images(x, self.in_channels, self.resolution)

    def features(self, x: Tensor) -> list[Tensor]:
        """Stage outputs and the head ([N, L, 1, 1]) for x [N, C, R, R]."""
        self._check(x)
        x = F.relu(self.bn1(self.conv1(x)))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        head = self.linear(x.mean(dim=(2, 3)))
        return feats + [head[:, :, None, None]]

    def forward(self, x: Tensor) -> Tensor:
        """Regression head [N, L]."""
        return self.features(x)[-1].flatten(1)


class MLPFeatures(nn.Module):
    """Fully connected feature network for vector data (the 2-D disk experiment).

    Inputs [N, D] or any [N, ...] with D entries per sample (e.g. [N, D, 1, 1]). features(x) ->
    every hidden activation as [N, H_i, 1, 1] and the head as [N, L, 1, 1], so the MFD treats
    each hidden unit as a channel. activation: 'silu' (smooth, default) or 'relu'.
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (256, 256, 256), num_outputs: int = 15,
                 activation: str = "silu"):
        super().__init__()
        acts: dict[str, Callable[[Tensor], Tensor]] = {"silu": F.silu, "relu": F.relu}
        if activation not in acts:
            raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
        if dim < 1 or not hidden:
            raise ValueError("MLPFeatures needs dim >= 1 and at least one hidden layer")
        self.dim = dim
        self.num_outputs = num_outputs
        self.activation = activation
        self._act = acts[activation]
        widths = [dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], num_outputs)

    def features(self, x: Tensor) -> list[Tensor]:
        """Hidden activations and the head, each [N, C, 1, 1]."""
        if x.ndim < 2 or x[0].numel() != self.dim:
            raise ValueError(f"expected [N, {self.dim}] (or [N, {self.dim}, 1, 1]) inputs, got {tuple(x.shape)}")
        h = x.flatten(1)
        feats = []
        for layer in self.hidden:
            h = self._act(layer(h))
            feats.append(h[:, :, None, None])
        feats.append(self.head(h)[:, :, None, None])
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """Regression head [N, L]."""
        return self.features(x)[-1].flatten(1)


# ----------------------------------------------------------------------------------------------
# Registry and helpers.

def _mlp(dim: Optional[int] = None, resolution: int = 1, in_channels: Optional[int] = None, **kw) -> MLPFeatures:
    """'mlp' from the image-style keywords of the training loop: dim = in_channels * resolution^2."""
    if in_channels is not None:
        flat = int(in_channels) * int(resolution) ** 2
        if dim is not None and dim != flat:
            raise ValueError(f"mlp: dim={dim} disagrees with in_channels * resolution^2 = {flat}")
        dim = flat
    if dim is None:
        raise ValueError("build_feature_net('mlp', ...) needs dim=D or in_channels=C (and resolution)")
    return MLPFeatures(dim=dim, **kw)


def _from_feature_nets(cls_name: str, **defaults) -> Callable[..., nn.Module]:
    """A registry entry for a class of ayt.feature_nets (DenseNet, ViT, autoencoder), with default keywords."""
    def make(**kw) -> nn.Module:
        from . import feature_nets
        return getattr(feature_nets, cls_name)(**{**defaults, **kw})
    return make


def _vggmod(depth: int, stride: bool, batchnorm: bool) -> Callable[..., nn.Module]:
    """The authors' VGGMod (use_maxpool = not stride, use_bn = batchnorm): the same layout as VGG."""
    return lambda **kw: VGG(depth=depth, downsample="stride" if stride else "maxpool", batchnorm=batchnorm, **kw)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "vgg11": lambda **kw: VGG(depth=11, **kw),
    "vgg13": lambda **kw: VGG(depth=13, **kw),
    "vgg16": lambda **kw: VGG(depth=16, **kw),
    "vgg19": lambda **kw: VGG(depth=19, **kw),
    "vgg16-stride": lambda **kw: VGG(depth=16, downsample="stride", **kw),
    "resnet18": lambda **kw: ResNet18(**kw),
    "mini-vgg": lambda **kw: VGG(cfg=MINI_VGG_CONFIG, **kw),
    "mlp": _mlp,
    # The authors' VGGMod{11,13,16,19} (vggmod16 = their configs/classifier/vggmod.yaml), strided and BN-free variants.
    **{f"vggmod{d}{'-stride' * s}{'-nobn' * (not bn)}": _vggmod(d, s, bn)
       for d in VGG_CONFIGS for s in (False, True) for bn in (True, False)},
    "resnet10": lambda **kw: ResNet18(num_blocks=(1, 1, 1, 1), **kw),   # the authors' current 'ResNet' ([1, 1, 1, 1])
    "densenet": _from_feature_nets("DenseNet"),                           # configs/classifier/densenet.yaml
    "vit": _from_feature_nets("SimpleViT"),                               # configs/classifier/vit.yaml
    "vit-mini": _from_feature_nets("SimpleViT", dim=64, depth=2, heads=4, dim_head=16, mlp_dim=128),
    "dae": _from_feature_nets("DenoisingAutoencoder"),                    # train with feature.objective=denoise
}
AUTOENCODERS: tuple[str, ...] = ("dae",)   # feature nets trained by denoising, not by augmentation regression
FEATURE_NETS: tuple[str, ...] = tuple(_REGISTRY)


def build_feature_net(name: str, **kw) -> nn.Module:
    """Build a feature network by registry name (FEATURE_NETS) with constructor keywords.

    e.g. build_feature_net('vgg16', resolution=32, num_outputs=15); 'mlp' needs dim=D, or in_channels=C
    and resolution=R (D = C R^2, the keywords the training loop passes).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature network {name!r}; expected one of {list(FEATURE_NETS)}")
    return _REGISTRY[name](**kw)


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses running statistics) and no parameter gradients; returns net.

    Gradients with respect to the inputs still flow (the AYT update differentiates the MFD
    with respect to the student output, docs/method.md section 4).
    """
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


def feature_net_from_file(path: Union[str, os.PathLike], name: str, map_location: Union[str, torch.device] = "cpu",
                     **kw) -> nn.Module:
    """Build `name` with keywords kw and load a plain state-dict file (e.g. the authors' clf_iter*.pt).

    The file is read with torch.load(weights_only=True); a 'module.' prefix on every key
    (DataParallel) is stripped. Raises ValueError naming missing, unexpected and mis-shaped keys.
    The network is returned in training mode with gradients on; see `freeze`.
    """
    return feature_net_from_state(torch.load(path, map_location=map_location, weights_only=True), name,
                                  os.fspath(path), **kw)


def feature_net_from_state(state, name: str, source: str = "state dict", **kw) -> nn.Module:
    """`feature_net_from_file` for an already loaded object (`source` names it in errors)."""
    net = build_feature_net(name, **kw)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source!r} is not a plain state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs net {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
        lines = [f"state dict {source!r} does not match feature net {name!r} {kw}:"]
        if missing:
            lines.append(f"  missing keys: {show(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys: {show(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches: {show(shapes)}")
        raise ValueError("\n".join(lines))
    net.load_state_dict(state, strict=True)
    return net


def num_params(net: nn.Module) -> int:
    """Number of parameters (BatchNorm buffers excluded)."""
    return sum(p.numel() for p in net.parameters())


__all__ = ["VGG", "VGGBlock", "ResNet18", "BasicBlock", "MLPFeatures", "VGG_CONFIGS", "MINI_VGG_CONFIG",
           "FEATURE_NETS", "AUTOENCODERS", "build_feature_net", "freeze", "feature_net_from_file",
           "feature_net_from_state", "num_params", "vgg_config"]
