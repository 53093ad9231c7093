"""Sample-quality metrics on feature vectors and class probabilities.

Every function here is plain float64 numpy over explicit arrays: the features
come from any network (in this codebase the MNIST / Fashion-MNIST classifier
of `diffusion_jax.evaluation.classifier`, standing in for Inception-v3, whose
weights cannot be downloaded here).

- Frechet distance between Gaussians fitted to two feature sets (Dowson &
  Landau 1982; used as FID by Heusel et al. 2017).
- Kernel distance, KID: unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018), averaged over subsets.
- Inception-Score analogue exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016).
- Conditional accuracy: fraction of samples the classifier assigns to the
  label they were drawn for.
"""

from __future__ import annotations

import numpy as np


def _as_2d_float64(features, name: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [num_samples, dim], got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples, got {x.shape[0]}")
    return x


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and unbiased covariance [d, d] of features [n, d], in float64."""
    x = _as_2d_float64(features, "features")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix via eigh."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))   (Dowson & Landau 1982)

    The cross term uses tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)): the inner
    matrix is symmetric PSD, so its square root comes from a symmetric eigendecomposition
    (stable for singular covariances, no complex round-off as with a general sqrtm).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"mu1 and mu2 must be vectors of one shape, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"sigma1 and sigma2 must be [{d}, {d}], got {sigma1.shape} and {sigma2.shape}")
    sqrt_sigma1 = _psd_sqrt(sigma1)
    inner = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2.0), 0.0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def frechet_distance_from_features(features1, features2) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [n1, d] and [n2, d]."""
    return frechet_distance(*gaussian_statistics(features1), *gaussian_statistics(features2))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3, the KID kernel of Binkowski et al. 2018."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """Unbiased estimate of MMD^2 with the cubic polynomial kernel (Gretton et al. 2012, eq. 3).

    MMD^2_u = sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1))
              - 2 sum_{i,j} k(x_i, y_j) / (mn)
    """
    x, y = _as_2d_float64(x, "x"), _as_2d_float64(y, "y")
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(features1, features2, *, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of unbiased MMD^2 over random subsets.

    Each of `num_subsets` draws `min(subset_size, n1, n2)` rows of each feature set
    without replacement (Binkowski et al. 2018, section 4). The mean is unbiased, so it
    can be negative when both sets come from one distribution.
    """
    f1 = _as_2d_float64(features1, "features1")
    f2 = _as_2d_float64(features2, "features2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dims differ: {f1.shape[1]} vs {f2.shape[1]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    size = min(subset_size, f1.shape[0], f2.shape[0])
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(f1[rng.choice(f1.shape[0], size, replace=False)],
                      f2[rng.choice(f2.shape[0], size, replace=False)])
        for _ in range(num_subsets)
    ])
    return float(values.mean()), float(values.std())


def _as_probs(probs) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be [num_samples, num_classes], got shape {p.shape}")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("probs rows must be probability vectors (non-negative, summing to 1); "
                         "pass softmax(logits), not logits")
    return p


def inception_score(probs, *, num_splits: int = 1) -> tuple[float, float]:
    """IS analogue exp(E_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the split.

    Salimans et al. 2016 with the evaluation classifier's class probabilities in place
    of Inception's. Lies in [1, num_classes]: num_classes exactly when every sample is
    classified with certainty and the classes are used uniformly. Returns the mean and
    standard deviation over `num_splits` equal splits.
    """
    p = _as_probs(probs)
    if not 1 <= num_splits <= p.shape[0]:
        raise ValueError(f"num_splits must be in [1, {p.shape[0]}], got {num_splits}")
    scores = []
    for part in np.array_split(p, num_splits):
        marginal = part.mean(axis=0, keepdims=True)
        # 0 * log 0 = 0: mask the zero entries instead of adding an epsilon.
        ratio = np.where(part > 0, part / np.where(marginal > 0, marginal, 1.0), 1.0)
        kl = np.sum(np.where(part > 0, part * np.log(ratio), 0.0), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _hits(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """(bool [n]: arg-max class == label, labels [n]) after checking the shapes."""
    p = np.asarray(probs)
    labels = np.asarray(labels)
    if p.ndim != 2 or labels.shape != (p.shape[0],):
        raise ValueError(f"need probs [n, classes] and labels [n], got {p.shape} and {labels.shape}")
    return np.argmax(p, axis=1) == labels, labels


def conditional_accuracy(probs, labels) -> float:
    """Fraction of samples whose arg-max class equals the label they were generated for."""
    return float(np.mean(_hits(probs, labels)[0]))


def conditional_accuracy_per_class(probs, labels, num_classes: int) -> list[float | None]:
    """conditional_accuracy over the samples generated for each class 0 .. num_classes-1
    (None for a class with no samples), so one weak class is not averaged away."""
    hit, labels = _hits(probs, labels)
    return [float(np.mean(hit[labels == c])) if np.any(labels == c) else None for c in range(num_classes)]
