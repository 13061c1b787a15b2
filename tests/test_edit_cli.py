"""`ddpm edit` end to end on a tiny saved model: the files it writes, the pixels it keeps, that strength 1 and a
seed walk's end draw what `ddpm sample` draws, and one line (and nothing written) for every bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import DiffusionConfig, UNet, save_pretrained
from ddpm.cli import main

FAST = ["--sampling-steps", "3", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_config):
    folder = tmp_path_factory.mktemp("edit") / "model"
    torch.manual_seed(0)
    model = UNet(tiny_config(num_classes=3))
    with torch.no_grad():  # a fresh UNet is nearly the identity (input_skip): make it predict something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_pretrained(model, folder, DiffusionConfig(timesteps=50))
    return folder


def write_images(folder, count=3, size=8, mode="L", seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(count):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"img{k}.png")
    return folder


def write_mask(path, size=8, rows=slice(4, None), value=255):
    mask = np.zeros((size, size), np.uint8)
    mask[rows] = value
    Image.fromarray(mask).save(path)
    return path


def pixels(path):
    return np.array(Image.open(path))


def test_inpainting_keeps_the_known_pixels_and_writes_each_grid(tmp_path, model_dir, capsys):
    # The bugs it catches: known pixels changed in the written PNG (a resize, a range error, the mask inverted), a
    # grey mask used unthresholded, grids missing. Masks come as one file for all and as a folder of same names.
    images = write_images(tmp_path / "in")
    mask = write_mask(tmp_path / "mask.png")
    assert main(["edit", str(model_dir), str(images), "--mask", str(mask), "--labels", "0,1,2", "--out",
                 str(tmp_path / "out"), *FAST]) == 0
    for k in range(3):
        before, after = pixels(images / f"img{k}.png"), pixels(tmp_path / "out" / f"img{k}.png")
        assert np.array_equal(before[:4], after[:4]) and not np.array_equal(before[4:], after[4:])
        assert (tmp_path / "out" / f"img{k}_grid.png").is_file()
    assert pixels(tmp_path / "out" / "grid.png").shape[1] > 3 * 8  # input | mask | result
    masks = tmp_path / "masks"
    masks.mkdir()
    for k in range(3):  # a folder of masks, each with grey edges: thresholded at 128, said in one note
        write_mask(masks / f"img{k}.png", rows=slice(k + 2, None), value=200 if k == 1 else 255)
    assert main(["edit", str(model_dir), str(images), "--mask", str(masks), "--labels", "1", "--out",
                 str(tmp_path / "out2"), "--resample", "2", *FAST]) == 0
    assert "has grey pixels: at least 128" in capsys.readouterr().err
    for k in range(3):
        kept = slice(0, k + 2)
        assert np.array_equal(pixels(images / f"img{k}.png")[kept], pixels(tmp_path / "out2" / f"img{k}.png")[kept])


def test_strength_0_keeps_the_image_and_strength_1_draws_what_ddpm_sample_draws(tmp_path, model_dir):
    images = write_images(tmp_path / "in")
    assert main(["edit", str(model_dir), str(images), "--strength", "0", "--labels", "2,0,1", "--out",
                 str(tmp_path / "s0"), *FAST]) == 0
    for k in range(3):
        assert np.array_equal(pixels(images / f"img{k}.png"), pixels(tmp_path / "s0" / f"img{k}.png"))
    assert main(["edit", str(model_dir), str(images), "--strength", "1", "--labels", "2,0,1", "--seed", "5",
                 "--batch-size", "2", "--out", str(tmp_path / "s1"), *FAST]) == 0
    assert main(["sample", str(model_dir), "--labels", "2,0,1", "--seed", "5", "--batch-size", "2", "--out",
                 str(tmp_path / "plain"), *FAST]) == 0
    drawn = sorted((tmp_path / "plain").glob("sample_*.png"))
    for k, path in enumerate(drawn):
        assert np.array_equal(pixels(path), pixels(tmp_path / "s1" / f"img{k}.png"))
    assert main(["edit", str(model_dir), str(images), "--strength", "0.5", "--labels", "2,0,1", "--out",
                 str(tmp_path / "half"), "--sampler", "ddim", "--eta", "1", "--guidance", "2", "--clip-x0",
                 *FAST]) == 0


def test_interpolation_writes_the_frames_and_a_seed_walk_ends_on_the_seeds_images(tmp_path, model_dir):
    images = write_images(tmp_path / "in", count=2)
    assert main(["edit", str(model_dir), str(images / "img0.png"), str(images / "img1.png"), "--interpolate", "4",
                 "--labels", "0,2", "--out", str(tmp_path / "walk"), *FAST]) == 0
    assert len(list((tmp_path / "walk").glob("frame_*.png"))) == 4 and (tmp_path / "walk" / "strip.png").is_file()
    assert main(["edit", str(model_dir), "--interpolate", "3", "--seeds", "7", "9", "--labels", "1", "--out",
                 str(tmp_path / "seeds"), *FAST]) == 0
    for seed, frame in ((7, "frame_00000.png"), (9, "frame_00002.png")):
        assert main(["sample", str(model_dir), "--labels", "1", "--seed", str(seed), "--out",
                     str(tmp_path / f"plain{seed}"), *FAST]) == 0
        plain = next((tmp_path / f"plain{seed}").glob("sample_*.png"))
        assert np.abs(pixels(plain).astype(int) - pixels(tmp_path / "seeds" / frame).astype(int)).max() <= 1


def test_bad_inputs_get_one_line_and_write_nothing(tmp_path, model_dir, capsys):
    images = write_images(tmp_path / "in")
    colour = write_images(tmp_path / "colour", count=1, mode="RGB")
    big_mask = write_mask(tmp_path / "big.png", size=10)
    mask = write_mask(tmp_path / "mask.png")
    black = write_mask(tmp_path / "black.png", rows=slice(0, 0))
    out = tmp_path / "out"
    base = ["edit", str(model_dir)]
    for argv, words in (
        ([str(images), "--mask", str(big_mask), "--labels", "0"], "is 10x10 but its image is 8x8"),
        ([str(colour), "--strength", "0.5", "--labels", "0"], "is a colour image but the model draws 1-channel"),
        ([str(images), "--mask", str(black), "--labels", "0"], "black everywhere"),
        ([str(images), "--mask", str(tmp_path / "nothing"), "--labels", "0"], "does not exist"),
        ([str(images), "--mask", str(mask), "--labels", "0,1"], "2 labels for 3 images"),
        ([str(images), "--mask", str(mask)], "give --labels"),
        ([str(images), "--mask", str(mask), "--labels", "7"], "out of range"),
        ([str(images), "--strength", "1.5", "--labels", "0"], "--strength must be in [0, 1]"),
        ([str(images), "--strength", "nan", "--labels", "0"], "--strength must be in [0, 1]"),
        ([str(images / "img0.png"), str(images / "img1.png"), "--interpolate", "1", "--labels", "0"],
         "2 to 1000 frames"),
        ([str(images), "--interpolate", "3", "--labels", "0"], "exactly two images"),
        ([str(images), "--interpolate", "3", "--seeds", "1", "2"], "not both"),
        ([str(images), "--strength", "0.5", "--seeds", "1", "2", "--labels", "0"], "goes with --interpolate"),
        (["--strength", "0.5", "--labels", "0"], "give the images to edit"),
        ([str(images), "--strength", "0.5", "--labels", "0", "--batch-size", "0"], "--batch-size"),
        ([str(images), "--strength", "0.5", "--labels", "0", "--resample", "2"], "goes with --mask"),
        ([str(images), "--mask", str(mask), "--labels", "0", "--resample", "0"], "--resample must be from 1"),
    ):
        assert main([*base, *argv, "--out", str(out), "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, (argv, err)
        assert not out.exists(), argv
    (tmp_path / "file").write_text("x")
    assert main([*base, str(images), "--strength", "0.5", "--labels", "0", "--out", str(tmp_path / "file")]) == 2
    with pytest.raises(SystemExit):  # argparse: no mode, or two modes
        main([*base, str(images), "--out", str(out)])
