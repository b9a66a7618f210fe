"""diffit.training.train: exact resume, checkpoint safety, EMA, configuration, DDP on CPU (gloo),
encode's messages. Everything runs tiny models for a handful of steps on CPU."""
import json
import math
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from diffit import cli
from diffit.training.ema import EMA
from diffit.training.train import (CheckpointError, TrainConfig, Trainer, config_from_args,
                                   latest_checkpoint, list_checkpoints, read_checkpoint, train)

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


@pytest.fixture(scope="module")
def latent_file(tmp_path_factory):
    """64 random 4x8x8 'latents' with 3 classes: enough for the ADM path of latent DiffiT."""
    path = tmp_path_factory.mktemp("latents") / "lat.pt"
    g = torch.Generator().manual_seed(0)
    torch.save({"latents": torch.randn(64, 4, 8, 8, generator=g),
                "labels": torch.arange(64) % 3}, path)
    return path


def _cfg(out, family="image", latent_file=None, **kw):
    base = dict(out=str(out), batch_size=8, steps=6, lr=1e-3, log_every=1, ckpt_every=0,
                num_samples=0, progress=False)
    if family == "image":
        base.update(model="tiny", data="digits", image_size=8)
    else:
        base.update(model="DiffiT-tiny", data="latents", data_path=str(latent_file))
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(Path(out) / "metrics.jsonl"))]


def _final(out):
    return read_checkpoint(latest_checkpoint(Path(out) / "checkpoints"))


# ---- EMA ------------------------------------------------------------------------------------
def test_ema_update_math():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9, warmup=False)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
        model[1].running_mean.add_(1.0)
    assert ema.update(model, step=0) == 0.9
    sd, cur = ema.module.state_dict(), model.state_dict()
    for name, p in model.named_parameters():
        torch.testing.assert_close(sd[name], 0.9 * before[name] + 0.1 * p.detach(),
                                   rtol=1e-6, atol=1e-7)
    assert torch.equal(sd["1.running_mean"], cur["1.running_mean"])        # buffers copied
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training

    warm = EMA(model, decay=0.9999, warmup=True)
    assert [warm.decay_at(s) for s in (0, 10, 10 ** 6)] == [0.1, 11 / 20, 0.9999]
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2)
    warm.update(model, step=0)                        # decay 0.1: mostly the new weights
    for name, p in model.named_parameters():
        torch.testing.assert_close(warm.module.state_dict()[name],
                                   0.1 * snapshot[name] + 0.9 * p.detach(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


# ---- exact resume ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["image", "latent"])
def test_resume_equals_uninterrupted_run(tmp_path, family, latent_file):
    straight = train(_cfg(tmp_path / "a", family, latent_file))
    assert straight["step"] == 6
    train(_cfg(tmp_path / "b", family, latent_file, steps=3))
    train(_cfg(tmp_path / "b", family, latent_file, steps=6), resume="auto")
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6]
    assert a == b                                     # per-step losses, bit for bit
    assert len({v for _, v in a}) > 1                 # they do change from step to step
    ca, cb = _final(tmp_path / "a"), _final(tmp_path / "b")
    for part in ("model", "ema"):
        assert ca[part].keys() == cb[part].keys()
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), (part, k)
    assert (ca["step"], ca["epoch"], ca["batch_in_epoch"]) == (cb["step"], cb["epoch"],
                                                                cb["batch_in_epoch"])


def test_resume_across_an_epoch_boundary(tmp_path, latent_file):
    # 64 latents / batch 24 = 2 batches per epoch: the run stops mid-epoch 1 and ends in epoch 2
    kw = dict(batch_size=24, steps=5)
    train(_cfg(tmp_path / "a", "latent", latent_file, **kw))
    train(_cfg(tmp_path / "b", "latent", latent_file, **{**kw, "steps": 3}))
    assert (_final(tmp_path / "b")["epoch"], _final(tmp_path / "b")["batch_in_epoch"]) == (1, 1)
    train(_cfg(tmp_path / "b", "latent", latent_file, **kw), resume="auto")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert (_final(tmp_path / "a")["epoch"], _final(tmp_path / "a")["batch_in_epoch"]) == (2, 1)


def test_augmented_training_resumes_exactly(tmp_path, latent_file):
    # EDM's augmentation draws from the global RNG the checkpoint saves: resuming replays it
    kw = dict(augment=0.5)
    train(_cfg(tmp_path / "a", **kw))
    train(_cfg(tmp_path / "b", **kw, steps=3))
    train(_cfg(tmp_path / "b", **kw), resume="auto")
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    ck = _final(tmp_path / "a")
    assert ck["model_config"]["augment_dim"] == 9 and "aug_embedder.weight" in ck["model"]
    assert not torch.equal(ck["model"]["aug_embedder.weight"],
                           torch.zeros_like(ck["model"]["aug_embedder.weight"]))
    with pytest.raises(ValueError, match="image-space presets only"):
        Trainer(_cfg(tmp_path / "lat", "latent", latent_file, **kw))
    with pytest.raises(ValueError, match="augment must be in"):
        _cfg(tmp_path / "x", augment=1.5).validate()


def test_checkpoint_from_before_a_setting_existed_resumes(tmp_path):
    # a checkpoint written before `augment` / `augment_dim` existed: missing = the default
    train(_cfg(tmp_path / "r", steps=2))
    path = latest_checkpoint(tmp_path / "r" / "checkpoints")
    ck = torch.load(path, weights_only=False)
    del ck["config"]["augment"], ck["model_config"]["augment_dim"]
    torch.save(ck, path)
    assert Trainer(_cfg(tmp_path / "r", steps=4), resume="auto").step == 2
    with pytest.raises(CheckpointError, match="augment_dim: 0 there vs 9 here"):
        Trainer(_cfg(tmp_path / "r", steps=4, augment=0.1), resume="auto")


# ---- checkpoint safety ----------------------------------------------------------------------
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    real_save, calls = torch.save, []

    def dying_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:                           # the step-2 checkpoint dies mid-write
            real_save(obj, f, *a, **kw)
            data = Path(f).read_bytes()
            Path(f).write_bytes(data[: len(data) // 2])
            raise OSError("simulated crash while writing the checkpoint")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    cfg = _cfg(tmp_path / "r", steps=4, ckpt_every=1, keep_checkpoints=1)
    with pytest.raises(OSError, match="simulated"):
        train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    ckdir = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ckdir.iterdir()) == ["ckpt_00000001.pt", "latest"]
    assert latest_checkpoint(ckdir).name == "ckpt_00000001.pt"
    assert read_checkpoint(ckdir / "ckpt_00000001.pt")["step"] == 1
    summary = train(cfg, resume="auto")                # and the run continues from it
    assert summary["step"] == 4 and [s for s, _ in _losses(tmp_path / "r")] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(ckdir)] == ["ckpt_00000004.pt"]


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    train(_cfg(tmp_path / "r", steps=2, ckpt_every=1, keep_checkpoints=2))
    ckdir = tmp_path / "r" / "checkpoints"
    newest = latest_checkpoint(ckdir)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError) as e:
        Trainer(_cfg(tmp_path / "r", steps=3), resume="auto")
    msg = str(e.value)
    assert "ckpt_00000002.pt" in msg and "cannot be read" in msg
    assert "ckpt_00000001.pt" in msg                  # it points at the earlier one
    assert (ckdir / "ckpt_00000001.pt").is_file() and newest.is_file()   # nothing deleted
    t = Trainer(_cfg(tmp_path / "r", steps=3), resume=str(ckdir / "ckpt_00000001.pt"))
    assert t.step == 1
    (ckdir / "latest").unlink()                       # a crash before the first pointer write
    assert latest_checkpoint(ckdir).name == "ckpt_00000002.pt"


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, capsys):
    train(_cfg(tmp_path / "r", steps=1))
    with pytest.raises(CheckpointError, match="channels"):
        Trainer(_cfg(tmp_path / "r", model_args={"channels": [8, 16]}), resume="auto")
    with pytest.raises(CheckpointError, match=r"lr=0\.001 there vs 0\.002 here"):
        Trainer(_cfg(tmp_path / "r", lr=2e-3), resume="auto")
    with pytest.raises(CheckpointError, match="not a diffit training checkpoint"):
        torch.save({"model": {}}, tmp_path / "other.pt")
        Trainer(_cfg(tmp_path / "r"), resume=str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="--resume"):  # never silently overwrite a run
        Trainer(_cfg(tmp_path / "r"))
    rc = cli.main(["train", "--model", "tiny", "--image-size", "8", "--out",
                   str(tmp_path / "r"), "--resume", "--lr", "0.5", "--no-progress"])
    assert rc == 2 and "different settings" in capsys.readouterr().err


# ---- configuration and schedule -------------------------------------------------------------
def test_config_file_flags_and_errors(tmp_path, capsys):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"model": "cifar10", "lr": 3e-4, "steps": 7,
                                    "model_args": {"dropout": 0.0}}))
    parser = cli.build_parser()
    cfg = config_from_args(parser.parse_args(["train", "--config", str(cfg_file),
                                              "--steps", "9", "--no-flip"]))
    assert (cfg.model, cfg.lr, cfg.steps, cfg.flip, cfg.batch_size) == ("cifar10", 3e-4, 9,
                                                                        False, 64)
    assert cfg.model_args == {"dropout": 0.0}
    assert cli.main(["train", "--config", str(cfg_file), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 7
    cfg_file.write_text(json.dumps({"modle": "tiny"}))
    assert cli.main(["train", "--config", str(cfg_file)]) == 2
    assert "unknown keys ['modle']" in capsys.readouterr().err
    assert cli.main(["train", "--model", "DiffiT-Q/3", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model preset 'DiffiT-Q/3'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.5).validate()
    for path in sorted((ROOT / "configs").glob("*.json")):   # shipped examples stay valid
        d = json.loads(path.read_text())
        d.pop("_comment", None)
        TrainConfig(**d).validate()


def test_lr_schedule(tmp_path):
    t = Trainer(_cfg(tmp_path / "r", lr=1.0, warmup_steps=4, steps=14, lr_schedule="cosine"))
    got = [t.lr_at(s) for s in (0, 3, 4, 9, 14)]
    assert got == pytest.approx([0.25, 1.0, 1.0, 0.5, 0.0], abs=1e-12)


@pytest.mark.parametrize("family", ["image", "latent"])
def test_grad_checkpointing_changes_nothing_but_memory(tmp_path, family, latent_file):
    train(_cfg(tmp_path / "a", family, latent_file, steps=2))
    train(_cfg(tmp_path / "b", family, latent_file, steps=2, grad_checkpointing=True))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    ca, cb = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert ca["model"].keys() == cb["model"].keys()
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-5, atol=1e-6)


def test_outputs_and_sample_grid(tmp_path):
    from PIL import Image

    s = train(_cfg(tmp_path / "r", steps=4, log_every=2, ckpt_every=2, sample_every=2,
                   num_samples=20, sample_steps=3))
    out = tmp_path / "r"
    assert {p.name for p in (out / "samples").iterdir()} == {"step_00000002.png",
                                                              "step_00000004.png"}
    grid = Image.open(out / "samples.png")
    # 20 samples of 10 classes: 10 columns x 2 rows of 64-px tiles (8 px upscaled 8x), 2-px gaps
    assert grid.size == (10 * 66 + 2, 2 * 66 + 2) and grid.mode == "L"
    assert Image.open(out / "loss.png").size[0] > 100
    assert json.loads((out / "config.json").read_text())["steps"] == 4
    rec = [json.loads(x) for x in open(out / "metrics.jsonl")]
    losses = [r for r in rec if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4] and all(r["images_per_s"] > 0 for r in losses)
    assert s["checkpoint"].name == "ckpt_00000004.pt"
    # digits, class-conditional: each grid's quality follows it, rated for the grid's labels
    quality = [r for r in rec if "digits_quality" in r]
    assert [r["step"] for r in quality] == [2, 4] and len(rec) == 4
    q = quality[-1]["digits_quality"]
    assert q["num_samples"] == 20 and 0 <= q["accuracy"] <= 1 and q["frechet_distance"] > 0
    assert len(q["accuracy_per_class"]) == 10 and q["reference"]["accuracy"] > 0.9


def test_no_digits_quality_without_labels(tmp_path):
    train(_cfg(tmp_path / "r", steps=1, num_samples=4, sample_steps=2, class_cond=False))
    rec = [json.loads(x) for x in open(tmp_path / "r" / "metrics.jsonl")]
    assert [sorted(r) for r in rec if "digits_quality" in r] == [] and len(rec) == 1


def test_latent_guided_sample_grid_and_sample_cli(tmp_path, latent_file):
    from PIL import Image

    train(_cfg(tmp_path / "r", "latent", latent_file, steps=2, num_samples=6, sample_steps=3,
               guidance=2.0))
    grid = Image.open(tmp_path / "r" / "samples.png")
    # 6 guided samples of 3 classes, latent channels 0-2 shown as RGB, 8 px upscaled 8x
    assert grid.size == (3 * 66 + 2, 2 * 66 + 2) and grid.mode == "RGB"
    # the checkpoint's EMA weights load into `python -m diffit sample`
    ck = latest_checkpoint(tmp_path / "r" / "checkpoints")
    assert cli.main(["sample", "--checkpoint", str(ck), "--image-size", "64", "--latents-only",
                     "--num-samples", "2", "--steps", "ddim2", "--out", str(tmp_path / "s"),
                     "--no-progress"]) == 0
    with pytest.raises(ValueError, match="guidance"):
        Trainer(_cfg(tmp_path / "u", "latent", latent_file, class_cond=False, guidance=2.0))


# ---- distributed ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    t = Trainer(_cfg(out, steps=3, batch_size=16, log_every=1, ckpt_every=0))
    init = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.fit()
    torch.save({"init": init, "model": t.model.state_dict(), "ema": t.ema.module.state_dict()},
               Path(result_dir) / f"rank{rank}.pt")
    t.close()  # the group's end: every rank leaves together (state.shut_down)


def test_ddp_two_processes_gloo_identical_parameters(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "run"), str(tmp_path)),
             nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("init", "model", "ema"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    assert any(not torch.equal(r0["init"][k], r0["model"][k]) for k in r0["model"])
    ck = _final(tmp_path / "run")                     # rank 0 wrote the checkpoint
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])   # per-rank streams
    assert [s for s, _ in _losses(tmp_path / "run")] == [1, 2, 3]


def _trial_worker(rank, world, port, result_dir):
    import time

    import torch.distributed as dist

    from diffit import accel
    from diffit.latent import DiffiT, preset_config
    from diffit.training.state import DistInfo, shut_down

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, backend="torch"))
    ms = {"triton": 1 if rank == 0 else 30, "torch": 8}  # ours: fast on rank 0 only

    def step():
        time.sleep(ms[model.backend] / 1e3)

    got = accel.choose_backend(step, [model], ("triton", "torch"), torch.device("cpu"), world)
    # the kernel check failing on rank 1 only: no rank times ours
    accel.check_kernels = lambda probe, modules: "wrong on rank 1" if rank == 1 else None
    ran = []
    checked = accel.choose_backend(lambda: ran.append(model.backend), [model],
                                   ("triton", "torch"), torch.device("cpu"), world,
                                   probe=lambda: None)
    torch.save({"chosen": got[0], "ms": got[1], "set": model.backend, "ran": sorted(set(ran)),
                "checked": checked[:2]}, Path(result_dir) / f"trial{rank}.pt")
    shut_down(DistInfo(rank, world, rank, torch.device("cpu"), True))


def test_backend_trial_ranks_agree_gloo(tmp_path):
    """choose_backend under two gloo ranks: every rank's times are gathered, a backend counts
    at its slowest rank, so both ranks choose the reference although rank 0 alone timed ours
    faster, and both set it. A kernel check that fails on one rank leaves ours out on every
    rank before any timing (under FSDP a rank timing ours alone would wait in its collectives)."""
    import torch.multiprocessing as mp

    mp.spawn(_trial_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"trial{r}.pt", weights_only=True) for r in (0, 1))
    assert r0 == r1 and r0["chosen"] == "torch", r0
    assert r0["ms"]["triton"] >= 30 > r0["ms"]["torch"] >= 8, r0
    assert r0["ran"] == ["torch"] and r0["set"] == "torch", r0
    assert r0["checked"][0] == "torch" and r0["checked"][1]["triton"] == "wrong on rank 1", r0


def test_ranks_leave_together_once_every_rank_destroyed_its_groups():
    """state.leave_together: a rank returns only once every rank has counted in at the store
    (or the wait times out, or the store fails: a finished run never fails at its exit)."""
    import threading
    import time

    import torch.distributed as dist

    from diffit.training.state import leave_together

    store = dist.HashStore()
    done = []
    first = threading.Thread(target=lambda: done.append(leave_together(store, 2, "k")))
    first.start()
    time.sleep(0.3)
    assert not done and first.is_alive()            # waits for the other rank
    assert leave_together(store, 2, "k") is True
    first.join(5)
    assert done == [True]
    t0 = time.monotonic()
    assert leave_together(dist.HashStore(), 2, "alone", timeout_s=0.2) is False
    assert time.monotonic() - t0 < 5

    class Gone:
        def add(self, key, n):
            raise RuntimeError("Connection reset by peer")
    assert leave_together(Gone(), 2, "k") is False


def test_shut_down_destroys_the_groups_then_leaves_together(monkeypatch):
    import torch.distributed as dist

    from diffit.training import state

    calls = []
    store = object()
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist.distributed_c10d, "_get_default_store",
                        lambda: calls.append("store") or store)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(state, "leave_together",
                        lambda s, world, key: calls.append(("leave", s is store, world, key)))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "2")
    state.shut_down(state.DistInfo(1, 4, 1, torch.device("cpu"), True))
    assert calls == ["barrier", "store", "destroy", ("leave", True, 4, "diffit/left/2")]


@pytest.mark.slow
def test_torchrun_cli_gloo(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port", str(_free_port()), "-m", "diffit", "train", "--model", "tiny",
           "--image-size", "8", "--batch-size", "16", "--steps", "4", "--log-every", "2",
           "--ckpt-every", "2", "--num-samples", "10", "--sample-steps", "2", "--no-progress",
           "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "world 2 on cpu (DDP)" in r.stdout
    ck = _final(out)
    assert ck["step"] == 4 and ck["world_size"] == 2
    assert (out / "samples.png").is_file() and (out / "loss.png").is_file()


# ---- encode ---------------------------------------------------------------------------------
def _folder(tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a.png")
    return tmp_path / "imgs"


def test_encode_says_what_is_missing(tmp_path, capsys, monkeypatch):
    imgs = _folder(tmp_path)
    argv = ["encode", "--data-path", str(imgs), "--out", str(tmp_path / "l.pt"),
            "--image-size", "16", "--num-workers", "0", "--no-progress"]
    monkeypatch.setitem(sys.modules, "diffusers", None)            # import fails
    monkeypatch.setitem(sys.modules, "diffusers.models", None)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "diffusers" in err and "pip install" in err

    def unreachable(name, *a, **kw):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}")

    fake = types.ModuleType("diffusers")
    fake.models = types.ModuleType("diffusers.models")
    fake.models.AutoencoderKL = types.SimpleNamespace(from_pretrained=unreachable)
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    monkeypatch.setitem(sys.modules, "diffusers.models", fake.models)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "could not load the VAE 'stabilityai/sd-vae-ft-ema'" in err
    assert "couldn't connect" in err and "--vae" in err
    assert not (tmp_path / "l.pt").exists()
    assert cli.main([*argv[:-3], "--image-size", "12"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_encode_with_a_stand_in_vae(tmp_path, monkeypatch):
    """The file layout `train --data latents` reads, with a stand-in for diffusers' VAE."""
    imgs = _folder(tmp_path)

    class Dist:
        def __init__(self, x):
            self.mean = torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)[:, :4] + 1

        def sample(self, generator=None):
            return self.mean

    class VAE(torch.nn.Module):
        def encode(self, x):
            return types.SimpleNamespace(latent_dist=Dist(x))

    fake = types.ModuleType("diffusers")
    fake.models = types.ModuleType("diffusers.models")
    fake.models.AutoencoderKL = types.SimpleNamespace(from_pretrained=lambda name: VAE())
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    monkeypatch.setitem(sys.modules, "diffusers.models", fake.models)
    out = tmp_path / "l.pt"
    assert cli.main(["encode", "--data-path", str(imgs), "--out", str(out), "--image-size",
                     "16", "--num-workers", "0", "--no-progress", "--flip"]) == 0
    d = torch.load(out, weights_only=True)
    assert d["latents"].shape == (2, 4, 2, 2) and d["labels"].tolist() == [0, 0]
    # black image -> -1 everywhere -> pooled -1 + 1 = 0, times the SD scale
    assert torch.equal(d["latents"], torch.zeros(2, 4, 2, 2, dtype=torch.float16))
    assert d["scale"] == 0.18215
    from diffit.training.data import LatentDataset
    assert LatentDataset(out).image_size == 2


def test_image_folder_training_rgb(tmp_path):
    import numpy as np
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            arr = np.random.default_rng(i).integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / c / f"{i}.png")
    t = Trainer(_cfg(tmp_path / "r", data="folder", data_path=str(tmp_path / "imgs"),
                     channels=3, batch_size=4, steps=2, num_samples=2, sample_steps=2))
    assert t.model.config.in_channels == 3 and t.model.config.num_classes == 2
    assert t.dataset.flip                              # folders flip by default
    t.fit()
    assert Image.open(tmp_path / "r" / "samples.png").mode == "RGB"


# ---- what the run shows, and how it runs ----------------------------------------------------
def test_progress_off_a_terminal_prints_lines_not_redraws(tmp_path, capsys):
    """stdout is not a tty here (pytest captures it): no tqdm bar, no carriage returns; plain
    lines, the metrics every log_every steps and a short progress line when none came for
    `every_s` seconds."""
    import io

    from diffit.training.feedback import Progress

    now = [0.0]
    out = io.StringIO()
    p = Progress(10, 0, bar=True, every_s=30.0, stream=out, clock=lambda: now[0])
    assert not p.interactive
    for step, t in ((1, 10.0), (2, 31.0), (4, 50.0), (5, 75.0)):
        now[0] = t
        p.update(step)
    now[0] = 80.0
    p.metrics("step 6/10 loss 1.0000", loss="1.0000")
    now[0] = 100.0
    p.update(7)                                    # 20 s after the metrics line: quiet
    p.close()
    assert out.getvalue().splitlines() == [
        "train: step 2/10 (20%), 0m31s elapsed, ~2m04s left",
        "train: step 5/10 (50%), 1m15s elapsed, ~1m15s left",
        "step 6/10 loss 1.0000"]
    quiet = io.StringIO()
    q = Progress(10, 0, bar=False, every_s=0.0, stream=quiet, clock=lambda: now[0])
    q.update(1)
    q.metrics("step 1/10 loss 2.0")
    assert quiet.getvalue() == "step 1/10 loss 2.0\n"      # --no-progress: metrics only

    train(_cfg(tmp_path, steps=4, log_every=2, progress=True))
    cap = capsys.readouterr()
    assert "\r" not in cap.out + cap.err
    lines = cap.out.splitlines()
    assert any(ln.startswith("step 2/4 loss") for ln in lines)
    assert any(ln.startswith("step 4/4 loss") for ln in lines)
    assert any(ln.startswith("diffit train: first step ") for ln in lines)
    assert ("diffit train: runs the plain-PyTorch reference ops, eager (no torch.compile: the "
            "default on cpu (--compile to force))") in lines


def test_compile_is_the_default_on_cuda_only():
    from diffit.accel import resolve_compile

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_compile(None, cuda) == (True, "the default on CUDA (--no-compile to opt out)")
    assert resolve_compile(None, cpu)[0] is False
    assert resolve_compile(None, cuda, fsdp=True)[0] is False
    assert resolve_compile(False, cuda) == (False, "--no-compile")
    assert resolve_compile(True, cpu) == (True, "--compile")
    p = cli.build_parser()
    assert config_from_args(p.parse_args(["train"])).compile is None
    assert config_from_args(p.parse_args(["train", "--no-compile"])).compile is False
    assert config_from_args(p.parse_args(["train", "--compile"])).compile is True


def test_cuda_graphs_are_the_default_where_they_run():
    """--compile-mode auto (the default): CUDA graphs on CUDA in one process without gradient
    checkpointing, else the default mode with the reason in the log line; an explicit
    reduce-overhead where it cannot run is an error naming why."""
    from diffit.accel import describe_run, resolve_compile_mode

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    mode, why = resolve_compile_mode("auto", cuda)
    assert mode == "reduce-overhead" and "--compile-mode default to opt out" in why
    assert resolve_compile_mode("auto", cuda, world=8) == (
        "default", "no CUDA graphs with 8 processes")
    assert resolve_compile_mode("auto", cuda, grad_checkpointing=True) == (
        "default", "no CUDA graphs with gradient checkpointing")
    assert resolve_compile_mode("auto", cpu) == ("default", "")
    assert resolve_compile_mode("default", cuda) == ("default", "")
    assert resolve_compile_mode("reduce-overhead", cuda) == ("reduce-overhead", "")
    for kw in (dict(world=2), dict(grad_checkpointing=True)):
        with pytest.raises(ValueError, match="reduce-overhead .* not with"):
            resolve_compile_mode("reduce-overhead", cuda, **kw)
    with pytest.raises(ValueError, match="not with the cpu device"):
        resolve_compile_mode("reduce-overhead", cpu)
    with pytest.raises(ValueError, match="compile mode must be one of"):
        resolve_compile_mode("max-autotune", cuda)
    line = describe_run("torch", cpu, True, "--compile", 28, mode, why)
    assert line.endswith("(28 blocks, fullgraph, backend inductor, mode reduce-overhead (CUDA "
                         "graphs, the default in one process on CUDA; --compile-mode default to "
                         "opt out); --compile)"), line
    p = cli.build_parser()
    assert config_from_args(p.parse_args(["train"])).compile_mode == "auto"
    assert config_from_args(p.parse_args(["train", "--compile-mode", "default"])).compile_mode \
        == "default"


def test_compiled_blocks_train_like_eager(tmp_path, latent_file, monkeypatch, capsys):
    """--compile (the CUDA default) on CPU with the aot_eager backend: the blocks are compiled in
    place, the log says so, the losses follow the eager run's, and checkpoints keep the
    official keys (no `_orig_mod.` prefix)."""
    monkeypatch.setattr("diffit.accel.COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    try:
        train(_cfg(tmp_path / "eager", "latent", latent_file, steps=3))
        train(_cfg(tmp_path / "comp", "latent", latent_file, steps=3, compile=True))
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out
    assert ("diffit train: runs the plain-PyTorch reference ops inside regional torch.compile "
            "(2 blocks, fullgraph, backend aot_eager; --compile)") in out.splitlines()
    assert "includes torch.compile of the blocks" in out
    eager, comp = _losses(tmp_path / "eager"), _losses(tmp_path / "comp")
    assert [s for s, _ in eager] == [s for s, _ in comp] == [1, 2, 3]
    torch.testing.assert_close([v for _, v in comp], [v for _, v in eager], rtol=1e-5, atol=0)
    assert _final(tmp_path / "comp")["model"].keys() == _final(tmp_path / "eager")["model"].keys()


@pytest.mark.gpu
def test_gpu_cuda_graph_mode_trains_like_the_default(tmp_path, capsys):
    """The default --compile-mode auto (here: reduce-overhead, every block replayed as a CUDA
    graph) against --compile-mode default, on the card: the same losses within rounding over
    a few steps of a U-Net with windowed and global attention on the fused kernels (their
    cached launch plans and autotuning must survive the graphs' memory pool)."""
    kw = dict(batch_size=16, steps=4, compile=True, backend="triton",  # not timed: ours
              model_args={"head_dim": 16})
    torch._dynamo.reset()
    try:
        train(_cfg(tmp_path / "default", compile_mode="default", **kw))
        torch._dynamo.reset()
        train(_cfg(tmp_path / "graphs", **kw))  # auto: the graphs, as users get them
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out
    assert "our fused Triton kernels inside regional torch.compile (4 blocks, fullgraph, " \
           "backend inductor, mode reduce-overhead (CUDA graphs, the default in one process " \
           "on CUDA; --compile-mode default to opt out); --compile)" in out
    default, graphs = _losses(tmp_path / "default"), _losses(tmp_path / "graphs")
    assert [s for s, _ in graphs] == [1, 2, 3, 4]
    torch.testing.assert_close([v for _, v in graphs], [v for _, v in default], rtol=2e-3,
                               atol=0)


# ---- backend "auto": the faster of ours and the reference, timed on the run's step ----------
def test_backend_trial_times_each_backend_on_the_model():
    """time_backends: each backend set on every layer of ours in turn (model and EMA copy),
    warm-up steps untimed, the median of the timed ones in ms; a backend whose step raises is
    left out with the error's text and the next one still runs."""
    from diffit import accel
    from diffit.latent import DiffiT, preset_config

    model = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, backend="torch"))
    ema = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, backend="torch"))
    ours = [m for m in (*model.modules(), *ema.modules()) if hasattr(m, "backend")]
    assert len(ours) > 4
    now, seen, cost = [0.0], [], {"triton": [5.0, 1.0, 2.0, 9.0], "torch": [3.0] * 4}

    def step():
        b = ours[0].backend
        assert all(m.backend == b for m in ours)
        seen.append(b)
        if b == fail:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (stand-in)")
        now[0] += cost[b][sum(s == b for s in seen) - 1]

    for fail in (None, "triton"):
        seen.clear()
        got = accel.time_backends(step, (model, ema), ("triton", "torch"), torch.device("cpu"),
                                  warmup=1, steps=3, clock=lambda: now[0])
        if fail is None:
            assert got == {"triton": 2000.0, "torch": 3000.0}      # medians of 1, 2, 9 / 3s
            assert seen == ["triton"] * 4 + ["torch"] * 4
        else:
            assert got["torch"] == 3000.0 and seen == ["triton"] + ["torch"] * 4
            assert got["triton"] == "OutOfMemoryError: CUDA out of memory (stand-in)"
    assert all(m.backend == "torch" for m in ours)
    accel.set_backend((model, ema), "triton")
    assert all(m.backend == "triton" for m in ours)
    # a block whose class FSDP's fully_shard replaced by a subclass defined elsewhere
    blk = model.blocks[0]
    blk.__class__ = type(f"FSDP{type(blk).__name__}", (type(blk),), {"__module__": "fsdp"})
    accel.set_backend([model], "torch")
    assert blk.backend == "torch"


def test_backend_trial_first_steps_are_compared_with_the_reference():
    """time_backends hands each backend's first step output to check_outputs (start() before
    it); ours is left out when that output is non-finite or further than rtol from the
    reference's (relative L2), with a message asking for a report; nothing is judged without a
    finite reference value, and a backend already failed keeps its error."""
    from diffit import accel

    model = torch.nn.Linear(2, 2)
    order, calls = [], []
    first = {"triton": torch.tensor([1.0, 2.0]), "torch": torch.ones(2)}

    def step():  # each backend's first step returns first[backend], later ones zeros
        calls.append(order[-1])
        return first[order[-1]] if calls.count(order[-1]) == 1 else torch.zeros(2)

    outputs = {}
    accel.time_backends(step, [model], ("triton", "torch"), torch.device("cpu"), warmup=2,
                        steps=1, start=order.append, outputs=outputs)
    assert order == ["triton", "torch"]
    assert torch.equal(outputs["triton"], torch.tensor([1.0, 2.0]))
    assert torch.equal(outputs["torch"], torch.ones(2))

    def check(ours, ref, rtol=accel.TRIAL_RTOL, res=None):
        results = res or {"triton": 1.0, "torch": 2.0}
        accel.check_outputs(results, {"triton": torch.tensor(ours), "torch": torch.tensor(ref)},
                            rtol=rtol)
        return results["triton"]

    assert check([1.0, 2.0], [1.05, 2.0]) == 1.0                      # rounding: kept
    left = check([1.3, 2.0], [1.0, 2.0])
    assert left == ("its first step gave a relative difference of 0.134 (more than 0.1) "
                    "against the torch backend on the same inputs: a wrong result on this "
                    "card, please report it")
    assert check([float("nan"), 2.0], [1.0, 2.0]).startswith(
        "its first step gave non-finite values against the torch backend")
    assert check([5.0, 2.0], [float("inf"), 2.0]) == 1.0              # no reference to judge by
    assert check([5.0, 2.0], [1.0, 2.0], rtol=None) == 1.0            # finiteness only
    assert check([float("nan")], [1.0], rtol=None).startswith("its first step gave non-finite")
    assert check([5.0], [1.0], res={"triton": "OutOfMemoryError: x", "torch": 1.0}) \
        == "OutOfMemoryError: x"


def test_backend_trial_every_rank_agrees():
    """pick_fastest: a backend is as fast as its slowest rank and out if it failed on any; ties
    go to the first (ours); every backend failed is an error naming each failure."""
    from diffit import accel

    assert accel.pick_fastest([{"triton": 5.0, "torch": 4.0}, {"triton": 5.5, "torch": 6.0}]) \
        == ("triton", {"triton": 5.5, "torch": 6.0})
    assert accel.pick_fastest([{"triton": "OutOfMemoryError: x", "torch": 9.0},
                               {"triton": 1.0, "torch": 8.0}]) \
        == ("torch", {"triton": "OutOfMemoryError: x", "torch": 9.0})
    assert accel.pick_fastest([{"triton": 5.0, "torch": 5.0}])[0] == "triton"
    with pytest.raises(RuntimeError, match="no backend ran the timed step: triton: A; "
                                           "torch: B"):
        accel.pick_fastest([{"triton": "A", "torch": 1.0}, {"triton": 1.0, "torch": "B"}])
    line = accel.describe_choice("torch", {"triton": 80.34, "torch": 75.06}, "timed over it")
    assert line == ("backend auto: torch (torch 75.1 ms, triton 80.3 ms per forward + backward, "
                    "timed over it; --backend triton or torch to fix it)")
    line = accel.describe_choice("torch", {"triton": "OutOfMemoryError: x", "torch": 7.0}, "t")
    assert "torch 7.0 ms, triton failed (OutOfMemoryError: x) per" in line


def test_backend_auto_times_only_where_both_run(monkeypatch):
    """Nothing is timed for a fixed backend, off TRIAL_DEVICES, or where Triton cannot run
    (a CPU without TRITON_INTERPRET): the trainer then runs as before, no trial."""
    from diffit import accel

    cpu = torch.device("cpu")
    assert accel.backends_to_time("auto", cpu) == ()
    monkeypatch.setattr(accel, "TRIAL_DEVICES", ("cuda", "cpu"))
    assert accel.backends_to_time("triton", cpu) == accel.backends_to_time("torch", cpu) == ()
    assert accel.backends_to_time("auto", cpu) == ()  # this process: no interpreter


@pytest.mark.interpreter
def test_backend_trial_leaves_out_kernels_that_compute_the_wrong_thing(monkeypatch):
    """choose_backend on a model whose attention is made wrong on the Triton path only (its
    output doubled): the first step's loss differs from the reference's on the same inputs, so
    ours is left out with a message and the reference is chosen, however fast ours timed."""
    import diffit.layers as layers
    from diffit import accel
    from diffit.latent import DiffiT, preset_config

    real = layers.tmsa_attention

    def doubled(*args, backend="auto", **kwargs):
        out = real(*args, backend=backend, **kwargs)
        return out * 2 if backend == "triton" else out

    monkeypatch.setattr(layers, "tmsa_attention", doubled)
    monkeypatch.setattr(accel, "TRIAL_WARMUP", 1)
    monkeypatch.setattr(accel, "TRIAL_STEPS", 1)
    model = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, num_classes=10))
    with torch.no_grad():  # as trained: at its zero-initialised start the output ignores the
        for prm in model.parameters():  # attention (adaLN-zero gates, zero final layer)
            prm.add_(torch.randn_like(prm) * 0.05)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([321, 7]), torch.tensor([4, 1])

    def step():
        loss = model(x, t, y).square().mean()
        loss.backward()
        return loss.detach()

    chosen, merged, _ = accel.choose_backend(step, [model], ("triton", "torch"),
                                             torch.device("cpu"))
    assert chosen == "torch" and isinstance(merged["torch"], float)
    assert merged["triton"].startswith("its first step gave a relative difference of "), merged
    assert model.blocks[0].attn.backend == "torch"


def test_kernel_check_errors():
    """An error in the probe leaves ours out with its text; running out of memory is no
    evidence against the kernels: a warning, and ours stays in."""
    from diffit import accel

    def fails(err):
        def probe():
            raise err
        return probe

    assert accel.check_kernels(fails(RuntimeError("no kernel image")), []) == (
        "RuntimeError: no kernel image")
    with pytest.warns(RuntimeWarning, match="the kernel check ran out of memory and was "
                      "skipped .our kernels stay in the trial.: CUDA out of memory"):
        assert accel.check_kernels(fails(torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB")), []) is None


def test_kernel_check_probe_runs_compiled_code_eagerly():
    """The kernel check's probe runs compiled blocks as plain eager code: nothing compiles for
    its batch (and our ops' calls are seen, which tracing would hide); the next real
    call compiles as before."""
    from torch._dynamo.utils import counters

    from diffit import accel

    torch._dynamo.reset()
    counters.clear()
    f = torch.compile(torch.nn.Linear(4, 4), backend="eager")
    with accel._eager_stance():
        f(torch.randn(2, 4))
    assert counters["stats"]["unique_graphs"] == 0
    f(torch.randn(2, 4))
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


@pytest.mark.interpreter
def test_kernel_check_sees_the_calls_inside_compiled_blocks(monkeypatch):
    """Blocks compiled in place (as the commands compile them): the probe runs them eagerly,
    so the check sees and checks every call of our ops in them, and nothing compiles until
    the next real call."""
    from torch._dynamo.utils import counters

    from diffit import accel
    from diffit.latent import DiffiT, preset_config
    from diffit_kernels import testing

    torch._dynamo.reset()
    counters.clear()
    model = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, num_classes=10))
    accel.compile_blocks(model, backend="aot_eager")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([321, 7]), torch.tensor([4, 1])
    checked = []
    real = testing.check_call
    monkeypatch.setattr(testing, "check_call",
                        lambda c, *a, **k: checked.append(c.op) or real(c, *a, **k))
    try:
        assert accel.check_kernels(lambda: model(x, t, y), [model]) is None
        assert {"tmsa_attention", "time_qkv", "adaln_norm"} <= set(checked)
        assert counters["stats"]["unique_graphs"] == 0
        model(x, t, y)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


@pytest.mark.interpreter
def test_kernel_check_leaves_out_a_wrong_kernel_at_a_fresh_start(monkeypatch):
    """At a DiffiT-style fresh start (adaLN-zero gates, zero final layer) the loss ignores the
    blocks, so comparing the first steps' losses cannot see a wrong attention kernel; the
    kernel check can: choose_backend with a probe (the model's forward on its batch) checks
    each call of our ops in it against the reference and leaves ours out, naming the op, the
    shapes and the tensor. Here the Triton forward's output is doubled (its backward then
    sees the doubled output too), as a miscompile on a card would make it."""
    from diffit import accel
    from diffit.latent import DiffiT, preset_config
    from diffit_kernels import attention

    real = attention._tmsa_attention_fwd
    monkeypatch.setattr(attention, "_tmsa_attention_fwd",
                        lambda *a: (lambda o, lse: (o * 2, lse))(*real(*a)))
    monkeypatch.setattr(accel, "TRIAL_WARMUP", 1)
    monkeypatch.setattr(accel, "TRIAL_STEPS", 1)
    model = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, num_classes=10))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([321, 7]), torch.tensor([4, 1])

    def step():
        loss = model(x, t, y).square().mean()
        loss.backward()
        return loss.detach()

    args = (step, [model], ("triton", "torch"), torch.device("cpu"))
    _, blind, _ = accel.choose_backend(*args)
    assert isinstance(blind["triton"], float)  # the losses agree: the blocks do not count yet
    chosen, merged, _ = accel.choose_backend(*args, probe=lambda: model(x, t, y))
    assert chosen == "torch" and isinstance(merged["torch"], float)
    why = merged["triton"]
    assert why.startswith("its tmsa_attention at this run's shapes (q [2, 4, 16, 16] float32 "
                          "strides (3072, 16, 192, 1), "), why
    assert " gave o " in why and why.endswith(" (float32): a wrong result on this card, please "
                                              "report it")
    assert model.blocks[0].attn.backend == "torch"


@pytest.mark.interpreter
def test_trainer_trial_checks_the_kernels_on_its_own_calls(tmp_path, latent_file, monkeypatch,
                                                           capsys, trial_picks_ours):
    """The trainer's trial hands choose_backend a probe (its loss's forward on the first
    samples of its batch): a fresh run whose Triton attention is wrong trains on the reference
    and its log line says why."""
    from diffit_kernels import attention

    real = attention._tmsa_attention_fwd
    monkeypatch.setattr(attention, "_tmsa_attention_fwd",
                        lambda *a: (lambda o, lse: (o * 2, lse))(*real(*a)))
    train(_cfg(tmp_path / "run", "latent", latent_file, steps=1))
    note = [ln for ln in capsys.readouterr().out.splitlines() if "backend auto: " in ln]
    assert len(note) == 1 and note[0].startswith("diffit train: backend auto: torch (torch ")
    assert ", triton failed (its tmsa_attention at this run's shapes (q [" in note[0], note
    assert _final(tmp_path / "run")["backend_choice"]["backend"] == "torch"


@pytest.mark.interpreter
def test_trainer_trial_kernel_check_passes_on_the_image_family(tmp_path, capsys, monkeypatch,
                                                                trial_picks_ours):
    """The image-space family's trial probe (EDM's loss with its labelled augmentation on 4
    samples, the U-Net's windows): correct kernels pass the kernel check, so ours is chosen
    (the timing itself stubbed: the interpreter's U-Net steps take half a minute)."""
    from diffit import accel

    checked = []
    real = accel.check_kernels
    monkeypatch.setattr(accel, "check_kernels", lambda *a: checked.append(real(*a)) or
                        checked[-1])
    monkeypatch.setattr(accel, "time_backends", lambda step, modules, candidates, *a, **k:
                        {b: 1.0 for b in candidates})
    train(_cfg(tmp_path / "img", steps=1, augment=0.5, batch_size=4))
    assert checked == [None]
    note = [ln for ln in capsys.readouterr().out.splitlines() if "backend auto: " in ln]
    assert len(note) == 1 and note[0].startswith("diffit train: backend auto: triton ("), note


@pytest.mark.interpreter
@pytest.mark.parametrize("family", ["latent", "unet"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_kernel_check_passes_correct_kernels(family, amp):
    """The kernel check finds nothing wrong with correct kernels on the models' own calls
    (global attention on the latent grid, windows in the U-Net; float32 and bf16 autocast,
    whose float32 residual stream and tables stay float32), weights perturbed as trained."""
    from diffit import accel
    from diffit.latent import DiffiT, preset_config
    from diffit.unet import DiffiTUNet
    from diffit_kernels import testing

    torch.manual_seed(0)
    if family == "latent":
        model = DiffiT(config=preset_config("DiffiT-tiny", input_size=8, num_classes=10))
        inputs = (torch.randn(2, 4, 8, 8), torch.tensor([321, 7]), torch.tensor([4, 1]))
    else:
        model = DiffiTUNet.from_preset("tiny")
        size = model.config.image_size
        inputs = (torch.randn(2, model.config.in_channels, size, size), torch.rand(2))
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.05)

    def probe():
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            return model(*inputs)

    assert accel.check_kernels(probe, [model]) is None
    with testing.record_calls() as calls, torch.enable_grad():
        probe()
    assert {c.op for c in calls} == {"tmsa_attention", "time_qkv", "adaln_norm"} or (
        family == "unet" and {c.op for c in calls} >= {"tmsa_attention", "time_qkv"})
    assert all(c.grads for c in calls)


@pytest.mark.interpreter
def test_backend_auto_picks_by_timing_and_changes_nothing_else(
        tmp_path, latent_file, monkeypatch, capsys, trial_picks_ours):
    """Backend auto where both backends run (here the interpreter's CPU, which stands in for a
    card): the trial times a step with each, the log says which runs and why, and the run
    trains exactly as one with that backend fixed (same losses and weights, bit for bit: the
    trial moved no data, no random state, no optimizer state). The checkpoint keeps the choice
    and a resumed run takes it without timing again."""
    from diffit import accel

    timed = trial_picks_ours
    train(_cfg(tmp_path / "auto", "latent", latent_file, steps=2))
    train(_cfg(tmp_path / "fixed", "latent", latent_file, steps=2, backend="triton"))
    out = capsys.readouterr().out.splitlines()
    assert len(timed) == 1 and sorted(timed[0]) == ["torch", "triton"]
    assert all(isinstance(v, float) and v > 0 for v in timed[0].values())
    note = [ln for ln in out if ln.startswith("diffit train: backend auto: ")]
    assert len(note) == 1 and note[0].startswith("diffit train: backend auto: triton (triton ")
    assert "timed over 1 steps after 1 warm-up on cpu in " in note[0]
    runs = [ln for ln in out if ln.startswith("diffit train: runs ")]
    assert runs == ["diffit train: runs our fused Triton kernels, eager (no torch.compile: the "
                    "default on cpu (--compile to force))"] * 2
    assert _losses(tmp_path / "auto") == _losses(tmp_path / "fixed")
    auto, fixed = _final(tmp_path / "auto"), _final(tmp_path / "fixed")
    for key in ("model", "ema"):
        for name, v in fixed[key].items():
            assert torch.equal(auto[key][name], v), (key, name)
    assert auto["backend_choice"] == {"backend": "triton", "ms": timed[0], "device": "cpu"}
    assert "backend_choice" not in fixed

    def timed_again(*a, **k):
        raise AssertionError("a resumed run timed the backends again")

    monkeypatch.setattr(accel, "time_backends", timed_again)
    train(_cfg(tmp_path / "auto", "latent", latent_file, steps=3), resume="latest")
    note = [ln for ln in capsys.readouterr().out.splitlines() if "backend auto: " in ln]
    assert len(note) == 1 and note[0].startswith("diffit train: backend auto: triton (")
    assert "the choice of the run's checkpoint, timed on cpu;" in note[0]


@pytest.mark.gpu
def test_gpu_backend_auto_times_both_on_the_card(tmp_path, latent_file, capsys):
    """On a card, backend auto (the default) times a step with our kernels and with the
    reference (eager here, to keep the test short), logs both times and trains with the faster;
    the checkpoint keeps the choice with the card's name."""
    from diffit import accel

    train(_cfg(tmp_path / "auto", "latent", latent_file, steps=3, compile=False))
    note = [ln for ln in capsys.readouterr().out.splitlines() if "backend auto: " in ln]
    assert len(note) == 1, note
    choice = _final(tmp_path / "auto")["backend_choice"]
    assert choice["backend"] in accel.TRIAL_BACKENDS
    assert choice["device"] == torch.cuda.get_device_name()
    assert all(isinstance(v, float) and v > 0 for v in choice["ms"].values()), choice
    assert note[0].startswith(f"diffit train: backend auto: {choice['backend']} (")


@pytest.mark.gpu
def test_gpu_backend_auto_under_cuda_graphs(tmp_path, latent_file, capsys):
    """The default run on a card: blocks compiled and replayed as CUDA graphs, backend auto
    timing both backends inside that (each backend's blocks compiled, recorded and replayed in
    turn), then training on the choice: the log names the graphs and the choice, and the losses
    are finite."""
    torch._dynamo.reset()
    try:
        train(_cfg(tmp_path / "auto", "latent", latent_file, steps=3, compile=True))
    finally:
        torch._dynamo.reset()
    out = capsys.readouterr().out.splitlines()
    choice = _final(tmp_path / "auto")["backend_choice"]
    assert all(isinstance(v, float) for v in choice["ms"].values()), choice
    runs = [ln for ln in out if ln.startswith("diffit train: runs ")]
    assert len(runs) == 1 and "mode reduce-overhead" in runs[0], runs
    assert runs[0].startswith("diffit train: runs our fused Triton kernels" if
                              choice["backend"] == "triton" else
                              "diffit train: runs the plain-PyTorch reference ops"), runs
    losses = [v for _, v in _losses(tmp_path / "auto")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), losses


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["DiffiT-XL/2-256", "DiffiT-XL/2-512", "ffhq64"])
def test_gpu_kernel_check_at_the_benchmarked_models_shapes(model):
    """On a card, the trainer's kernel check (accel.check_kernels) on the benchmarked models'
    own calls, 4 samples, bf16 autocast, weights perturbed as trained (DiffiT-XL/2 with 2 of
    its 28 identical blocks): every call of our ops matches the reference by the numerics
    rule, outputs and gradients. Each call's rows are printed (pytest shows them with a
    failure)."""
    from diffit import accel
    from diffit.latent import DiffiT
    from diffit.unet import DiffiTUNet
    from diffit_kernels import testing

    torch.manual_seed(0)
    dev = torch.device("cuda")
    if model == "ffhq64":
        net = DiffiTUNet.from_preset("ffhq64").to(dev, memory_format=torch.channels_last)
        inputs = (torch.randn(4, net.config.in_channels, 64, 64, device=dev),
                  torch.rand(4, device=dev))
    else:
        size = int(model.rsplit("-", 1)[1]) // 8  # the latent's side
        net = DiffiT.from_preset("DiffiT-XL/2", input_size=size, depth=2).to(dev)
        inputs = (torch.randn(4, net.in_channels, size, size, device=dev),
                  torch.randint(0, 1000, (4,), device=dev),
                  torch.randint(0, net.num_classes, (4,), device=dev))
    with torch.no_grad():
        for prm in net.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)

    def probe():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return net(*inputs)

    why = accel.check_kernels(probe, [net])
    with testing.record_calls() as calls, torch.enable_grad():
        probe()
    for call in calls:
        for r in testing.check_call(call):
            print(f"{model} {call.op} {r.name} {r.dtype} err {r.err:.3e} bound {r.bound:.3e} "
                  f"eager {r.pt_err:.3e}  {call.label()[:120]}")
    assert why is None, why
