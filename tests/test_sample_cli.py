"""`python -m diffit sample`: files, layouts, errors, the VAE path (with a stand-in VAE) and
sharding under torchrun."""
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from diffit import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--random-init", "--model", "DiffiT-tiny", "--image-size", "128", "--no-progress"]


def _run(argv):
    return cli.main(["sample", *argv])


def test_latents_only_random_init(tmp_path):
    rc = _run([*TINY, "--latents-only", "--num-samples", "3", "--batch-size", "2",
               "--steps", "5", "--labels", "7,2", "--out", str(tmp_path)])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["latents_3x4x16x16.npz"]                      # no temp files left behind
    d = np.load(tmp_path / files[0])
    assert d["arr_0"].dtype == np.float32 and d["arr_0"].shape == (3, 4, 16, 16)
    assert np.isfinite(d["arr_0"]).all()
    assert d["arr_1"].tolist() == [7, 2, 7]


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert _run(["--model", "DiffiT-tiny", "--latents-only", "--out", str(tmp_path)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert _run(["--checkpoint", str(tmp_path / "nope.safetensors"), "--latents-only",
                 "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_checkpoint_and_image_size_check(tmp_path, capsys):
    from diffit.checkpoint import save_state_dict
    from diffit.latent import DiffiT

    model = DiffiT.from_preset("DiffiT-tiny", input_size=16)
    ckpt = save_state_dict(model.state_dict(), tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    assert _run(["--checkpoint", str(ckpt), "--image-size", "256", "--latents-only",
                 "--out", str(out), "--no-progress"]) == 2
    assert "latent size 16" in capsys.readouterr().err
    assert _run(["--checkpoint", str(ckpt), "--image-size", "128", "--latents-only",
                 "--num-samples", "2", "--steps", "ddim3", "--cfg-scale", "1.5",
                 "--out", str(out), "--no-progress"]) == 0
    assert np.load(out / "latents_2x4x16x16.npz")["arr_0"].shape == (2, 4, 16, 16)


@pytest.mark.skipif(__import__("importlib").util.find_spec("diffusers") is not None,
                    reason="diffusers is installed: the missing-VAE message cannot be shown")
def test_missing_diffusers_message(tmp_path, capsys):
    assert _run([*TINY, "--num-samples", "1", "--steps", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "diffusers" in err and "--latents-only" in err


class _StandInVAE:
    """Decodes like the SD VAE's interface: [B, 4, h, w] -> .sample [B, 3, 8h, 8w] in [-1, 1]."""

    def __init__(self):
        self.seen = []

    def decode(self, z):
        self.seen.append(z.clone())
        img = torch.tanh(z[:, :3]).repeat_interleave(8, 2).repeat_interleave(8, 3)
        return types.SimpleNamespace(sample=img)


def test_images_adm_layout_and_grid(tmp_path, monkeypatch):
    from PIL import Image

    import diffit.sample as sample

    vae = _StandInVAE()
    monkeypatch.setattr(sample, "_load_vae", lambda name, device: vae)
    assert _run([*TINY, "--num-samples", "5", "--batch-size", "4", "--steps", "3",
                 "--out", str(tmp_path)]) == 0
    d = np.load(tmp_path / "samples_5x128x128x3.npz")
    assert d["arr_0"].dtype == np.uint8 and d["arr_0"].shape == (5, 128, 128, 3)
    assert d["arr_1"].shape == (5,) and d["arr_1"].max() < 10
    z = torch.cat(vae.seen)                                         # latents / 0.18215
    want = ((torch.tanh(z[:, :3]) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert np.array_equal(d["arr_0"][:, ::8, ::8], want.permute(0, 2, 3, 1).numpy())
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (3 * 130 + 2, 2 * 130 + 2)


def test_torchrun_shards_and_gathers(tmp_path):
    """Two gloo ranks give the same DDIM latents, in the same order, as one process."""
    args = [*TINY, "--latents-only", "--num-samples", "5", "--batch-size", "2",
            "--steps", "ddim3", "--seed", "3"]
    assert _run([*args, "--out", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "diffit", "sample", *args,
                        "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = np.load(tmp_path / "one" / "latents_5x4x16x16.npz")
    two = np.load(tmp_path / "two" / "latents_5x4x16x16.npz")
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
    np.testing.assert_allclose(one["arr_0"], two["arr_0"], rtol=1e-5, atol=1e-5)
    assert len({a.tobytes() for a in one["arr_0"]}) == 5            # samples differ
