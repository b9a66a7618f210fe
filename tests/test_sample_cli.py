"""`python -m diffit sample`: files, layouts, errors, the VAE path (with a stand-in VAE) and
sharding under torchrun; every checkpoint form the trainer writes (run directory, checkpoints
folder, `latest`, ckpt file) and bare state dicts, family detection, EMA / model weights, EDM's
sampler options, and the errors for checkpoints that cannot be sampled."""
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


def test_dit_style_pt_takes_ema_unless_told(tmp_path, capsys, one_thread):
    """A .pt holding {"model", "ema"} state dicts (DiT's layout): EMA by default, printed."""
    from diffit.checkpoint import save_state_dict
    from diffit.latent import DiffiT

    sds = {k: DiffiT.from_preset("DiffiT-tiny", input_size=16).state_dict()
           for k in ("model", "ema")}
    for sd in sds.values():                             # the zero-initialised output layer
        sd["final_layer.linear.weight"] = torch.randn_like(sd["final_layer.linear.weight"])
    torch.save({**sds, "opt": {"state": {}, "param_groups": []}}, tmp_path / "dit.pt")
    base = ["--latents-only", "--num-samples", "2", "--steps", "ddim3", "--no-progress"]
    got = {}
    for key, extra in (("ema", []), ("model", ["--weights", "model"])):
        save_state_dict(sds[key], tmp_path / f"{key}.safetensors")
        for src in ("dit.pt", f"{key}.safetensors"):
            out = tmp_path / f"{src}-{key}"
            flags = extra if src == "dit.pt" else []
            assert _run(["--checkpoint", str(tmp_path / src), *flags, *base,
                         "--out", str(out)]) == 0
            got[src, key] = np.load(out / "latents_2x4x16x16.npz")["arr_0"]
        assert np.array_equal(got["dit.pt", key], got[f"{key}.safetensors", key])
    said = capsys.readouterr().out
    assert "state dict): latent model, EMA weights" in said
    assert "state dict): latent model, training (non-EMA) weights" in said
    assert not np.array_equal(got["dit.pt", "ema"], got["dit.pt", "model"])


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


def _run_two_ranks(argv):
    """`python -m diffit sample argv` under torchrun with two gloo ranks, one thread each."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "-m", "diffit", "sample", *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_shards_and_gathers(tmp_path):
    """Two gloo ranks give the same DDIM latents, in the same order, as one process."""
    args = [*TINY, "--latents-only", "--num-samples", "5", "--batch-size", "2",
            "--steps", "ddim3", "--seed", "3"]
    assert _run([*args, "--out", str(tmp_path / "one")]) == 0
    r = _run_two_ranks([*args, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-3000:]
    one = np.load(tmp_path / "one" / "latents_5x4x16x16.npz")
    two = np.load(tmp_path / "two" / "latents_5x4x16x16.npz")
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
    np.testing.assert_allclose(one["arr_0"], two["arr_0"], rtol=1e-5, atol=1e-5)
    assert len({a.tobytes() for a in one["arr_0"]}) == 5            # samples differ


# ---- checkpoints the trainer writes ---------------------------------------------------------
def _train(out, **over):
    from diffit.training.train import TrainConfig, train

    cfg = dict(model="tiny", data="digits", image_size=8, batch_size=8, steps=2, lr=1e-3,
               log_every=1, ckpt_every=0, num_samples=0, progress=False, out=str(out))
    train(TrainConfig(**{**cfg, **over}))
    return out


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A class-conditional image-space run (label dropout 0.1), two steps: EMA != model."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _train(tmp_path_factory.mktemp("image_run") / "run")
    finally:
        torch.set_num_threads(n)


def _ckpt(run):
    return run / "checkpoints" / "ckpt_00000002.pt"


def _samples(out, n, side=8):
    return np.load(out / f"samples_{n}x{side}x{side}x3.npz")


IMG = ["--num-samples", "5", "--batch-size", "3", "--no-progress"]


def test_every_checkpoint_form_samples_the_same_ema_model(image_run, tmp_path, capsys, one_thread):
    from PIL import Image

    from diffit.checkpoint import save_state_dict

    ck = torch.load(_ckpt(image_run), weights_only=True)
    sd_file = save_state_dict(ck["ema"], tmp_path / "ema.safetensors")
    forms = {"run dir": [image_run], "checkpoints folder": [image_run / "checkpoints"],
             "latest pointer": [image_run / "checkpoints" / "latest"],
             "trainer checkpoint": [_ckpt(image_run)],
             "state dict": [sd_file, "--model", "tiny"]}
    got = {}
    for name, (path, *extra) in forms.items():
        out = tmp_path / name.replace(" ", "_")
        assert _run(["--checkpoint", str(path), *extra, *IMG, "--out", str(out)]) == 0, name
        said = capsys.readouterr().out
        assert ("EMA weights" if name != "state dict" else "the file's weights") in said
        assert "image model" in said and "EDM Heun, 18 steps, deterministic" in said
        d = _samples(out, 5)
        assert d["arr_0"].dtype == np.uint8 and d["arr_0"].shape == (5, 8, 8, 3)
        assert (d["arr_0"][..., 0] == d["arr_0"][..., 2]).all()           # grey as RGB
        assert 0 <= d["arr_1"].min() and d["arr_1"].max() < 10
        pngs = sorted((out / "images").iterdir())
        assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(5)]
        assert np.array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), d["arr_0"])
        assert Image.open(out / "grid.png").size == (3 * 66 + 2, 2 * 66 + 2)  # 8 px -> 64 px
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files
        got[name] = d["arr_0"]
    first = got.pop("run dir")
    for name, arr in got.items():
        assert np.array_equal(arr, first), name
    assert len({a.tobytes() for a in first}) == 5


def test_weights_choice_and_rerun_replaces_png_folder(image_run, tmp_path, capsys, one_thread):
    out = tmp_path / "s"
    assert _run(["--checkpoint", str(image_run), "--weights", "model", "--num-samples", "4",
                 "--no-progress", "--out", str(out)]) == 0
    assert "training (non-EMA) weights" in capsys.readouterr().out
    model_w = _samples(out, 4)["arr_0"]
    assert _run(["--checkpoint", str(image_run), "--num-samples", "3", "--no-progress",
                 "--threads", "1", "--out", str(out)]) == 0
    assert not np.array_equal(_samples(out, 3)["arr_0"], model_w[:3])
    assert len(list((out / "images").iterdir())) == 3                # the old 4 are gone
    assert _run(["--checkpoint", str(image_run), "--threads", "0", "--out", str(out)]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert _run(["--checkpoint", str(image_run), "--num-classes", "7", "--out", str(out)]) == 2
    assert "trained with 10 classes" in capsys.readouterr().err


def test_image_sampler_options(image_run, tmp_path, capsys, one_thread):
    base = ["--checkpoint", str(image_run), "--num-samples", "4", "--labels", "3,5",
            "--no-progress", "--seed", "1"]

    def draw(name, *extra):
        assert _run([*base, *extra, "--out", str(tmp_path / name)]) == 0
        return _samples(tmp_path / name, 4)

    plain = draw("plain")
    assert plain["arr_1"].tolist() == [3, 5, 3, 5]
    churn1 = draw("churn1", "--S_churn", "40", "--S-min", "0.05", "--S_max", "50")
    churn2 = draw("churn2", "--S-churn", "40", "--S_min", "0.05", "--S-max", "50")
    assert np.array_equal(churn1["arr_0"], churn2["arr_0"])          # seeded
    assert not np.array_equal(churn1["arr_0"], plain["arr_0"])
    guided = draw("guided", "--cfg-scale", "3")
    assert not np.array_equal(guided["arr_0"], plain["arr_0"])
    few = draw("few", "--steps", "4", "--sigma_max", "40", "--rho", "5")
    assert not np.array_equal(few["arr_0"], plain["arr_0"])
    out = capsys.readouterr().out
    assert "stochastic" in out and "guidance 3" in out and "4 steps" in out
    assert _run([*base, "--steps", "ddim5", "--out", str(tmp_path / "x")]) == 2
    assert "Heun steps" in capsys.readouterr().err
    assert _run([*base, "--latents-only", "--out", str(tmp_path / "x")]) == 2
    assert "samples images directly" in capsys.readouterr().err
    assert _run([*base, "--image-size", "16", "--out", str(tmp_path / "x")]) == 2
    assert "8x8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _edit_checkpoint(src, dst, edit):
    ck = torch.load(src, weights_only=True)
    edit(ck)
    torch.save(ck, dst)
    return dst


def test_family_detection_and_guidance_needs_label_dropout(image_run, tmp_path, capsys, one_thread):
    from diffit.sample_checkpoint import read_sampling_checkpoint

    old = _edit_checkpoint(_ckpt(image_run), tmp_path / "old.pt", lambda ck: ck.pop("family"))
    c = read_sampling_checkpoint(old)                   # older checkpoints: from the preset
    assert (c.family, c.preset, c.kind, c.weights, c.step) == ("image", "tiny", "trainer",
                                                               "ema", 2)
    ck = torch.load(_ckpt(image_run), weights_only=True)
    for k, v in ck["ema"].items():
        assert torch.equal(c.state_dict[k], v)

    def no_dropout(ck):
        ck["model_config"]["class_dropout_prob"] = 0.0
    nodrop = _edit_checkpoint(_ckpt(image_run), tmp_path / "nodrop.pt", no_dropout)
    assert _run(["--checkpoint", str(nodrop), "--cfg-scale", "2", "--out",
                 str(tmp_path / "x")]) == 2
    assert "label dropout" in capsys.readouterr().err
    assert _run(["--checkpoint", str(nodrop), *IMG, "--out", str(tmp_path / "ok")]) == 0


def test_bad_checkpoints_name_the_file_and_what_it_holds(image_run, tmp_path, capsys, one_thread):
    def err(path, *extra):
        assert _run(["--checkpoint", str(path), *extra, "--out", str(tmp_path / "x")]) == 2
        return capsys.readouterr().err

    ckdir = tmp_path / "run" / "checkpoints"
    ckdir.mkdir(parents=True)
    (ckdir / "latest").write_text("ckpt_00002000.pt\n")
    e = err(ckdir / "latest")
    assert str(ckdir / "latest") in e and "pointer" in e and "ckpt_00002000.pt" in e
    assert "ckpt_00002000.pt" in err(tmp_path / "run")                 # through the run dir
    (ckdir / "latest").unlink()
    e = err(tmp_path / "run")
    assert "holds no checkpoint" in e and str(tmp_path / "run") in e

    notes = tmp_path / "notes.txt"
    notes.write_text("hello\nworld\n")
    e = err(notes)
    assert str(notes) in e and "text file" in e and "hello" in e

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 2)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    e = err(tmp_path / "opt.pt")
    assert str(tmp_path / "opt.pt") in e and "optimizer state" in e and "no model weights" in e
    torch.save({"optimizer": opt.state_dict(), "step": 3}, tmp_path / "opt2.pt")
    e = err(tmp_path / "opt2.pt")
    assert str(tmp_path / "opt2.pt") in e and "'optimizer' is an optimizer state" in e

    def unknown(ck):
        ck["family"] = "pixel-gan"
    e = err(_edit_checkpoint(_ckpt(image_run), tmp_path / "fam.pt", unknown))
    assert str(tmp_path / "fam.pt") in e and "'pixel-gan'" in e and "image" in e

    def foreign(ck):
        ck["format"] = "someone-else-3"
    e = err(_edit_checkpoint(_ckpt(image_run), tmp_path / "fmt.pt", foreign))
    assert "someone-else-3" in e and str(tmp_path / "fmt.pt") in e

    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pt")
    e = err(tmp_path / "other.pt")
    assert "not a DiffiT state dict" in e and "weight" in e

    ck = torch.load(_ckpt(image_run), weights_only=True)
    from diffit.checkpoint import save_state_dict
    sd = save_state_dict(ck["ema"], tmp_path / "unet.safetensors")
    e = err(sd)
    assert "U-Net state dict" in e and "--model" in e
    assert "no EMA / model choice" in err(sd, "--model", "tiny", "--weights", "model")
    e = err(sd, "--model", "cifar10")                                 # wrong preset: key list
    assert "does not match the model" in e and str(sd) in e

    garbage = tmp_path / "broken.pt"
    garbage.write_bytes(_ckpt(image_run).read_bytes()[:5000])
    e = err(garbage)
    assert str(garbage) in e and "not a readable" in e
    assert not (tmp_path / "x").exists()


# ---- latent runs ------------------------------------------------------------------------------
def test_latent_trainer_checkpoints(tmp_path, monkeypatch, capsys, one_thread):
    """A tiny latent run on latents (VAE-decoded, or --latents-only) and one on pixels."""
    import diffit.sample as sample

    g = torch.Generator().manual_seed(0)
    torch.save({"latents": torch.randn(16, 4, 8, 8, generator=g),
                "labels": torch.arange(16) % 3}, tmp_path / "lat.pt")
    run = _train(tmp_path / "lat", model="DiffiT-tiny", data="latents",
                 data_path=str(tmp_path / "lat.pt"), image_size=None)
    assert _run(["--checkpoint", str(run), "--latents-only", "--steps", "ddim4", *IMG,
                 "--out", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().out
    assert "latent model DiffiT-tiny, EMA weights" in said and "DDIM, 4 steps" in said
    d = np.load(tmp_path / "a" / "latents_5x4x8x8.npz")
    assert d["arr_0"].shape == (5, 4, 8, 8) and d["arr_1"].max() < 3
    vae = _StandInVAE()
    monkeypatch.setattr(sample, "_load_vae", lambda name, device: vae)
    assert _run(["--checkpoint", str(run / "checkpoints" / "latest"), "--steps", "ddim4", *IMG,
                 "--out", str(tmp_path / "b")]) == 0
    assert _samples(tmp_path / "b", 5, 64)["arr_0"].shape == (5, 64, 64, 3)
    assert len(list((tmp_path / "b" / "images").iterdir())) == 5
    assert _run(["--checkpoint", str(run), "--image-size", "128", "--latents-only",
                 "--out", str(tmp_path / "c")]) == 2
    assert "latent size 8" in capsys.readouterr().err

    pix = _train(tmp_path / "pix", model="DiffiT-tiny")            # latent family on digits
    assert _run(["--checkpoint", str(pix), "--steps", "ddim4", "--cfg-scale", "2", *IMG,
                 "--out", str(tmp_path / "d")]) == 0
    assert _samples(tmp_path / "d", 5)["arr_0"].shape == (5, 8, 8, 3)


def test_torchrun_shards_an_image_checkpoint(image_run, tmp_path, one_thread):
    """Two gloo ranks sample a trainer checkpoint with EDM's deterministic Heun sampler: the
    same images and labels, in the same order, as one process; rank 0 alone writes the files."""
    args = ["--checkpoint", str(image_run), "--num-samples", "5", "--batch-size", "2",
            "--seed", "4", "--no-progress"]
    assert _run([*args, "--out", str(tmp_path / "one")]) == 0
    r = _run_two_ranks([*args, "--out", str(tmp_path / "two")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("EMA weights") == 1 and "2 rank(s)" in r.stdout
    one, two = _samples(tmp_path / "one", 5), _samples(tmp_path / "two", 5)
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])
    # batches of other sizes may round a pixel the other way
    diff = np.abs(one["arr_0"].astype(int) - two["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99
    assert len(list((tmp_path / "two" / "images").iterdir())) == 5


def test_compile_mode_option_and_log_line(tmp_path, capsys, monkeypatch):
    """--compile on CPU (aot_eager): the default mode, the log says how CUDA graphs are asked
    for on CUDA; the graphs' mode where it cannot run (CPU) is a clear error, no traceback."""
    from diffit.accel import resolve_compile_mode

    assert resolve_compile_mode("auto", torch.device("cuda"), graphs_by_default=False) == (
        "default", "--compile-mode reduce-overhead to replay the blocks as CUDA graphs")
    monkeypatch.setattr("diffit.accel.COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    try:
        argv = [*TINY, "--latents-only", "--num-samples", "2", "--batch-size", "2",
                "--steps", "ddim2", "--out", str(tmp_path), "--compile"]
        assert _run(argv) == 0
        assert _run([*argv, "--compile-mode", "reduce-overhead"]) == 2
    finally:
        torch._dynamo.reset()
    cap = capsys.readouterr()
    assert ("diffit sample: runs the plain-PyTorch reference ops inside regional torch.compile "
            "(2 blocks, fullgraph, backend aot_eager; --compile)") in cap.out.splitlines()
    # issue 16: the first batch's time, which includes the compile, is stated
    first = [ln for ln in cap.out.splitlines() if ln.startswith("diffit sample: first batch ")]
    assert len(first) == 1 and first[0].endswith(
        " s (includes torch.compile of the blocks and kernel autotuning)"), first
    assert "compile_mode reduce-overhead (CUDA graphs) runs on CUDA" in cap.err


@pytest.mark.gpu
def test_gpu_cuda_graph_sampling_matches_the_default_mode(tmp_path):
    """--compile-mode reduce-overhead: each model call of the sampling loop replays the blocks
    as CUDA graphs (diffit.accel.mark_graph_steps); the latents match the default mode's on the
    card (the same kernels, replayed), guided DDIM over several steps and two batches."""
    outs = {}
    torch._dynamo.reset()
    try:
        for mode in ("default", "reduce-overhead"):
            d = tmp_path / mode
            argv = ["--random-init", "--model", "DiffiT-tiny", "--image-size", "128",
                    "--no-progress", "--latents-only", "--num-samples", "6", "--batch-size", "4",
                    "--steps", "ddim8", "--cfg-scale", "3", "--precision", "bf16", "--seed", "3",
                    "--device", "cuda", "--compile", "--compile-mode", mode, "--out", str(d),
                    "--backend", "triton"]  # both runs ours, not the timed choice
            assert _run(argv) == 0
            outs[mode] = np.load(next(d.glob("*.npz")))["arr_0"]
            torch._dynamo.reset()
    finally:
        torch._dynamo.reset()
    np.testing.assert_allclose(outs["reduce-overhead"], outs["default"], rtol=0, atol=2e-2)


@pytest.mark.interpreter
def test_backend_auto_times_the_sampler_and_samples_as_the_choice_fixed(
        tmp_path, capsys, trial_picks_ours):
    """--backend auto where both backends run (the interpreter's CPU standing in for a card):
    a short run of the command's own sampler is timed with each, the log names the choice, and
    the samples are those of that backend fixed, bit for bit (the trial drew its own noise)."""
    timed = trial_picks_ours
    argv = ["--random-init", "--model", "DiffiT-tiny", "--image-size", "64", "--no-progress",
            "--latents-only", "--num-samples", "2", "--batch-size", "2", "--steps", "ddim2",
            "--cfg-scale", "2", "--labels", "3,5"]
    assert _run([*argv, "--out", str(tmp_path / "auto")]) == 0
    assert _run([*argv, "--out", str(tmp_path / "fixed"), "--backend", "triton"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(timed) == 1 and sorted(timed[0]) == ["torch", "triton"], timed
    note = [ln for ln in out if ln.startswith("diffit sample: backend auto: ")]
    assert len(note) == 1 and note[0].startswith("diffit sample: backend auto: triton (triton ")
    assert "per sampler run (2 samples, --steps ddim2), timed over 1 runs after 1 warm-up on " \
        "cpu in " in note[0]
    runs = [ln for ln in out if ln.startswith("diffit sample: runs ")]
    assert runs == ["diffit sample: runs our fused Triton kernels, eager (no torch.compile: the "
                    "default on cpu (--compile to force))"] * 2
    auto, fixed = (np.load(next((tmp_path / d).glob("*.npz")))["arr_0"]
                   for d in ("auto", "fixed"))
    np.testing.assert_array_equal(auto, fixed)


@pytest.mark.gpu
def test_gpu_sample_backend_auto_times_both_on_the_card(tmp_path, capsys):
    """On a card, --backend auto (the default) times a short run of the sampler with our
    kernels and with the reference (eager here, to keep the test short) and samples with the
    faster; the log names both times."""
    argv = ["--random-init", "--model", "DiffiT-tiny", "--image-size", "128", "--no-progress",
            "--latents-only", "--num-samples", "4", "--batch-size", "4", "--steps", "ddim4",
            "--cfg-scale", "3", "--precision", "bf16", "--device", "cuda", "--no-compile",
            "--out", str(tmp_path)]
    assert _run(argv) == 0
    note = [ln for ln in capsys.readouterr().out.splitlines() if "backend auto: " in ln]
    assert len(note) == 1 and "triton" in note[0] and "torch" in note[0], note
    assert "failed" not in note[0], note  # both backends ran on the card
    assert np.isfinite(np.load(next(tmp_path.glob("*.npz")))["arr_0"]).all()
