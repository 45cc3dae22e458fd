"""Tests of ayt.features: shapes, the authors' parameter names, registry, freezing, loading."""

import pytest
import torch

from ayt.features import (FEATURE_NETS, MINI_VGG_CONFIG, VGG, MLPFeatures, ResNet18, build_feature_net, freeze,
                          feature_net_from_file, num_params, vgg_config)

# Block names of the authors' VGG16 at 32 px (1202kbs/AYT src/ayt/classifiers.py), in order.
AUTHORS_VGG16_BLOCKS = [
    "32x32_block0", "32x32_block1", "16x16_block0", "16x16_block1", "8x8_block0", "8x8_block1", "8x8_block2",
    "4x4_block0", "4x4_block1", "4x4_block2", "2x2_block0", "2x2_block1", "2x2_block2",
]
AUTHORS_VGG16_KEYS = [f"layers.{b}.{k}" for b in AUTHORS_VGG16_BLOCKS
                      for k in ("conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                "bn.running_var", "bn.num_batches_tracked")] + ["layers.classifier.weight",
                                                                                "layers.classifier.bias"]


def shapes(feats):
    return [tuple(f.shape[1:]) for f in feats]


def test_vgg16_features_32px():
    net = build_feature_net("vgg16", resolution=32, num_outputs=15).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = net.features(x)
    assert shapes(feats) == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512, 1, 1), (15, 1, 1)]
    assert sum(f.shape[1] for f in feats) == 1487
    torch.testing.assert_close(net(x), feats[-1].flatten(1))
    assert net(x).shape == (2, 15)


def test_vgg16_other_resolutions():
    # 16 px: the stage that would pool 1x1 is dropped; 64 px: five stages end at 2x2.
    net16 = VGG(16, resolution=16, num_outputs=7).eval()
    assert shapes(net16.features(torch.randn(2, 3, 16, 16))) == [(64, 8, 8), (128, 4, 4), (256, 2, 2),
                                                                 (512, 1, 1), (7, 1, 1)]
    assert "layers.16x16_block0.conv.weight" in net16.state_dict()
    assert net16.cfg == VGG_16_AT_16
    net64 = VGG(16, resolution=64).eval()
    assert shapes(net64.features(torch.randn(1, 3, 64, 64))) == [(64, 32, 32), (128, 16, 16), (256, 8, 8),
                                                                 (512, 4, 4), (512, 2, 2), (15, 1, 1)]
    assert "2x2_avgpool" in net64.layers
    with pytest.raises(ValueError, match="expected"):
        net64.features(torch.randn(1, 3, 32, 32))


VGG_16_AT_16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"]


def test_vgg_config_rules():
    assert vgg_config(MINI_VGG_CONFIG, 16) == MINI_VGG_CONFIG
    assert vgg_config(MINI_VGG_CONFIG, 8) == [32, 32, "M", 64, 64, "M", 128, 128, "M"]
    assert vgg_config([8, "M", 16, "M"], 12, widths=[4, 6]) == [4, "M", 6, "M"]
    assert vgg_config([8, "M", 16], 32, widths=[4, 6]) == [4, "M", 6]
    with pytest.raises(ValueError, match="stages"):
        vgg_config([8, "M", 16, "M"], 32, widths=[4])
    with pytest.raises(ValueError, match="halved"):
        vgg_config([8, "M"], 7)


def test_vgg16_key_layout_equals_authors():
    net = VGG(16, resolution=32, num_outputs=15)
    sd = net.state_dict()
    assert list(sd) == AUTHORS_VGG16_KEYS
    assert sd["layers.classifier.weight"].shape == (15, 512)
    assert sd["layers.32x32_block0.conv.weight"].shape == (64, 3, 3, 3)
    assert sd["layers.2x2_block2.conv.weight"].shape == (512, 512, 3, 3)
    names = list(dict(net.layers.named_children()))
    assert names[2] == "32x32_maxpool" and names[-2] == "1x1_avgpool" and names[-1] == "classifier"
    assert num_params(net) == 14_730_831


def test_vgg16_strided_variant():
    net = build_feature_net("vgg16-stride").eval()
    assert list(net.state_dict()) == AUTHORS_VGG16_KEYS                # same names as the authors' VGGMod
    assert net.layers["32x32_block1"].conv.stride == (2, 2)
    assert net.layers["32x32_block0"].conv.stride == (1, 1)
    assert isinstance(net.layers["32x32_maxpool"], torch.nn.Identity)
    feats = net.features(torch.randn(2, 3, 32, 32))
    assert shapes(feats) == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512, 1, 1), (15, 1, 1)]


def test_vgg_without_batchnorm():
    net = VGG(11, resolution=32, batchnorm=False)
    assert not any(".bn." in k for k in net.state_dict())
    assert shapes(net.features(torch.randn(1, 3, 32, 32)))[-2:] == [(512, 1, 1), (15, 1, 1)]


def test_mini_vgg():
    net = build_feature_net("mini-vgg", resolution=16, num_outputs=15).eval()
    assert num_params(net) == 1_178_031
    assert shapes(net.features(torch.randn(2, 3, 16, 16))) == [(32, 8, 8), (64, 4, 4), (128, 2, 2), (256, 1, 1),
                                                               (15, 1, 1)]
    assert net.layers["classifier"].in_features == 256


def test_resnet18():
    net = build_feature_net("resnet18", resolution=32, num_outputs=15).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = net.features(x)
    assert shapes(feats) == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (15, 1, 1)]
    torch.testing.assert_close(net(x), feats[-1].flatten(1))
    sd = net.state_dict()
    assert "layer2.0.shortcut.0.weight" in sd and "linear.weight" in sd and "conv1.weight" in sd
    assert shapes(ResNet18(resolution=16, in_channels=1, num_outputs=3).eval().features(
        torch.randn(1, 1, 16, 16))) == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (3, 1, 1)]
    with pytest.raises(ValueError, match="multiple of 8"):
        ResNet18(resolution=12)


def test_mlp_features():
    net = build_feature_net("mlp", dim=5, hidden=(16, 8), num_outputs=3)
    x = torch.randn(4, 5)
    feats = net.features(x)
    assert shapes(feats) == [(16, 1, 1), (8, 1, 1), (3, 1, 1)]
    for a, b in zip(feats, net.features(x[:, :, None, None])):
        assert torch.equal(a, b)
    assert net(x).shape == (4, 3)
    with pytest.raises(ValueError, match="expected"):
        net.features(torch.randn(4, 6))
    assert isinstance(MLPFeatures(2, activation="relu"), MLPFeatures)


def test_registry():
    vggmod = {f"vggmod{d}{s}{b}" for d in (11, 13, 16, 19) for s in ("", "-stride") for b in ("", "-nobn")}
    assert set(FEATURE_NETS) == {"vgg11", "vgg13", "vgg16", "vgg19", "vgg16-stride", "resnet18", "mini-vgg", "mlp",
                                 "resnet10", "densenet", "vit", "vit-mini", "dae"} | vggmod
    for depth in (11, 13, 19):
        net = build_feature_net(f"vgg{depth}")
        n_convs = sum(1 for k in net.state_dict() if k.endswith("conv.weight"))
        assert n_convs == depth - 3
    with pytest.raises(ValueError, match="vgg16-stride"):
        build_feature_net("alexnet")


def test_freeze():
    net = freeze(build_feature_net("mini-vgg", resolution=16))
    assert not net.training and all(not p.requires_grad for p in net.parameters())
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    loss = sum(f.square().sum() for f in net.features(x))
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    # eval mode: per-sample outputs do not depend on the batch (BatchNorm running statistics)
    torch.testing.assert_close(net(x[:1]), net(x)[:1])


def test_load_feature_net(tmp_path):
    src = build_feature_net("mini-vgg", resolution=16, num_outputs=4)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    path = tmp_path / "phi.pt"
    torch.save(src.state_dict(), path)
    net = freeze(feature_net_from_file(path, "mini-vgg", resolution=16, num_outputs=4))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(net(x), src.eval()(x))
    # DataParallel prefix
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "dp.pt")
    feature_net_from_file(tmp_path / "dp.pt", "mini-vgg", resolution=16, num_outputs=4)
    with pytest.raises(ValueError, match="shape mismatches: layers.classifier.weight"):
        feature_net_from_file(path, "mini-vgg", resolution=16, num_outputs=15)
    with pytest.raises(ValueError, match="missing keys: layers.32x32_block0"):
        feature_net_from_file(path, "mini-vgg", resolution=32, num_outputs=4)
    torch.save({"state": [1, 2]}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="plain state dict"):
        feature_net_from_file(tmp_path / "bad.pt", "mini-vgg", resolution=16)
