"""diffit.quality: the digits sample-quality numbers. The Frechet distance against scipy's
matrix square root; real digits score as the reference says; a tiny model trained a few hundred
steps scores clearly above the same model untrained."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffit.quality import digits_quality, digits_scorer, format_quality, frechet_distance

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def _scipy_frechet(a, b):
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s_a @ s_b).real
    return ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root)


@pytest.mark.parametrize("n,d", [(200, 3), (500, 16)], ids=["N200-D3", "N500-D16"])
def test_frechet_distance_matches_scipy(n, d):
    rng = np.random.default_rng(n + d)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(n + 50, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    assert frechet_distance(a, b) == pytest.approx(_scipy_frechet(a, b), rel=1e-6, abs=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    # a collapsed sample (rank-1 covariance) stays finite
    assert np.isfinite(frechet_distance(np.outer(rng.normal(size=n), np.ones(d)), b))
    with pytest.raises(ValueError, match="feature rows"):
        frechet_distance(a, b[:, :-1])


def test_real_digits_score_like_the_reference():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16 * 2 - 1   # the data scale
    y = torch.as_tensor(d.target)
    q = digits_quality(x, y)
    ref = q["reference"]
    assert 0.9 < ref["accuracy"] <= 1 and ref["frechet_distance"] > 0
    assert q["accuracy"] >= ref["accuracy"] and q["frechet_distance"] < ref["frechet_distance"]
    # the trainer's upsampled digits (bilinear, as DigitsDataset) pool back to 8x8
    x16 = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1, 1)
    assert digits_quality(x16, y)["accuracy"] > 0.9
    # noise: chance accuracy, a large distance; labels that disagree lower the accuracy
    noise = torch.rand(500, 1, 8, 8) * 2 - 1
    qn = digits_quality(noise, y[:500])
    assert qn["accuracy"] < 0.3 and qn["frechet_distance"] > 10 * ref["frechet_distance"]
    assert digits_quality(x[:500], (y[:500] + 1) % 10)["accuracy"] < 0.1
    per = q["accuracy_per_class"]
    assert len(per) == 10 and all(0.9 < a <= 1 for a in per)
    assert "per class" in format_quality(q) and "accuracy" not in digits_quality(x[:50])
    with pytest.raises(ValueError, match="labels"):
        digits_quality(x[:10], y[:9])


def test_trained_model_scores_clearly_above_untrained(tmp_path):
    """300 steps of the demo's configuration at batch 32 (about 10 s on one core) against the
    same initial weights untrained, 200 samples each through the sampler the demo uses."""
    from diffit.sample_checkpoint import read_sampling_checkpoint
    from diffit.training.demo import DEMO_CONFIG, sample_quality
    from diffit.sample import edm_sample, load_model
    from diffit.training.train import TrainConfig, train
    from diffit.unet import DiffiTUNet

    cfg = {**DEMO_CONFIG, "steps": 300, "batch_size": 32, "num_samples": 0, "log_every": 100,
           "progress": False, "out": str(tmp_path / "run")}
    train(TrainConfig(**cfg))
    trained = sample_quality(tmp_path / "run", per_class=20)

    ck = read_sampling_checkpoint(tmp_path / "run")
    torch.manual_seed(0)                                  # fresh weights, as the trainer draws
    untrained_model = DiffiTUNet.from_preset("tiny", **ck.model_config).eval()
    assert load_model(ck).config == untrained_model.config
    labels = torch.arange(10).repeat_interleave(20)
    noise = torch.randn((200, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    untrained = digits_quality(edm_sample(untrained_model, noise, labels, num_steps=18), labels)

    assert trained["num_samples"] == untrained["num_samples"] == 200
    assert untrained["accuracy"] < 0.25                                   # about chance
    assert trained["accuracy"] > 0.4 and trained["accuracy"] > untrained["accuracy"] + 0.25
    assert trained["frechet_distance"] < 0.25 * untrained["frechet_distance"]
    assert trained["weights"] == "ema" and trained["checkpoint"].endswith("ckpt_00000300.pt")
