"""EDM's denoiser networks and preconditioning, plus a safe importer for EDM's released checkpoints.

The consistency model of docs/method.md section 1 is EDM's preconditioned denoiser

    f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t)),
    c_skip = sd^2 / (t^2 + sd^2),  c_out = t sd / sqrt(t^2 + sd^2),
    c_in = 1 / sqrt(t^2 + sd^2),   c_noise = ln(t) / 4,        sd = sigma_data = 0.5,

with F either EDM's `SongUNet` (DDPM++ / NCSN++, Song et al. 2021) or `DhariwalUNet` (ADM, Dhariwal &
Nichol 2021). This module re-implements the layers of EDM (Karras et al. 2022, `training/networks.py`
of NVlabs/edm) with the same parameter names, shapes, initialisation (same random draws in the same
order), and forward arithmetic, so that EDM's released checkpoints (`edm-cifar10-32x32-uncond-vp.pkl`,
...) load strictly (`load_edm_checkpoint` + `load_into`). Differences from EDM, all deliberate:

  * no fp16 path and no `use_fp16` argument: parameters stay float32; the code also runs under
    `torch.autocast(..., dtype=torch.bfloat16)` (group norm and the attention softmax are computed in
    float32, the preconditioning in float32);
  * `EDMPrecond(model_type=...)` defaults to 'SongUNet' (EDM: 'DhariwalUNet');
  * class labels may also be given as integer class indices [N] (one-hot encoded here).

Dropout is `torch.nn.functional.dropout` (global RNG), so two forwards under the same forked RNG state
(`torch.random.fork_rng`) draw the same mask (the shared teacher/student mask of docs/method.md section 2, step 4).

Legend of tensor shapes: N batch, C channels, H = W = img_resolution, L label_dim, E embedding width.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import io
import math
import os
import pickle
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "weight_init", "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
    "SongUNet", "DhariwalUNet", "MLP", "EDMPrecond", "edm_precond_coefficients", "MODEL_TYPES", "NETWORK_CONFIGS",
    "build_network", "count_parameters", "EDMCheckpoint", "LoadReport", "CheckpointError",
    "UnsafeCheckpointError", "load_edm_checkpoint", "load_into",
]


# ----------------------------------------------------------------------------------------------
# Layers (EDM training/networks.py)

def weight_init(shape: list[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """EDM's weight initialisation: a fresh tensor of `shape` drawn from the global torch RNG.

    xavier_uniform U(-a, a), a = sqrt(6/(fan_in+fan_out)); xavier_normal N(0, 2/(fan_in+fan_out));
    kaiming_uniform U(-a, a), a = sqrt(3/fan_in); kaiming_normal N(0, 1/fan_in).
    """
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f"invalid init mode {mode!r}; expected xavier_uniform, xavier_normal, kaiming_uniform "
                     "or kaiming_normal")


class Linear(nn.Module):
    """Fully connected layer [N, in_features] -> [N, out_features] with EDM's initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        init_kwargs = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **init_kwargs) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **init_kwargs) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)
        return x


class Conv2d(nn.Module):
    """2-D convolution (kernel k, 'same' padding) with optional 2x up/downsampling by a separable FIR filter.

    kernel=0 gives a parameter-free resampling layer. The filter `resample_filter` (e.g. [1,1] box for DDPM++,
    [1,3,3,1] for NCSN++) is stored as a buffer [1, 1, f, f] (normalised to unit sum) only when up or down,
    as in EDM. fused_resample merges the resampling with the convolution (NCSN++'s residual encoder).
    [N, in_channels, H, W] -> [N, out_channels, H', W'] with H' = 2H (up), H/2 (down) or H.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: list[int] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d: up and down are mutually exclusive")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        init_kwargs = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **init_kwargs) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **init_kwargs) * init_bias) if kernel and bias else None
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()  # [1, 1, f, f]
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                   stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1).to(x.dtype)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with EDM's group count min(num_groups, C // min_channels_per_group).

    Computed in float32 (also under autocast) and returned in the input's dtype. [N, C, H, W] -> same.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.group_norm(x.float(), num_groups=self.num_groups, weight=self.weight.float(),
                             bias=self.bias.float(), eps=self.eps)
        return y.to(x.dtype)


def attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """softmax_k(q^T k / sqrt(c)) computed in float32, returned in q's dtype (EDM's AttentionOp).

    q, k: [N*heads, c, HW] -> weights [N*heads, HW_q, HW_k].
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        w = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(k.shape[1])).softmax(dim=2)
    return w.to(q.dtype)


def _add_(x: Tensor, y: Tensor) -> Tensor:
    """x + y, written into x when that is the same arithmetic: x must be a fresh intermediate that
    autograd did not save (a convolution's output), with y of the same dtype and broadcastable to x's
    shape. Under autocast a bf16 x plus a float32 y promotes to float32: the out-of-place sum then."""
    if x.dtype == y.dtype and torch.broadcast_shapes(x.shape, y.shape) == x.shape:
        return x.add_(y)
    return x + y


def _silu(x: Tensor) -> Tensor:
    """SiLU of a fresh intermediate (a norm's or a linear layer's output), in place when no gradient
    will flow through it (teacher forwards, sampling): the same kernel, one buffer less."""
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


class UNetBlock(nn.Module):
    """EDM's unified U-Net residual block (DDPM++, NCSN++ and ADM) with optional up/down and self-attention.

    x [N, in_channels, H, W], emb [N, emb_channels] -> [N, out_channels, H', W'].
    The embedding enters as a bias (adaptive_scale=False, DDPM++/NCSN++) or as scale and shift of the
    second group norm (adaptive_scale=True, ADM). The residual sum (and the attention sum) is multiplied
    by skip_scale (sqrt(1/2) in DDPM++/NCSN++).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: Optional[int] = None, channels_per_head: int = 64,
                 dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5, resample_filter: list[int] = (1, 1),
                 resample_proj: bool = False, adaptive_scale: bool = True, init: Optional[dict] = None,
                 init_zero: Optional[dict] = None, init_attn: Optional[dict] = None):
        super().__init__()
        init = {} if init is None else init
        init_zero = dict(init_weight=0) if init_zero is None else init_zero
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(_silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)  # [N, C or 2C, 1, 1]
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = _silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = _silu(self.norm1(_add_(x, params)))

        # residual sums in place into the convolution outputs (same arithmetic, no extra buffers)
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = _add_(x, self.skip(orig) if self.skip is not None else orig).mul_(self.skip_scale)

        if self.num_heads:
            n, c = x.shape[0], x.shape[1]
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            w = attention_weights(q, k)                  # [N*heads, HW, HW]
            a = torch.einsum("nqk,nck->ncq", w, v)      # [N*heads, c/heads, HW]
            x = _add_(self.proj(a.reshape(*x.shape)), x).mul_(self.skip_scale)
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (DDPM++, ADM): [N] -> [N, num_channels] = [cos | sin].

    Frequencies (1/max_positions)^(i / (num_channels/2 - endpoint)), i = 0 .. num_channels/2 - 1. No parameters.
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        freqs = torch.arange(start=0, end=self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = freqs / (self.num_channels // 2 - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.unsqueeze(1) * freqs.to(x.dtype).unsqueeze(0)   # outer product [N, num_channels/2]
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++): [N] -> [N, num_channels] = [cos(2 pi f x) | sin(2 pi f x)].

    The frequencies f ~ N(0, scale^2) are the buffer `freqs` [num_channels/2] (part of the state dict).
    """

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = x.unsqueeze(1) * (2 * np.pi * self.freqs).to(x.dtype).unsqueeze(0)   # [N, num_channels/2]
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------------------------
# U-Nets

class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. (2021) as re-implemented by EDM.

    forward(x [N, in_channels, H, W], noise_labels [N], class_labels [N or 1, L] or None,
    augment_labels [N, augment_dim] or None) -> [N, out_channels, H, W].
    DDPM++: embedding_type='positional', channel_mult_noise=1, encoder_type='standard', resample_filter=[1,1].
    NCSN++: embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1,3,3,1].
    `map_label` exists only when label_dim > 0 and `map_augment` only when augment_dim > 0 (as in EDM).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: list[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: list[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: list[int] = (1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise label -> embedding [N, emb_channels].
        self.map_noise = (PositionalEmbedding(num_channels=noise_channels, endpoint=True)
                          if embedding_type == "positional" else FourierEmbedding(num_channels=noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True, resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor],
                augment_labels: Optional[Tensor] = None) -> Tensor:
        # Mapping.
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # swap to [sin | cos]
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(tmp.dtype)
            emb = emb + self.map_label(tmp * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = _silu(self.map_layer0(emb))
        emb = _silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(_silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(nn.Module):
    """ADM U-Net of Dhariwal & Nichol (2021) as re-implemented by EDM (same forward signature as SongUNet)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: list[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: list[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor],
                augment_labels: Optional[Tensor] = None) -> Tensor:
        # Mapping.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = _silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(tmp.dtype)
            emb = emb + self.map_label(tmp)
        emb = _silu(emb)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(_silu(self.out_norm(x)))


# ----------------------------------------------------------------------------------------------
# MLP denoiser for vector data (the 2-D disk in R^D of the tangent study; ayt.analysis)

class MLP(nn.Module):
    """Fully connected denoiser F for vector data viewed as images [N, D, 1, 1] (img_resolution=1,
    img_channels=D), with the same forward signature as SongUNet, for use inside EDMPrecond.

    forward(x [N, in_channels, R, R], noise_labels [N], class_labels [N or 1, L] or None,
    augment_labels [N, augment_dim] or None) -> [N, out_channels, R, R] (R = img_resolution, any size:
    the input is flattened). The noise label c_noise enters as in DDPM++: a positional embedding
    (endpoint=True) through map_layer0/map_layer1 (SiLU) to emb [N, E]; every hidden layer is
    h <- SiLU(layer_i(h) + affine_i(emb)), followed by dropout; the output layer starts near zero
    (init_weight 1e-5, as SongUNet's last conv), so EDMPrecond starts at D(x) ~ c_skip x.
    E = model_channels * channel_mult_emb; hidden width = model_channels.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 256, num_layers: int = 4, channel_mult_emb: int = 1,
                 channel_mult_noise: int = 1, dropout: float = 0.0, label_dropout: float = 0):
        super().__init__()
        if num_layers < 1 or model_channels < 2:
            raise ValueError(f"MLP needs num_layers >= 1 and model_channels >= 2, got {num_layers}, {model_channels}")
        self.label_dropout = label_dropout
        self.dropout = dropout
        in_features = in_channels * img_resolution * img_resolution
        out_features = out_channels * img_resolution * img_resolution
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        self.out_shape = (out_channels, img_resolution, img_resolution)
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.input = Linear(in_features, model_channels, **init)
        self.layers = nn.ModuleList(Linear(model_channels, model_channels, **init) for _ in range(num_layers))
        self.affine = nn.ModuleList(Linear(emb_channels, model_channels, **init) for _ in range(num_layers))
        self.output = Linear(model_channels, out_features, init_mode="xavier_uniform", init_weight=1e-5)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Optional[Tensor],
                augment_labels: Optional[Tensor] = None) -> Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                tmp = tmp * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(tmp.dtype)
            emb = emb + self.map_label(tmp * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))    # [N, E]
        h = self.input(x.flatten(1))                                   # [N, model_channels]
        for layer, affine in zip(self.layers, self.affine):
            h = F.silu(layer(F.silu(h)) + affine(emb))
            h = F.dropout(h, p=self.dropout, training=self.training)
        return self.output(h).reshape(x.shape[0], *self.out_shape)


MODEL_TYPES: dict[str, type] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet, "MLP": MLP}


# ----------------------------------------------------------------------------------------------
# EDM preconditioning (docs/method.md section 1)

def edm_precond_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's (c_skip, c_out, c_in, c_noise) for noise levels sigma (any shape; results have sigma's shape).

    c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), c_noise = ln(s)/4.
    """
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """The preconditioned denoiser D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) of EDM (docs/method.md section 1).

    The raw network F is `self.model` (a `SongUNet` or `DhariwalUNet` built from model_type and
    model_kwargs), so state-dict keys are EDM's: 'model.map_layer0.weight', 'model.enc.32x32_conv.weight', ...
    `init_kwargs` records the constructor arguments (for checkpoints).
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, sigma_min: float = 0,
                 sigma_max: float = float("inf"), sigma_data: float = 0.5, model_type: str = "SongUNet",
                 **model_kwargs: Any):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        model_cls = MODEL_TYPES[model_type]
        allowed = set(inspect.signature(model_cls.__init__).parameters) - {"self", "img_resolution", "in_channels",
                                                                             "out_channels", "label_dim"}
        unknown = sorted(set(model_kwargs) - allowed)
        if unknown:
            raise ValueError(f"unknown {model_type} argument(s) {unknown}; allowed: {sorted(allowed)}")
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.init_kwargs = copy.deepcopy(dict(img_resolution=img_resolution, img_channels=img_channels,
                                              label_dim=label_dim, sigma_min=sigma_min, sigma_max=sigma_max,
                                              sigma_data=sigma_data, model_type=model_type, **model_kwargs))
        self.model = model_cls(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                               label_dim=label_dim, **copy.deepcopy(model_kwargs))

    def _sigma_vector(self, sigma: Union[float, Tensor], x: Tensor) -> Tensor:
        """sigma as a float32 vector [N] on x's device (a scalar is broadcast to the batch)."""
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1)
        if sigma.numel() == 1:
            return sigma.expand(n)
        if sigma.numel() != n:
            raise ValueError(f"sigma must be a scalar or hold one value per sample ({n}), got {sigma.numel()} values")
        return sigma

    def _class_labels(self, class_labels: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
        """Class labels as float32 one-hot rows [N or 1, L], None for an unconditional network."""
        if self.label_dim == 0:
            if class_labels is not None and class_labels.numel() != 0:
                raise ValueError("class_labels given to an unconditional network (label_dim=0)")
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=x.device)
        if not class_labels.is_floating_point():
            if class_labels.ndim != 1:
                raise ValueError(f"integer class_labels must be class indices [N], got shape {tuple(class_labels.shape)}")
            class_labels = F.one_hot(class_labels.long(), self.label_dim)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def forward(self, x: Tensor, sigma: Union[float, Tensor], class_labels: Optional[Tensor] = None,
                augment_labels: Optional[Tensor] = None) -> Tensor:
        """D(x, sigma) [N, C, H, W] float32 for x [N, C, H, W] and sigma (float, 0-d tensor or [N]; sigma > 0).

        class_labels: one-hot [N, L] (or [1, L], or integer indices [N]); None = all-zero labels (EDM).
        augment_labels: [N, augment_dim], only for networks built with augment_dim > 0.
        """
        if augment_labels is not None and getattr(self.model, "map_augment", None) is None:
            raise ValueError("augment_labels given to a network without map_augment (augment_dim=0)")
        x = x.to(torch.float32)
        sigma = self._sigma_vector(sigma, x)                                          # [N]
        c_skip, c_out, c_in, c_noise = edm_precond_coefficients(sigma.reshape(-1, 1, 1, 1), self.sigma_data)
        F_x = self.model(c_in * x, c_noise.flatten(), class_labels=self._class_labels(class_labels, x),
                         augment_labels=augment_labels)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma: Union[float, Tensor]) -> Tensor:
        """EDM's sampler interface: continuous sigma, so the identity."""
        return torch.as_tensor(sigma)


# ----------------------------------------------------------------------------------------------
# Named configurations

NETWORK_CONFIGS: dict[str, dict[str, Any]] = {
    # EDM/ECT CIFAR-10 DDPM++ (EDM train.py --arch=ddpmpp; ECT run_ecm.sh --dropout=0.2 --augment=0.0).
    # 55.7M parameters (55,732,739 without map_augment; EDM's CIFAR-10 training adds a 1,152-parameter
    # map_augment, augment_dim=9, which we drop: docs/method.md section 8.1).
    "ddpmpp-cifar10": dict(model_type="SongUNet", model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4,
                           num_blocks=4, attn_resolutions=[16], dropout=0.2, embedding_type="positional",
                           channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                           resample_filter=[1, 1]),
    # EDM CIFAR-10 NCSN++ (EDM train.py --arch=ncsnpp), dropout as the ECT CIFAR-10 setting.
    "ncsnpp-cifar10": dict(model_type="SongUNet", model_channels=128, channel_mult=[2, 2, 2], channel_mult_emb=4,
                           num_blocks=4, attn_resolutions=[16], dropout=0.2, embedding_type="fourier",
                           channel_mult_noise=2, encoder_type="residual", decoder_type="standard",
                           resample_filter=[1, 3, 3, 1]),
    # EDM ImageNet-64 ADM (EDM train.py --arch=adm; README: --dropout=0.10 --augment=0).
    "adm-imagenet64": dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4],
                           channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.1),
    # A small DDPM++ for the 16x16 synthetic shapes data set (CPU demos and tests).
    "mini-shapes16": dict(model_type="SongUNet", model_channels=32, channel_mult=[1, 2, 2], channel_mult_emb=4,
                          num_blocks=2, attn_resolutions=[], dropout=0.1, embedding_type="positional",
                          channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                          resample_filter=[1, 1]),
    # A very small DDPM++ for smoke tests and quick experiments (~0.2M parameters at 16 px).
    "tiny": dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], channel_mult_emb=2,
                 num_blocks=1, attn_resolutions=[], dropout=0.1, embedding_type="positional",
                 channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=[1, 1]),
    # MLP denoiser for the 2-D disk in R^D (vector data as [N, D, 1, 1]; img_resolution=1, img_channels=D).
    "mlp-disk": dict(model_type="MLP", model_channels=256, num_layers=4, channel_mult_emb=1, dropout=0.0),
}


def build_network(name_or_kwargs: Union[str, dict[str, Any]], img_resolution: int, img_channels: int,
                  label_dim: int = 0, **overrides: Any) -> EDMPrecond:
    """An `EDMPrecond` from a name in NETWORK_CONFIGS or from a dict of EDMPrecond/model keyword arguments.

    overrides (e.g. dropout=0.13) replace entries of the configuration.
    """
    if isinstance(name_or_kwargs, str):
        if name_or_kwargs not in NETWORK_CONFIGS:
            raise ValueError(f"unknown network {name_or_kwargs!r}; known: {', '.join(NETWORK_CONFIGS)}")
        kwargs = copy.deepcopy(NETWORK_CONFIGS[name_or_kwargs])
    elif isinstance(name_or_kwargs, dict):
        kwargs = copy.deepcopy(name_or_kwargs)
    else:
        raise ValueError(f"build_network expects a name or a dict, got {type(name_or_kwargs).__name__}")
    kwargs.update(copy.deepcopy(overrides))
    return EDMPrecond(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **kwargs)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter entries (buffers excluded), as EDM's module summary counts them."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# EDM checkpoint import

class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (corrupt, truncated, or of an unexpected layout)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that references a global outside the allow-list (it could execute code); nothing was run."""


@dataclasses.dataclass
class EDMCheckpoint:
    """Weights of a denoiser read from an EDM snapshot (.pkl) or a torch state-dict file (.pt/.pth).

    state_dict: flat {EDM dotted name: tensor} (parameters and persistent buffers, CPU).
    init_kwargs: the constructor kwargs recorded in the pickle (EDM's `init_kwargs`), or those stored
        next to the state dict in a .pt file; {} when absent.
    source: a description of where the weights came from (path, format, key).
    class_name: class of the pickled network (e.g. 'EDMPrecond', 'VPPrecond'), None when unknown.
    """
    state_dict: dict[str, Tensor]
    init_kwargs: dict
    source: str
    class_name: Optional[str] = None

    def precond_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for our `EDMPrecond` from init_kwargs (EDM's `use_fp16` removed), plus overrides.

        Example (ECT's transfer from EDM): `EDMPrecond(**ckpt.precond_kwargs(augment_dim=0, dropout=0.2))`.
        """
        if not self.init_kwargs:
            raise ValueError(f"{self.source}: the checkpoint records no constructor arguments")
        kwargs = copy.deepcopy(self.init_kwargs)
        kwargs.pop("use_fp16", None)
        if self.class_name == "EDMPrecond":
            kwargs.setdefault("model_type", "DhariwalUNet")  # EDM's EDMPrecond default
        kwargs.update(copy.deepcopy(overrides))
        return kwargs


@dataclasses.dataclass
class LoadReport:
    """What `load_into` did: keys dropped on purpose, and keys missing/unexpected (only when strict=False)."""
    dropped: list[str]
    missing: list[str]
    unexpected: list[str]


class _PersistentObject:
    """Stand-in for an object pickled by EDM's `torch_utils.persistence` (its source code is never run)."""

    def __init__(self, class_name: str, state: dict, meta_version: Any):
        self.class_name = class_name
        self.state = state
        self.meta_version = meta_version

    def __repr__(self) -> str:
        return f"<persistent {self.class_name}>"


def _reconstruct_persistent_obj(meta: Any) -> _PersistentObject:
    """Safe replacement of `torch_utils.persistence._reconstruct_persistent_obj`: records, never execs."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("class_name"), str):
        raise CheckpointError("malformed persistent-object record (expected a dict with type='class' and class_name)")
    state = meta.get("state")
    state = {} if state is None else state
    if not isinstance(state, dict):
        raise CheckpointError(f"persistent {meta['class_name']}: state is a {type(state).__name__}, not a dict")
    return _PersistentObject(meta["class_name"], dict(state), meta.get("version"))


class _PickledTorchModule:
    """Stand-in for a torch.nn container (ModuleDict, ...) inside a pickle; keeps its __dict__ state only."""
    torch_class = "torch.nn.Module"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.torch_class}: state is a {type(state).__name__}, not a dict")
        self.state = state


def _torch_module_stub(name: str) -> type:
    return type(f"_Pickled{name}", (_PickledTorchModule,), {"torch_class": f"torch.nn.modules.container.{name}"})


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access); converted to a plain dict."""


def _load_storage_from_bytes(b: bytes) -> Any:
    """Safe replacement of torch.storage._load_from_bytes: the nested legacy torch.save blob of one tensor
    storage, read with torch's weights-only unpickler onto the CPU."""
    if not isinstance(b, (bytes, bytearray)):
        raise CheckpointError("malformed tensor storage record")
    return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _numpy_dtype(spec: Any, align: bool = False, copy_: bool = False) -> np.dtype:
    """np.dtype restricted to plain numeric/bool dtypes (numpy pickles scalars as (dtype, bytes))."""
    if not isinstance(spec, str):
        raise UnsafeCheckpointError(f"refusing numpy.dtype({spec!r})")
    dt = np.dtype(spec, bool(align), True)
    if dt.kind not in "biuf":
        raise UnsafeCheckpointError(f"refusing numpy dtype {spec!r} (only bool/int/float scalars are allowed)")
    return dt


def _numpy_scalar(dtype: Any, data: Any = None) -> Union[bool, int, float]:
    """A numpy scalar (e.g. EDM's skip_scale = np.sqrt(0.5)) as a Python number."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, (bytes, bytearray)):
        raise UnsafeCheckpointError("refusing a non-numeric numpy scalar")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].item()


def _latin1_encode(text: Any, encoding: str = "utf-8") -> bytes:
    """_codecs.encode as pickle protocol 2 uses it for bytes objects: encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("refusing _codecs.encode with unexpected arguments")
    return text.encode("latin1")


def _safe_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor (pickle protocols 0/1) restricted to the stand-in classes above."""
    if not (isinstance(cls, type) and issubclass(cls, (_PickledTorchModule, _EasyDict)) and base in (object, dict)
            and state is None):
        raise UnsafeCheckpointError(f"refusing copyreg._reconstructor({cls!r}, {base!r}, ...)")
    return cls.__new__(cls) if base is object else cls()


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,
    ("builtins", "dict"): dict,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("_codecs", "encode"): _latin1_encode,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("dnnlib", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch.nn.modules.container", n): _torch_module_stub(n) for n in ("ModuleDict", "ModuleList", "Sequential")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the allow-listed globals of EDM snapshots (tensors, OrderedDict,
    persistent-object records, EasyDict, numpy scalars, torch.nn containers as inert stand-ins)."""

    def __init__(self, file: Any, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # Python 2 names (protocol < 3)
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(f"{self._path}: refusing to load the global {module}.{name} (not on the "
                                        "allow-list of EDM checkpoints; it could execute code). Nothing was run.") from None


def _plain(obj: Any) -> Any:
    """EasyDict / OrderedDict / tuple containers -> plain dicts and lists (for init_kwargs)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _flatten_module(obj: Any, prefix: str, out: dict[str, Tensor], where: str) -> None:
    """Collect parameters and persistent buffers of a pickled module tree into out (EDM's dotted names)."""
    if isinstance(obj, _PersistentObject):
        state = obj.state
    elif isinstance(obj, _PickledTorchModule):
        state = getattr(obj, "state", {})
    else:
        raise CheckpointError(f"{where}: expected a module at {prefix.rstrip('.') or '<root>'}, "
                              f"found {type(obj).__name__}")
    non_persistent = set(state.get("_non_persistent_buffers_set", ()) or ())
    for group in ("_parameters", "_buffers"):
        for name, t in (state.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(t, Tensor):
                raise CheckpointError(f"{where}: {prefix}{name} is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t.detach().requires_grad_(False)
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _flatten_module(child, f"{prefix}{name}.", out, where)


def _init_kwargs_of(obj: _PersistentObject) -> dict:
    """EDM's recorded constructor arguments (_init_args mapped to EDMPrecond's names, _init_kwargs)."""
    kwargs = _plain(obj.state.get("_init_kwargs") or {})
    args = list(obj.state.get("_init_args") or ())
    if args:
        names = ["img_resolution", "img_channels", "label_dim", "use_fp16", "sigma_min", "sigma_max",
                 "sigma_data", "model_type"]
        if obj.class_name != "EDMPrecond" or len(args) > len(names):
            raise CheckpointError(f"cannot name the {len(args)} positional constructor arguments of {obj.class_name}")
        kwargs = {**dict(zip(names, _plain(args))), **kwargs}
    return kwargs


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(k, str) and isinstance(v, Tensor)
                                                          for k, v in obj.items())


def _from_torch_file(path: str, key: str) -> EDMCheckpoint:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a loadable weights-only torch file ({type(e).__name__}: {e})") from e
    if _is_state_dict(obj):
        return EDMCheckpoint(dict(obj), {}, f"{path} (state dict)")
    if isinstance(obj, dict):
        for k in dict.fromkeys([key, "ema", "model"]):
            if _is_state_dict(obj.get(k)):
                init_kwargs = obj.get("init_kwargs")
                return EDMCheckpoint(dict(obj[k]), dict(init_kwargs) if isinstance(init_kwargs, dict) else {},
                                     f"{path} (state dict under {k!r})")
        raise CheckpointError(f"{path}: no state dict found; top-level keys {sorted(map(str, obj))} "
                              f"(expected a state dict, or one under {key!r}, 'ema' or 'model')")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def load_edm_checkpoint(path: Union[str, os.PathLike], key: str = "ema") -> EDMCheckpoint:
    """Read denoiser weights from an EDM snapshot pickle or a torch state-dict file, without running its code.

    EDM snapshots (`network-snapshot-*.pkl`, `edm-cifar10-32x32-uncond-vp.pkl`, ...) are plain pickles of
    dict(ema=<EDMPrecond>, loss_fn=..., augment_pipe=..., dataset_kwargs=...) whose networks are
    `torch_utils.persistence` objects: each pickles as _reconstruct_persistent_obj(meta) with
    meta = dict(type='class', version, module_src, class_name, state=<the module's __dict__>). EDM would
    exec module_src; here a restricted unpickler maps that hook to a recorder, allows only the globals
    needed for tensors (storages arrive as nested legacy torch.save blobs, read with weights_only=True,
    map_location='cpu'), and raises UnsafeCheckpointError for anything else. The module tree
    (`_modules`, `_parameters`, `_buffers` of each recorded state) is flattened into EDM's dotted names.
    Zip or legacy torch files (.pt/.pth) are read with torch.load(weights_only=True): a state dict, or a
    dict holding one under `key`, 'ema' or 'model' (plus optional 'init_kwargs').
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":           # torch.save zip format
        return _from_torch_file(path, key)
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except CheckpointError as e:
        if path in str(e):
            raise
        raise type(e)(f"{path}: {e}") from e
    except Exception as e:  # truncated / corrupt / not a pickle: report the file, keep the cause
        raise CheckpointError(f"{path}: not a readable pickle checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, int) and obj == torch.serialization.MAGIC_NUMBER:
        return _from_torch_file(path, key)   # legacy (non-zip) torch.save file
    if isinstance(obj, dict) and not isinstance(obj.get(key), _PersistentObject) and _is_state_dict(obj.get(key)):
        return EDMCheckpoint(dict(obj[key]), {}, f"{path} (pickled state dict under {key!r})")
    if _is_state_dict(obj):
        return EDMCheckpoint(dict(obj), {}, f"{path} (pickled state dict)")
    net, where = obj, f"{path}"
    if isinstance(obj, dict):
        if key not in obj:
            raise CheckpointError(f"{path}: no {key!r} entry; top-level keys {sorted(map(str, obj))}")
        net, where = obj[key], f"{path}[{key!r}]"
    if not isinstance(net, _PersistentObject):
        raise CheckpointError(f"{where}: expected an EDM network (torch_utils.persistence object), "
                              f"found {type(net).__name__}")
    state_dict: dict[str, Tensor] = {}
    _flatten_module(net, "", state_dict, where)
    if not state_dict:
        raise CheckpointError(f"{where}: the network holds no parameters")
    return EDMCheckpoint(state_dict, _init_kwargs_of(net), f"{where} (EDM pickle, {net.class_name})", net.class_name)


def load_into(net: nn.Module, ckpt: EDMCheckpoint, strict: bool = True,
              require_class: Optional[str] = "EDMPrecond") -> LoadReport:
    """Copy ckpt's weights into `net` (our EDMPrecond); returns what was dropped/missing/unexpected.

    `model.map_augment.*` entries are dropped (and listed in the report) when `net` has no map_augment
    (augment_dim=0; docs/method.md section 8.1). Shape mismatches always raise; with strict=True missing or
    unexpected keys raise too, listing them. require_class: refuse checkpoints whose recorded class differs
    (e.g. EDM's VPPrecond, whose preconditioning differs); None disables the check.
    """
    if require_class is not None and ckpt.class_name not in (None, require_class):
        raise ValueError(f"{ckpt.source}: holds a {ckpt.class_name}, expected {require_class} (its "
                         "preconditioning differs; pass require_class=None to load the weights anyway)")
    own = net.state_dict()
    sd = dict(ckpt.state_dict)
    dropped = []
    if not any(k.startswith("model.map_augment.") for k in own):
        dropped = [k for k in sd if k.startswith("model.map_augment.")]
        for k in dropped:
            del sd[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs network {tuple(own[k].shape)}"
                  for k in own if k in sd and sd[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        lines = [f"{ckpt.source} does not fit the network:"]
        for title, items in (("shape mismatches", mismatched), ("missing keys", missing),
                             ("unexpected keys", unexpected)):
            if items:
                shown = items[:20] + ([f"... ({len(items) - 20} more)"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise ValueError("\n".join(lines))
    net.load_state_dict(sd, strict=strict)
    return LoadReport(dropped=dropped, missing=missing if not strict else [], unexpected=unexpected if not strict else [])
