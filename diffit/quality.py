"""Sample quality that needs no download: the numbers `diffit demo` reports for the digits.

FID needs Inception weights fetched at run time (README, "Sample quality"); for scikit-learn's
8x8 digits a small classifier fitted on the digits themselves plays Inception's part:

    accuracy    the share of class-conditional samples the classifier assigns to the class they
                were drawn for, overall and per class (chance: 0.1)
    frechet     FID's formula, ||mu_s - mu_d||^2 + tr(S_s + S_d - 2 (S_s S_d)^(1/2)), between
                Gaussians fitted to the classifier's hidden features of the samples (s) and of
                the digits it was fitted on (d)

The classifier is scikit-learn's MLPClassifier (one hidden layer of 64 ReLU units, L-BFGS, fixed
seed; a fraction of a second on one core) fitted on a stratified 80 % of the 1797 digits. The other 20 % give the reference: the
accuracy of real digits, and the Frechet distance of real digits the classifier never saw,
which is what a perfect sampler scores at that sample count (the distance is biased upward for
small samples, as FID is).
"""
from __future__ import annotations

import functools
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DigitsScorer", "digits_scorer", "digits_quality", "format_quality",
           "frechet_distance"]

HIDDEN = 64          # hidden ReLU units of the classifier: the feature space of the distance
HELD_OUT = 0.2       # share of the digits kept out of the fit for the reference numbers


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's distance between Gaussians fitted to feature rows a [N, D] and b [M, D].

    tr((S_a S_b)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
    symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2) (same eigenvalues), which stays real and finite
    for the singular covariances of collapsed samples, where scipy's sqrtm warns.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need feature rows [N >= 2, D] of one width, got {a.shape} and "
                         f"{b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                  # S_a^(1/2)
    m = root_a @ s_b @ root_a
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_cross)


class DigitsScorer:
    """The fitted classifier and the reference numbers; score() rates samples."""

    def __init__(self, seed: int = 0):
        try:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split
            from sklearn.neural_network import MLPClassifier
            from threadpoolctl import threadpool_limits
        except ImportError as e:
            raise ImportError("the digits quality numbers need scikit-learn "
                              "(pip install scikit-learn)") from e
        d = load_digits()
        x = d.images.reshape(len(d.images), -1) / 16.0                  # [1797, 64] in [0, 1]
        x_fit, x_ref, y_fit, y_ref = train_test_split(
            x, d.target, test_size=HELD_OUT, random_state=seed, stratify=d.target)
        # 64-wide matrices: BLAS threads only spin-wait for each other (10x slower on a busy
        # machine)
        with threadpool_limits(1):
            self.clf = MLPClassifier(hidden_layer_sizes=(HIDDEN,), alpha=1e-3, solver="lbfgs",
                                     max_iter=500, random_state=seed).fit(x_fit, y_fit)
        self.fit_features = self.features(x_fit)
        self.num_fit, self.num_ref = len(x_fit), len(x_ref)
        self.reference = {
            "accuracy": float((self.clf.predict(x_ref) == y_ref).mean()),
            "frechet_distance": frechet_distance(self.features(x_ref), self.fit_features),
            "num_real": self.num_ref,
        }

    def features(self, x01: np.ndarray) -> np.ndarray:
        """Hidden ReLU activations [N, HIDDEN] of digits x01 [N, 64] in [0, 1]."""
        return np.maximum(x01 @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0)

    @staticmethod
    def to_digits(images: torch.Tensor) -> np.ndarray:
        """Samples [N, C, H, W] in [-1, 1] (the trainer's data scale) -> [N, 64] in [0, 1]:
        channels averaged, H x W area-averaged to the digits' 8 x 8."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a tensor [N, C, H, W], got "
                             f"{getattr(images, 'shape', type(images))}")
        x = images.detach().float().cpu().clamp(-1, 1).mean(1, keepdim=True)  # [N, 1, H, W]
        if x.shape[-2:] != (8, 8):
            x = F.adaptive_avg_pool2d(x, 8)                                # [N, 1, 8, 8]
        return ((x + 1) / 2).reshape(x.shape[0], 64).numpy().astype(np.float64)

    def score(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict:
        """Quality numbers of samples [N, C, H, W] in [-1, 1] drawn for `labels` [N] (None:
        unconditional samples, no accuracy)."""
        x = self.to_digits(images)
        pred = self.clf.predict(x)
        out = {"num_samples": int(len(x)),
               "predicted_per_class": np.bincount(pred, minlength=10).tolist()}
        if labels is not None:
            y = torch.as_tensor(labels).cpu().numpy().reshape(-1)
            if len(y) != len(x):
                raise ValueError(f"{len(x)} images but {len(y)} labels")
            per: List[Optional[float]] = [
                float((pred[y == k] == k).mean()) if (y == k).any() else None for k in range(10)]
            out["accuracy"] = float((pred == y).mean())
            out["accuracy_per_class"] = per
        out["frechet_distance"] = frechet_distance(self.features(x), self.fit_features)
        out["reference"] = dict(self.reference)
        out["measured_with"] = (f"MLPClassifier({HIDDEN} hidden ReLU) fitted on {self.num_fit} "
                                f"of scikit-learn's digits; reference: the {self.num_ref} "
                                "held-out digits")
        return out


@functools.lru_cache(maxsize=2)
def digits_scorer(seed: int = 0) -> DigitsScorer:
    """The scorer, fitted once per process (about a second)."""
    return DigitsScorer(seed)


def digits_quality(images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> dict:
    """DigitsScorer().score(images, labels) with the cached scorer."""
    return digits_scorer().score(images, labels)


def format_quality(q: dict) -> str:
    """A few lines for the terminal."""
    ref = q["reference"]
    lines = []
    if "accuracy" in q:
        per = " ".join("-" if a is None else f"{a:.2f}" for a in q["accuracy_per_class"])
        lines.append(f"classifier accuracy on {q['num_samples']} samples: {q['accuracy']:.3f} "
                     f"(real held-out digits: {ref['accuracy']:.3f}; chance 0.1)")
        lines.append(f"  per class 0-9: {per}")
    lines.append(f"Frechet distance of classifier features: {q['frechet_distance']:.3f} "
                 f"(real held-out digits: {ref['frechet_distance']:.3f})")
    return "\n".join(lines)
