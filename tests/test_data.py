"""Tests for ayt.data: every dataset's item convention, readers on tiny files written here,
the shapes generator (params <-> pixels), and the disk geometry (projections, distances)."""
import dataclasses
import gzip
import json
import math
import os
import pickle
import struct
import time
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from ayt import data as D


def check_items(ds, n, channels, resolution, label_dim):
    """Dataset item convention: float32 CHW in [-1, 1]; float32 label of width label_dim."""
    assert len(ds) == n
    assert (ds.num_channels, ds.resolution, ds.label_dim) == (channels, resolution, label_dim)
    for i in (0, n - 1):
        x, y = ds[i]
        assert x.dtype == torch.float32 and x.shape == (channels, resolution, resolution)
        assert x.min() >= -1 and x.max() <= 1
        assert y.dtype == torch.float32 and y.shape == (label_dim,)
    images, labels = D.as_tensors(ds)
    assert images.shape == (n, channels, resolution, resolution) and labels.shape == (n, label_dim)
    assert torch.equal(images[-1], ds[-1][0]) and torch.equal(labels[0], ds[0][1])


# ---------------------------------------------------------------------------------------------
# CIFAR-10 (python-pickle layout).

def write_cifar(root, n_per_batch=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    written = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n_per_batch).tolist()
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f, protocol=2)
        written[name] = (data, labels)
    return written


def test_cifar10_reader_and_items(tmp_path):
    written = write_cifar(str(tmp_path))
    ds = D.get_dataset("cifar10", root=str(tmp_path))
    check_items(ds, 15, 3, 32, 0)
    data, labels = written["data_batch_2"]
    # Item 4 = second image of data_batch_2; CHW layout (R plane, G plane, B plane), x/127.5 - 1.
    expected = torch.from_numpy(data[1].reshape(3, 32, 32).astype(np.float32)) / 127.5 - 1
    assert torch.equal(ds[4][0], expected)
    assert ds.class_index[4] == labels[1]

    test = D.CIFAR10Dataset(str(tmp_path), split="test", conditional=True)
    check_items(test, 3, 3, 32, 10)
    data, labels = written["test_batch"]
    x, y = test[2]
    assert torch.equal(y, torch.nn.functional.one_hot(torch.tensor(labels[2]), 10).float())
    assert torch.equal(((x + 1) * 127.5).round().to(torch.uint8).flatten(), torch.from_numpy(data[2]))


def test_cifar10_resolution(tmp_path):
    write_cifar(str(tmp_path))
    with pytest.raises(ValueError, match="data.resize=true"):
        D.get_dataset("cifar10", root=str(tmp_path), resolution=16)
    ds = D.get_dataset("cifar10", root=str(tmp_path), resolution=16, resize=True)
    check_items(ds, 15, 3, 16, 0)
    # A constant image stays constant after (antialiased bilinear) resizing.
    const = D._resize_uint8(torch.full((1, 3, 32, 32), 77, dtype=torch.uint8), 16)
    assert torch.all(const == 77)


def test_cifar10_missing_raises_with_path(tmp_path):
    root = str(tmp_path / "nowhere")
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.get_dataset("cifar10", root=root)
    assert isinstance(err.value, FileNotFoundError)
    msg = str(err.value)
    assert os.path.join(os.path.abspath(root), "cifar-10-batches-py") in msg
    assert "download=True" in msg and "cifar-10-python.tar.gz" in msg


def test_cifar10_failed_download_raises(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(url, *args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(D.DatasetNotFoundError, match="download of https://"):
        D.get_dataset("cifar10", root=str(tmp_path), download=True)


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (raw idx layout).

def write_idx(path, array, compress=False):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    opener = gzip.open if compress else open
    with opener(path + (".gz" if compress else ""), "wb") as f:
        f.write(payload)


def write_mnist(root, folder="MNIST", n=4, compress=False, seed=0):
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw)
    images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # no zeros: padding is visible
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    write_idx(os.path.join(raw, "train-images-idx3-ubyte"), images, compress)
    write_idx(os.path.join(raw, "train-labels-idx1-ubyte"), labels, compress)
    write_idx(os.path.join(raw, "t10k-images-idx3-ubyte"), images[:2], compress)
    write_idx(os.path.join(raw, "t10k-labels-idx1-ubyte"), labels[:2], compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_padding(tmp_path, compress):
    images, labels = write_mnist(str(tmp_path), compress=compress)
    ds = D.get_dataset("mnist", root=str(tmp_path), conditional=True)
    check_items(ds, 4, 1, 32, 10)
    x, y = ds[1]
    # 28 -> 32: 2 px of black (-1) on each side, the original pixels in the middle.
    assert torch.all(x[:, :2] == -1) and torch.all(x[:, -2:] == -1)
    assert torch.all(x[:, :, :2] == -1) and torch.all(x[:, :, -2:] == -1)
    assert torch.equal(x[0, 2:30, 2:30], torch.from_numpy(images[1]).float() / 127.5 - 1)
    assert y.argmax() == labels[1] and y.sum() == 1
    assert len(D.get_dataset("mnist", root=str(tmp_path), split="test")) == 2


def test_mnist_rgb_and_resize(tmp_path):
    images, _ = write_mnist(str(tmp_path), folder="FashionMNIST")
    rgb = D.get_dataset("fashion-mnist", root=str(tmp_path), rgb=True)
    check_items(rgb, 4, 3, 32, 0)
    x = rgb[0][0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    resized = D.get_dataset("fashion-mnist", root=str(tmp_path), mnist_mode="resize")
    check_items(resized, 4, 1, 32, 0)
    assert resized[0][0][0, 0, 0] > -1  # no black border when resizing
    native = D.MNISTDataset(str(tmp_path), variant="fashion-mnist", mnist_mode="resize", resolution=28)
    assert torch.equal(native[3][0][0], torch.from_numpy(images[3]).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="even"):
        D.get_dataset("fashion-mnist", root=str(tmp_path), resolution=31)


def test_mnist_missing_raises_with_path(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as err:
        D.get_dataset("fashion-mnist", root=str(tmp_path))
    msg = str(err.value)
    assert os.path.join(os.path.abspath(str(tmp_path)), "FashionMNIST", "raw") in msg
    assert "train-images-idx3-ubyte" in msg and "download=True" in msg


def test_read_idx_rejects_bad_header(tmp_path):
    path = str(tmp_path / "bad")
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x01\x02")
    with pytest.raises(ValueError, match="header says"):
        D.read_idx(path)


# ---------------------------------------------------------------------------------------------
# Image folders and zip archives.

def write_pngs(root, n=6, size=8, mode="RGB", seed=0, class_dirs=False):
    """PNG files in EDM's layout 00000/img%08d.png (or class subfolders); returns {relpath: uint8 HWC}."""
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(n):
        sub = f"class{i % 2}" if class_dirs else f"{i // 4:05d}"
        rel = f"{sub}/img{i:08d}.png"
        shape = (size, size) if mode == "L" else (size, size, 3)
        arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        PIL.Image.fromarray(arr, mode=mode).save(os.path.join(root, rel))
        files[rel] = arr
    return files


def test_folder_dataset_with_json_labels(tmp_path):
    files = write_pngs(str(tmp_path))
    labels = {rel: (3 * i) % 7 for i, rel in enumerate(sorted(files))}
    with open(tmp_path / "dataset.json", "w") as f:
        json.dump({"labels": [[rel, lab] for rel, lab in labels.items()]}, f)
    ds = D.get_dataset("folder", root=str(tmp_path), conditional=True)
    check_items(ds, 6, 3, 8, 7)
    rel = sorted(files)[4]
    x, y = ds[4]
    assert torch.equal(x, torch.from_numpy(files[rel]).permute(2, 0, 1).float() / 127.5 - 1)
    assert y.argmax() == labels[rel]
    check_items(D.get_dataset("folder", root=str(tmp_path)), 6, 3, 8, 0)


def test_folder_labels_from_subfolders_and_grey(tmp_path):
    write_pngs(str(tmp_path), mode="L", class_dirs=True)
    ds = D.ImageFolderDataset(str(tmp_path), conditional=True, labels="folders")
    check_items(ds, 6, 1, 8, 2)
    assert ds.class_names == ["class0", "class1"]
    assert [int(ds[i][1].argmax()) for i in range(6)] == [int(n.startswith("class1")) for n in ds.image_names]
    with pytest.raises(ValueError, match="no labels"):
        D.ImageFolderDataset(str(tmp_path), conditional=True)  # 'auto' and no dataset.json


def test_folder_resolution_mismatch_and_mixed_images(tmp_path):
    write_pngs(str(tmp_path))
    with pytest.raises(ValueError, match="data.resize=true"):
        D.get_dataset("folder", root=str(tmp_path), resolution=16)
    ds = D.get_dataset("folder", root=str(tmp_path), resolution=16, resize=True)
    check_items(ds, 6, 3, 16, 0)
    # A second resolution in the folder is an error unless everything is resized.
    PIL.Image.new("RGB", (10, 10)).save(tmp_path / "odd.png")
    with pytest.raises(ValueError, match="different or non-square sizes.*odd.png is 10x10.*data.resize=true"):
        D.get_dataset("folder", root=str(tmp_path))
    check_items(D.get_dataset("folder", root=str(tmp_path), resolution=8, resize=True), 7, 3, 8, 0)
    os.remove(tmp_path / "odd.png")
    PIL.Image.new("L", (8, 8)).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="channel"):
        D.get_dataset("folder", root=str(tmp_path))


def test_zip_dataset(tmp_path):
    src = tmp_path / "src"
    files = write_pngs(str(src), n=5)
    labels = {rel: i % 3 for i, rel in enumerate(sorted(files))}
    path = str(tmp_path / "data.zip")
    with zipfile.ZipFile(path, "w") as z:
        for rel in sorted(files):
            z.write(src / rel, rel)
        z.writestr("dataset.json", json.dumps({"labels": [[r, l] for r, l in labels.items()]}))
    ds = D.get_dataset("zip", root=path, conditional=True)
    check_items(ds, 5, 3, 8, 3)
    rel = sorted(files)[2]
    assert torch.equal(ds[2][0], torch.from_numpy(files[rel]).permute(2, 0, 1).float() / 127.5 - 1)
    # Picklable for DataLoader workers: the open archive handle is dropped and reopened lazily.
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._zip is None
    assert torch.equal(clone[2][0], ds[2][0]) and torch.equal(clone[2][1], ds[2][1])
    with pytest.raises(ValueError, match="data.resize=true"):
        D.get_dataset("zip", root=path, resolution=32)
    with pytest.raises(D.DatasetNotFoundError):
        D.get_dataset("zip", root=str(tmp_path / "missing.zip"))


# ---------------------------------------------------------------------------------------------
# Validation of image folders and zips: every bad input is named before any training starts.

def test_empty_folder_and_folder_without_images(tmp_path):
    with pytest.raises(ValueError, match="no image files.*it is empty.*data.root"):
        D.get_dataset("folder", root=str(tmp_path))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files.*1 other file.*notes.txt"):
        D.get_dataset("folder", root=str(tmp_path))


def _truncate(path, cut=30):
    """Cut the end of a PNG: its header still reads (size, mode), decoding fails."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-cut])
    with PIL.Image.open(path) as img:
        assert img.size == (8, 8)


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_unreadable_files_are_named_or_skipped_with_a_count(tmp_path, capsys, kind):
    src = tmp_path / "src"
    files = write_pngs(str(src), n=6)
    bad = sorted(files)[3]  # not the first file: the header of the first one says nothing about it
    _truncate(src / bad)
    (src / "00001" / "garbage.png").write_bytes(b"this is not a png")
    root = src
    if kind == "zip":
        root = tmp_path / "data.zip"
        with zipfile.ZipFile(root, "w") as z:
            for p in sorted(src.rglob("*.png")):
                z.write(p, p.relative_to(src).as_posix())
    with pytest.raises(ValueError, match=rf"2 of 7 image files cannot be read: {bad} \(.*truncated.*\); "
                                         rf"00001/garbage.png \(Unidentified.*data.skip_unreadable=true"):
        D.get_dataset(kind, root=str(root))
    capsys.readouterr()
    ds = D.get_dataset(kind, root=str(root), skip_unreadable=True)
    assert "skipped 2 unreadable image file(s) of 7" in capsys.readouterr().out
    check_items(ds, 5, 3, 8, 0)
    assert bad not in ds.image_names and "00001/garbage.png" not in ds.image_names


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_hidden_files_and_macos_metadata_are_ignored(tmp_path, capsys, kind):
    src = tmp_path / "src"
    files = write_pngs(str(src), n=4, class_dirs=True)
    # what Finder and Jupyter leave behind: AppleDouble files (not images), __MACOSX/, checkpoint folders
    (src / "class0" / "._img00000000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (src / "__MACOSX" / "class1").mkdir(parents=True)
    (src / "__MACOSX" / "class1" / "._img00000001.png").write_bytes(b"\x00\x05\x16\x07")
    (src / ".ipynb_checkpoints").mkdir()
    PIL.Image.new("L", (5, 5)).save(src / ".ipynb_checkpoints" / "grey.png")  # would fail every check
    root = src
    if kind == "zip":
        root = tmp_path / "data.zip"
        with zipfile.ZipFile(root, "w") as z:
            for p in sorted(q for q in src.rglob("*") if q.is_file()):
                z.write(p, p.relative_to(src).as_posix())
    capsys.readouterr()
    ds = D.get_dataset(kind, root=str(root), conditional=True, labels="folders")
    assert "ignored 3 hidden image file(s)" in capsys.readouterr().out
    assert ds.image_names == sorted(files) and ds.class_names == ["class0", "class1"]
    check_items(ds, 4, 3, 8, 2)


def test_mixed_channels_name_one_file_of_each_kind(tmp_path):
    write_pngs(str(tmp_path), n=3)
    PIL.Image.new("L", (8, 8)).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match=r"00000/img00000000.png is RGB \(3 channels\), grey.png is grayscale "
                                         r"\(1 channel\).*Convert the files first"):
        D.get_dataset("folder", root=str(tmp_path))


def test_resize_centre_crops_non_square_images(tmp_path, capsys):
    # 12 x 8 (w x h): columns 0-1 and 10-11 are red, the central 8x8 square is a gradient
    arr = np.zeros((8, 12, 3), dtype=np.uint8)
    arr[:, :2, 0] = arr[:, 10:, 0] = 255
    arr[:, 2:10, 1] = np.arange(8, dtype=np.uint8)[None, :] * 30
    PIL.Image.fromarray(arr).save(tmp_path / "wide.png")
    write_pngs(str(tmp_path), n=2, size=16)
    with pytest.raises(ValueError, match=r"different or non-square sizes.*wide.png is 12x8.*data.resize=true"):
        D.get_dataset("folder", root=str(tmp_path), resolution=8)
    ds = D.get_dataset("folder", root=str(tmp_path), resolution=8, resize=True)
    out = capsys.readouterr().out
    assert "3 of 3 images are not 8x8" in out and "1 non-square images are centre-cropped" in out
    i = ds.image_names.index("wide.png")
    want = torch.from_numpy(arr[:, 2:10]).permute(2, 0, 1).float() / 127.5 - 1  # the central square, no red
    assert torch.equal(ds[i][0], want)
    check_items(ds, 3, 3, 8, 0)


def test_zip_that_is_not_a_zip_and_a_directory_given_as_zip(tmp_path):
    fake = tmp_path / "images.zip"
    fake.write_bytes(b"PK but not really a zip archive")
    with pytest.raises(ValueError, match=r"images.zip' is not a zip archive.*dataset_tool.py.*data.name=folder"):
        D.get_dataset("zip", root=str(fake))
    with pytest.raises(ValueError, match="is a directory; for a directory of images use data.name=folder"):
        D.get_dataset("zip", root=str(tmp_path))
    with pytest.raises(D.DatasetNotFoundError, match="it is a file: for an EDM-style zip use data.name=zip"):
        D.get_dataset("folder", root=str(fake))
    with pytest.raises(ValueError, match="has no held-out split"):
        D.get_dataset("folder", root=str(tmp_path), split="test")


def _train_cfg(tmp_path, **data):
    from ayt.config import make_config
    over = {"stage": "diffusion", "name": "bad", "run_root": str(tmp_path / "runs"), "net.arch": "tiny", "batch": 2,
            "iters": 2, "ckpt_every": 1, "log_every": 1, "sample_every": 0, "device": "cpu", "log.tensorboard": False,
            "data.resolution": 8, **{f"data.{k}": v for k, v in data.items()}}
    return make_config(None, over)


@pytest.mark.parametrize("case", ["empty", "corrupt", "channels", "sizes", "notzip"])
def test_bad_image_data_stops_train_before_anything_is_written(tmp_path, case):
    from ayt.train import train
    folder = tmp_path / "images"
    folder.mkdir()
    name, match = "folder", None
    if case == "empty":
        match = "it is empty"
    elif case == "corrupt":
        files = write_pngs(str(folder), n=4)
        _truncate(folder / sorted(files)[2])
        match = rf"{sorted(files)[2]}.*data.skip_unreadable=true"
    elif case == "channels":
        write_pngs(str(folder), n=2)
        PIL.Image.new("L", (8, 8)).save(folder / "grey.png")
        match = "grey.png is grayscale"
    elif case == "sizes":
        write_pngs(str(folder), n=2)
        PIL.Image.new("RGB", (16, 16)).save(folder / "big.png")
        match = "big.png is 16x16.*data.resize=true"
    else:
        name, folder = "zip", tmp_path / "data.zip"
        folder.write_bytes(b"not a zip")
        match = "is not a zip archive"
    with pytest.raises(ValueError, match=match):
        train(_train_cfg(tmp_path, name=name, root=str(folder)))
    assert not (tmp_path / "runs" / "bad").exists()  # no run directory, no checkpoint, no metrics


def test_cli_names_the_bad_folder_and_exits_2(tmp_path):
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "ayt", "train", "stage=diffusion", "name=x", f"run_root={tmp_path}",
                          "data.name=folder", f"data.root={tmp_path / 'nothing-here'}", "data.resolution=8"],
                         cwd=repo, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": repo})
    assert out.returncode == 2 and "image folder not found" in out.stderr and "nothing-here" in out.stderr
    assert not (tmp_path / "x").exists()


def test_folder_labels_setting_and_train_help_lists_every_data_setting(tmp_path):
    from ayt.config import DataConfig, _field_comments, describe_settings
    from ayt.runs import build_dataset
    write_pngs(str(tmp_path), mode="RGB", class_dirs=True)
    ds = build_dataset(_train_cfg(tmp_path, name="folder", root=str(tmp_path), labels="folders", conditional=True))
    assert ds.class_names == ["class0", "class1"] and ds.label_dim == 2
    with pytest.raises(ValueError, match="data.labels=folders applies to data.name=folder or zip only"):
        _train_cfg(tmp_path, name="shapes", labels="folders")
    text = describe_settings()
    comments = _field_comments(DataConfig)
    for f in dataclasses.fields(DataConfig):
        line = next(l for l in text.splitlines() if l.strip().startswith(f"data.{f.name}="))
        assert comments[f.name] and comments[f.name] in line, f.name  # every data setting explains itself
    name_line = next(l for l in text.splitlines() if l.strip().startswith("data.name="))
    assert all(n in name_line for n in D.DATASET_NAMES)
    assert "[true | false]" in next(l for l in text.splitlines() if l.strip().startswith("data.resize="))
    assert "train | test" in next(l for l in text.splitlines() if l.strip().startswith("data.split="))
    assert "auto" in next(l for l in text.splitlines() if l.strip().startswith("data.labels=")) and "folders" in text


def test_registry_unknown_name():
    with pytest.raises(ValueError, match="cifar10.*shapes.*disk"):
        D.get_dataset("imagenet")


# ---------------------------------------------------------------------------------------------
# Shapes.

def test_shapes_items_and_determinism():
    ds = D.get_dataset("shapes", n=50, seed=3)
    check_items(ds, 50, 3, 16, 0)
    assert ds.params.shape == (50, len(D.SHAPE_PARAM_NAMES)) == (50, 14)
    cond = D.ShapesDataset(n=50, seed=3, conditional=True)
    check_items(cond, 50, 3, 16, 3)
    assert torch.equal(cond[7][1], cond.params[7, :3])
    a, pa = D.make_shapes(64, 32, seed=5)
    b, pb = D.make_shapes(64, 32, seed=5)
    c, _ = D.make_shapes(64, 32, seed=6)
    assert torch.equal(a, b) and torch.equal(pa, pb) and not torch.equal(a, c)


def test_shapes_params_match_pixels():
    R = 16
    images, params = D.make_shapes(300, R, seed=0)
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, D.render_shapes(params, R))
    kind = params[:, :3]
    assert torch.all(kind.sum(1) == 1) and set(kind.argmax(1).tolist()) == {0, 1, 2}
    cx, cy, size = params[:, 3], params[:, 4], params[:, 5]
    assert cx.min() >= 0.25 and cx.max() <= 0.75 and cy.min() >= 0.25 and cy.max() <= 0.75
    assert size.min() >= 2.5 / 16 and size.max() <= 5.5 / 16
    fg, bg = params[:, 8:11], params[:, 11:14]
    assert fg.min() >= 0 and fg.max() <= 1 and bg.min() >= 0 and bg.max() <= 1
    assert torch.all((fg - bg).abs().amax(1) >= 0.6)  # colour contrast condition
    orient = params[:, 6:8]
    is_disk = kind[:, 0] == 1
    assert torch.all(orient[is_disk] == 0)
    assert torch.allclose(orient[~is_disk].norm(dim=1), torch.ones(int((~is_disk).sum())), atol=1e-6)
    idx = torch.arange(300)
    # Pixel containing the centre is pure foreground (inradius >= 1.25 px > pixel half-diagonal).
    row, col = (cy * R).long(), (cx * R).long()
    assert torch.allclose(images[idx, :, row, col], 2 * fg - 1, atol=1e-6)
    # The corner farthest from the centre is >= 7.5*sqrt(2) px away: pure background.
    frow = torch.where(cy < 0.5, R - 1, 0)
    fcol = torch.where(cx < 0.5, R - 1, 0)
    assert torch.allclose(images[idx, :, frow, fcol], 2 * bg - 1, atol=1e-6)


def alpha_of(params, R):
    """Coverage map: render with fg = white, bg = black."""
    p = params.clone()
    p[:, 8:11], p[:, 11:14] = 1.0, 0.0
    return (D.render_shapes(p, R)[:, 0] + 1) / 2


def test_shapes_area_and_symmetry():
    R, s = 64, 0.25  # size 16 px, centred: fully inside the image
    params = torch.zeros(3, 14)
    params[:, :3] = torch.eye(3)
    params[:, 3:5] = 0.5
    params[:, 5] = s
    theta = 0.3
    for k, order in enumerate(D.SHAPE_SYMMETRY_ORDERS):
        if order:
            params[k, 6:8] = torch.tensor([math.cos(order * theta), math.sin(order * theta)])
    area = alpha_of(params, R).sum((1, 2)) / R**2  # in image-width units^2
    expected = torch.tensor([math.pi * s**2, 2 * s**2, 3 * math.sqrt(3) / 4 * s**2])
    assert torch.allclose(area, expected, rtol=5e-3)
    # Rotating by 2*pi/k leaves (cos k theta, sin k theta), hence the image, unchanged; rotating by a
    # generic angle changes square and triangle images but not the disk.
    rot = params.clone()
    for k, order in enumerate(D.SHAPE_SYMMETRY_ORDERS):
        if order:
            t2 = theta + 0.2
            rot[k, 6:8] = torch.tensor([math.cos(order * t2), math.sin(order * t2)])
    diff = (alpha_of(params, R) - alpha_of(rot, R)).abs().amax((1, 2))
    assert diff[0] == 0 and diff[1] > 0.5 and diff[2] > 0.5


def test_shape_sdfs_match_brute_force():
    s = torch.tensor(0.3)
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(4000, 2, generator=g) * 1.4 - 0.7

    def polygon_sdf(p, verts):
        d = []
        inside = torch.ones(len(p), dtype=torch.bool)
        for i in range(len(verts)):
            a, b = verts[i], verts[(i + 1) % len(verts)]
            ab = b - a
            t = ((p - a) @ ab / (ab @ ab)).clamp(0, 1)
            d.append((p - (a + t[:, None] * ab)).norm(dim=1))
            inside &= (ab[0] * (p[:, 1] - a[1]) - ab[1] * (p[:, 0] - a[0])) >= 0  # counter-clockwise
        d = torch.stack(d).amin(0)
        return torch.where(inside, -d, d)

    h = s / math.sqrt(2)
    square = torch.stack([torch.stack(v) for v in [(-h, -h), (h, -h), (h, h), (-h, h)]])
    tri = torch.stack([torch.stack(v) for v in
                       [(-s * math.sqrt(3) / 2, -s / 2), (s * math.sqrt(3) / 2, -s / 2), (0 * s, s)]])
    x, y = pts[:, 0], pts[:, 1]
    assert torch.allclose(D.sdf_square(x, y, s), polygon_sdf(pts, square), atol=1e-6)
    assert torch.allclose(D.sdf_triangle(x, y, s), polygon_sdf(pts, tri), atol=1e-6)
    assert torch.allclose(D.sdf_disk(x, y, s), pts.norm(dim=1) - s, atol=1e-6)


def test_render_shapes_gradients_finite():
    _, params = D.make_shapes(12, 16, seed=1)
    params = params.clone().requires_grad_(True)
    D.render_shapes(params, 16).square().sum().backward()
    g = params.grad
    assert torch.isfinite(g).all()
    assert torch.all(g[:, 3:6].abs().sum(1) > 0)  # centre/size move the antialiased edge


def test_make_shapes_speed():
    start = time.perf_counter()
    images, _ = D.make_shapes(10000, 16, seed=0)
    assert time.perf_counter() - start < 2.0
    assert images.shape == (10000, 3, 16, 16)


# ---------------------------------------------------------------------------------------------
# Disk.

def test_disk_geometry():
    disk = D.make_disk(500, dim=12, radius=1.0, seed=0)
    B = disk.basis
    assert disk.points.shape == (500, 12) and B.shape == (12, 2)
    assert torch.allclose(B.T @ B, torch.eye(2), atol=1e-6)
    assert torch.allclose(disk.tangent_projection(disk.points), disk.points, atol=1e-6)  # in span(B)
    assert disk.points.norm(dim=1).max() <= 1 + 1e-6 and disk.points.abs().max() <= 1
    # Uniform in area: P(||a|| <= 1/sqrt 2) = 1/2.
    frac = (disk.coordinates(disk.points).norm(dim=1) <= 1 / math.sqrt(2)).float().mean()
    assert abs(frac - 0.5) < 0.08

    v = torch.randn(500, 12, generator=torch.Generator().manual_seed(1))
    t, n = disk.tangent_projection(v), disk.normal_projection(v)
    assert torch.allclose(t + n, v, atol=1e-6)
    assert torch.allclose(disk.tangent_projection(t), t, atol=1e-5)
    assert torch.allclose(disk.normal_projection(n), n, atol=1e-5)
    assert torch.allclose(disk.tangent_projection(n), torch.zeros_like(n), atol=1e-5)
    assert torch.allclose((t * n).sum(1), torch.zeros(500), atol=1e-5)
    # Image view [n, D, 1, 1] works with the same projections.
    vi = v[:, :, None, None]
    assert torch.allclose(disk.tangent_projection(vi), t[:, :, None, None])


def test_disk_distance_to_manifold():
    disk = D.make_disk(200, dim=8, radius=1.0, seed=2, offset=0.5)
    assert torch.allclose(disk.offset.norm(), torch.tensor(0.5))
    assert torch.allclose(disk.distance_to_manifold(disk.points), torch.zeros(200), atol=1e-5)
    g = torch.Generator().manual_seed(3)
    normal = disk.normal_projection(torch.randn(200, 8, generator=g))
    normal = normal / normal.norm(dim=1, keepdim=True)
    shift = torch.rand(200, generator=g) * 2
    moved = disk.points + shift[:, None] * normal
    assert torch.allclose(disk.distance_to_manifold(moved), shift, atol=1e-5)
    assert torch.allclose(disk.project(moved), disk.points, atol=1e-5)
    # In-plane point at radius 1.5 plus a normal offset of 2: distance sqrt(0.5^2 + 2^2).
    x = disk.offset + 1.5 * disk.basis[:, 0] + 2.0 * normal[0]
    assert torch.allclose(disk.distance_to_manifold(x[None]), torch.tensor([math.sqrt(0.25 + 4)]), atol=1e-5)


def test_disk_dataset_and_determinism():
    ds = D.get_dataset("disk", n=40, dim=6, seed=1)
    check_items(ds, 40, 6, 1, 0)
    assert torch.equal(ds[3][0].flatten(), ds.data.points[3])
    a, b = D.make_disk(40, 6, seed=1), D.make_disk(40, 6, seed=1)
    assert torch.equal(a.points, b.points) and torch.equal(a.basis, b.basis)
    assert not torch.equal(a.points, D.make_disk(40, 6, seed=2).points)
    assert torch.equal(a.as_images(), ds.data.as_images())


def test_mnist_failed_download_raises(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu
    tried = []

    def offline(url, *args, **kwargs):
        tried.append(url)
        raise OSError("network is unreachable")
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(D.DatasetNotFoundError, match="download failed"):
        D.get_dataset("mnist", root=str(tmp_path), download=True)
    assert tried and all(u.endswith("train-images-idx3-ubyte.gz") for u in tried)  # every mirror tried
