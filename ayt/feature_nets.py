"""More manifold feature networks: DenseNet, ViT and a denoising autoencoder (registered in ayt.features;
docs/method.md section 3.5).

Each has the interface of ayt.features (`features(x) -> list[Tensor]`, every entry [N, C, H, W]) and the
parameter names of the authors' classes in 1202kbs/AYT (`src/ayt/classifiers.py`: `DenseNet`,
`SimpleViT`; `src/ayt/autoencoders.py`: `Autoencoder`, trained by `scripts/train_ae/train_dae.py`), so
their state dicts load with strict=True (`ayt.features.feature_net_from_file`).

  DenseNet      the authors' DenseNet (bottleneck blocks [3, 6, 12, 8], growth 16, reduction 0.5).
                features: the three transition outputs, the pooled ReLU(BN(dense4)) [N, C, 1, 1], the head.
  SimpleViT     the authors' ViT (patch R/8, sin-cos positions, pre-norm blocks, mean pooling).
                features: every block's tokens [N, T, D] as [N, T, D, 1] (tokens as channels: the MFD's
                per-channel pseudo-Huber is then the authors' per-token one over D), then the head.
  DenoisingAutoencoder  the authors' convolutional autoencoder (dropout 0.1); trained by the loop's
                feature stage with feature.objective=denoise (sigma ~ U(0, 1), pseudo-Huber reconstruction).
                features: the encoder's stage outputs (after each 2x max pooling).

Deviations, by design: the DenseNet's last pooling is a global average (the authors' fixed 4x4 pool; equal
at 32 px) and every network takes `in_channels` (theirs fix 3).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


def _check(x: Tensor, channels: int, resolution: int) -> None:
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2:] != (resolution, resolution):
        raise ValueError(f"expected [N, {channels}, {resolution}, {resolution}] inputs, got {tuple(x.shape)}")


# ----------------------------------------------------------------------------------------------
# DenseNet (Huang et al. 2017), CIFAR style

class DenseBottleneck(nn.Module):
    """BN-ReLU-1x1 conv (4 g) - BN-ReLU-3x3 conv (g), output concatenated before the input: [N, C + g, H, W]."""

    def __init__(self, in_planes: int, growth_rate: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv, then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """The authors' CIFAR DenseNet: 3x3 stem (2 g channels), four dense stages with transitions between.

    Parameter names: conv1, dense{1-4}.{i}.{bn1,conv1,bn2,conv2}, trans{1-3}.{bn,conv}, bn, linear.
    features(x) -> trans1..trans3 outputs (R/2, R/4, R/8), the pooled last stage [N, C, 1, 1], the head
    [N, L, 1, 1].
    """

    def __init__(self, resolution: int = 32, in_channels: int = 3, num_outputs: int = 15,
                 nblocks=(3, 6, 12, 8), growth_rate: int = 16, reduction: float = 0.5):
        super().__init__()
        if resolution % 8:
            raise ValueError(f"DenseNet halves the resolution 3 times; {resolution} is not a multiple of 8")
        self.resolution, self.in_channels, self.num_outputs = resolution, in_channels, num_outputs
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=3, padding=1, bias=False)
        for k, n in enumerate(nblocks, start=1):
            blocks = []
            for _ in range(n):
                blocks.append(DenseBottleneck(planes, growth_rate))
                planes += growth_rate
            setattr(self, f"dense{k}", nn.Sequential(*blocks))
            if k < len(nblocks):
                out = int(math.floor(planes * reduction))
                setattr(self, f"trans{k}", Transition(planes, out))
                planes = out
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_outputs)

    def features(self, x: Tensor) -> list[Tensor]:
        _check(x, self.in_channels, self.resolution)
        feats = []
        out = self.conv1(x)
        for k in (1, 2, 3):
            out = getattr(self, f"trans{k}")(getattr(self, f"dense{k}")(out))
            feats.append(out)
        out = F.relu(self.bn(self.dense4(out))).mean(dim=(2, 3), keepdim=True)   # [N, C, 1, 1]
        feats.append(out)
        feats.append(self.linear(out.flatten(1))[:, :, None, None])
        return feats

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[-1].flatten(1)


# ----------------------------------------------------------------------------------------------
# Simple ViT (Beyer et al. 2022), as the authors configure it

def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sin-cos position embedding [h*w, dim] (x sin, x cos, y sin, y cos blocks); dim % 4 == 0."""
    if dim % 4:
        raise ValueError(f"the sin-cos embedding needs dim divisible by 4, got {dim}")
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4) / (dim // 4 - 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).float()


class Patchify(nn.Module):
    """[N, C, p h, p w] -> [N, h w, p p C] (patches in raster order, each flattened row-major, channels last)."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch

    def forward(self, x: Tensor) -> Tensor:
        n, c, H, W = x.shape
        p = self.patch
        x = x.reshape(n, c, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)      # [N, h, w, p1, p2, C]
        return x.reshape(n, (H // p) * (W // p), p * p * c)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention without biases. [N, T, D] -> [N, T, D]."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        q, k, v = (z.reshape(n, t, self.heads, -1).transpose(1, 2) for z in self.to_qkv(self.norm(x)).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)                 # [N, heads, T, T]
        return self.to_out((attn @ v).transpose(1, 2).reshape(n, t, -1))


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(nn.ModuleList([Attention(dim, heads, dim_head), FeedForward(dim, mlp_dim)])
                                    for _ in range(depth))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        feats = []
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
            feats.append(x)
        return self.norm(x), feats


class SimpleViT(nn.Module):
    """The authors' ViT: patch size R/8 (64 tokens), dim 1024, depth 6, 16 heads of 64, MLP 2048 by default.

    Parameter names: to_patch_embedding.{1,2,3}, transformer.layers.{i}.0.{norm,to_qkv,to_out},
    transformer.layers.{i}.1.net.{0,1,3}, transformer.norm, linear_head. features(x) -> each block's
    tokens as [N, T, D, 1], then the head [N, L, 1, 1].
    """

    def __init__(self, resolution: int = 32, in_channels: int = 3, num_outputs: int = 15, dim: int = 1024,
                 depth: int = 6, heads: int = 16, mlp_dim: int = 2048, dim_head: int = 64, patch: int = 0):
        super().__init__()
        patch = patch or resolution // 8
        if patch < 1 or resolution % patch:
            raise ValueError(f"ViT: resolution {resolution} is not divisible by the patch size {patch}")
        self.resolution, self.in_channels, self.num_outputs = resolution, in_channels, num_outputs
        patch_dim = in_channels * patch * patch
        self.to_patch_embedding = nn.Sequential(Patchify(patch), nn.LayerNorm(patch_dim), nn.Linear(patch_dim, dim),
                                                nn.LayerNorm(dim))
        side = resolution // patch
        self.register_buffer("pos_embedding", posemb_sincos_2d(side, side, dim), persistent=False)
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim)
        self.linear_head = nn.Linear(dim, num_outputs)

    def features(self, x: Tensor) -> list[Tensor]:
        _check(x, self.in_channels, self.resolution)
        tokens = self.to_patch_embedding(x) + self.pos_embedding.to(x.dtype)      # [N, T, D]
        out, feats = self.transformer(tokens)
        head = self.linear_head(out.mean(dim=1))
        return [f[..., None] for f in feats] + [head[:, :, None, None]]

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[-1].flatten(1)


# ----------------------------------------------------------------------------------------------
# Denoising autoencoder

class DenoisingAutoencoder(nn.Module):
    """The authors' convolutional autoencoder: two conv-ReLU pairs per stage, each stage ending in
    dropout and 2x max pooling (R -> R/4), then a transposed-convolution decoder with a tanh output.

    Parameter names: encoder.{0,2,6,8}, decoder.{0,2,5,7} (nn.Sequential indices). forward(x) -> the
    reconstruction [N, C, R, R]; features(x) -> the encoder's stage outputs [N, 16, R/2, R/2],
    [N, 64, R/4, R/4]. num_outputs is accepted for the registry's interface and unused.
    """

    def __init__(self, resolution: int = 32, in_channels: int = 3, num_outputs: int = 0, dropout: float = 0.1):
        super().__init__()
        if resolution % 4:
            raise ValueError(f"the autoencoder halves the resolution twice; {resolution} is not a multiple of 4")
        self.resolution, self.in_channels, self.num_outputs = resolution, in_channels, num_outputs
        c = in_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Dropout2d(dropout), nn.MaxPool2d(2, 2),
            nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.Dropout2d(dropout), nn.MaxPool2d(2, 2))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(64, 16, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(16, 16, 3, stride=1, padding=1), nn.ReLU(), nn.Dropout2d(dropout),
            nn.ConvTranspose2d(16, c, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c, c, 3, stride=1, padding=1), nn.Tanh())

    def features(self, x: Tensor) -> list[Tensor]:
        _check(x, self.in_channels, self.resolution)
        feats = []
        for layer in self.encoder:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                feats.append(x)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        _check(x, self.in_channels, self.resolution)
        return self.decoder(self.encoder(x))


@torch.no_grad()
def denoising_quality(model: nn.Module, ds, device, n: int = 2048, seed: int = 0, batch: int = 256,
                      sigmas=(0.0, 0.25, 0.5, 1.0)) -> dict:
    """Reconstruction RMSE of an autoencoder in eval mode on n seeded images, for each noise level sigma,
    beside the RMSE of the noisy input itself (= sigma): {"rmse": {sigma: value}, "input_rmse": {...}}."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:min(n, len(ds))]
    was_training = model.training
    model.eval()
    out = {"rmse": {}, "input_rmse": {}, "eval_images": len(idx)}
    for s in sigmas:
        se = se_in = count = 0.0
        for i in range(0, len(idx), batch):
            x = torch.stack([ds[int(j)][0] for j in idx[i:i + batch]]).to(device)
            noisy = x + s * torch.randn(x.shape, generator=g).to(device)
            se += float((model(noisy) - x).square().sum())
            se_in += float((noisy - x).square().sum())
            count += x.numel()
        out["rmse"][f"{s:g}"] = math.sqrt(se / count)
        out["input_rmse"][f"{s:g}"] = math.sqrt(se_in / count)
    model.train(was_training)
    return out


__all__ = ["denoising_quality", "DenseNet", "DenseBottleneck", "Transition", "SimpleViT", "Patchify", "posemb_sincos_2d",
           "DenoisingAutoencoder"]
