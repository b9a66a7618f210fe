"""diffit.training.train: stopping on a signal (preemption) and resuming on another number of
ranks.

The data are 64 random 4x8x8 latents whose element [0, 0, 0] is index / 64, so every batch says
which samples it holds. Tiny latent DiffiT, batch 8, a handful of steps, CPU (gloo for 2 ranks)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from diffit.training.train import (EXIT_STOPPED, StopRequest, TrainConfig, Trainer,
                                   latest_checkpoint, read_checkpoint, train)
from diffit.training.state import (DistInfo, fresh_rank_seed, rekey_optimizer_state, seed_all,
                                   shut_down)

ROOT = Path(__file__).resolve().parents[1]
STOPS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def _write_latents(path: Path, n: int = 64) -> Path:
    x = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = torch.arange(n) / 64                      # exact in float32
    torch.save({"latents": x, "labels": torch.arange(n) % 3}, path)
    return path


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return _write_latents(tmp_path_factory.mktemp("latents") / "lat.pt")


def _cfg(out, data_path, **kw):
    base = dict(out=str(out), model="DiffiT-tiny", data="latents", data_path=str(data_path),
                batch_size=8, steps=6, lr=1e-3, log_every=1, ckpt_every=0, num_samples=0,
                progress=False)
    return TrainConfig(**{**base, **kw})


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(Path(out) / "metrics.jsonl"))]


def _record_batches(seen: list, signal_at=None):
    """A Trainer.train_step that notes (step, sample indices) and can signal its own process
    in the middle of a step."""
    original = Trainer.train_step

    def train_step(self, x, y):
        seen.append((self.step + 1, (x[:, 0, 0, 0] * 64).round().long().tolist()))
        if signal_at == self.step + 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, x, y)
    return train_step


# ---- the stop flag ----------------------------------------------------------------------------
def test_stop_request_records_the_first_signal_and_restores_handlers():
    def mine(signum, frame):
        raise AssertionError("the previous handler ran while StopRequest was installed")

    old_usr1 = signal.signal(signal.SIGUSR1, mine)
    try:
        before = {s: signal.getsignal(s) for s in STOPS}
        with StopRequest() as stop:
            assert stop.installed and stop.agreed() is None
            signal.raise_signal(signal.SIGUSR1)
            assert stop.agreed() == "SIGUSR1"
            signal.raise_signal(signal.SIGINT)             # no KeyboardInterrupt while stopping
            signal.raise_signal(signal.SIGTERM)
            assert (stop.agreed(), stop.ignored) == ("SIGUSR1", 2)
        assert {s: signal.getsignal(s) for s in STOPS} == before
        assert signal.getsignal(signal.SIGUSR1) is mine
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)

    got = {}

    def in_thread():                                      # Python handlers: main thread only
        with StopRequest() as stop:
            got["installed"] = stop.installed
    th = threading.Thread(target=in_thread)
    th.start()
    th.join()
    assert got == {"installed": False}


def test_signal_mid_step_and_again_during_the_checkpoint(tmp_path, latents, monkeypatch, capsys):
    before = {s: signal.getsignal(s) for s in STOPS}
    seen, real_save = [], torch.save

    def save_while_interrupted(obj, f, *a, **kw):
        os.kill(os.getpid(), signal.SIGINT)               # Ctrl-C while the checkpoint is written
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(Trainer, "train_step", _record_batches(seen, signal_at=3))
    monkeypatch.setattr(torch, "save", save_while_interrupted)
    s = train(_cfg(tmp_path / "b", latents, num_samples=2, sample_steps=2))
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert (s["stopped"], s["step"], s["samples"]) == ("SIGTERM", 3, None)
    assert "SIGTERM received: stopping after step 3 of 6" in out
    assert "1 later signal(s) ignored" in out and f"status {EXIT_STOPPED}" in out
    ckdir = tmp_path / "b" / "checkpoints"
    assert latest_checkpoint(ckdir).name == "ckpt_00000003.pt" == s["checkpoint"].name
    assert read_checkpoint(ckdir / "ckpt_00000003.pt")["step"] == 3
    assert not (tmp_path / "b" / "samples.png").exists()
    assert {sig: signal.getsignal(sig) for sig in STOPS} == before

    assert train(_cfg(tmp_path / "b", latents), resume="auto")["stopped"] is None
    train(_cfg(tmp_path / "a", latents))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert [st for st, _ in seen] == [1, 2, 3]


def test_sigterm_to_a_training_process_then_resume(tmp_path, latents):
    """`python -m diffit train` with a data-loader worker, its process group sent SIGTERM mid-run
    (Slurm signals every process of a job step): exit status 75, a checkpoint that --resume
    continues from, and the same losses as a run that was never interrupted."""
    out = tmp_path / "b"
    cmd = [sys.executable, "-m", "diffit", "train", "--model", "DiffiT-tiny", "--data", "latents",
           "--data-path", str(latents), "--batch-size", "8", "--steps", "1000", "--lr", "1e-3",
           "--log-every", "1", "--ckpt-every", "0", "--num-samples", "0", "--no-progress",
           "--num-workers", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:                         # wait until it is training
            lines.append(line)
            if line.startswith("step 2/1000"):
                os.killpg(proc.pid, signal.SIGTERM)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == EXIT_STOPPED, log[-2000:] + err[-3000:]
    stopped = read_checkpoint(latest_checkpoint(out / "checkpoints"))["step"]
    assert 2 <= stopped < 1000
    assert f"SIGTERM received: stopping after step {stopped} of 1000" in log
    assert f"stopped by SIGTERM at step {stopped}" in log
    assert [st for st, _ in _losses(out)] == list(range(1, stopped + 1))

    train(_cfg(out, latents, steps=stopped + 2), resume="auto")
    train(_cfg(tmp_path / "a", latents, steps=stopped + 2))
    assert _losses(tmp_path / "a") == _losses(out)        # bit for bit, through the stop


# ---- another world size -----------------------------------------------------------------------
def test_optimizer_state_rekeying():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    names = ["0.weight", "0.bias", "1.weight", "1.bias"]
    sd = opt.state_dict()
    named = rekey_optimizer_state(sd, names, True, "ck")
    assert list(named["state"]) == names and named["param_groups"][0]["params"] == names
    assert rekey_optimizer_state(named, names, True, "ck") is named
    back = rekey_optimizer_state(named, names, False, "ck")
    assert back["param_groups"] == sd["param_groups"] and back["state"].keys() == sd["state"].keys()
    with pytest.raises(ValueError, match=r"ck: the optimizer state holds 4 parameters .*'1.bias'"):
        rekey_optimizer_state(named, names[:3] + ["2.bias"], False, "ck")


def test_resume_after_the_end_of_a_larger_world_s_epoch(tmp_path, monkeypatch):
    """62 items, batch 8: one rank has 7 batches an epoch, four ranks had 8 (each shard padded
    to 16). A 4-rank checkpoint taken after its 8th batch resumes at the next epoch's start.
    The 4-rank checkpoint is forged from a 1-rank one: world_size, rng and position are what
    depend on the world size."""
    lat = _write_latents(tmp_path / "lat62.pt", 62)
    out = tmp_path / "r"
    train(_cfg(out, lat, steps=2))
    path = latest_checkpoint(out / "checkpoints")
    ck = read_checkpoint(path)
    ck.update(world_size=4, batch_in_epoch=8, rng=ck["rng"] * 4)
    torch.save(ck, path)
    seen = []
    monkeypatch.setattr(Trainer, "train_step", _record_batches(seen))
    t = Trainer(_cfg(out, lat, steps=3), resume="auto")
    assert (t.step, t.epoch, t.batch_in_epoch) == (2, 1, 0)
    t.fit()
    t.sampler.set_position(1, 0)
    assert seen == [(3, list(t.sampler)[:8])]             # epoch 1's first batch


def test_a_setting_added_after_the_checkpoint_counts_as_its_default(tmp_path, latents):
    out = tmp_path / "r"
    train(_cfg(out, latents, steps=1))
    path = latest_checkpoint(out / "checkpoints")
    ck = read_checkpoint(path)
    del ck["config"]["ema_warmup"]                        # as if written before the field existed
    torch.save(ck, path)
    with pytest.raises(ValueError, match=r"ema_warmup=True there vs False here"):
        Trainer(_cfg(out, latents, ema_warmup=False), resume="auto")
    assert Trainer(_cfg(out, latents), resume="auto").step == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank, port, root, lat):
    """DDP: resume a 1-rank checkpoint on 2 ranks, rank 1 alone is sent SIGTERM during step 4.
    FSDP: resume a 1-rank checkpoint on 2 sharded ranks, train to step 4."""
    import torch.distributed as dist

    from diffit.training.state import full_state_dicts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")          # the Trainers share it and leave it open
    root, res = Path(root), {}
    try:
        Trainer(_cfg(root / "odd", lat, batch_size=9))
    except ValueError as e:
        res["odd_batch"] = str(e)

    seen, original = [], Trainer.train_step
    Trainer.train_step = _record_batches(seen, signal_at=4 if rank == 1 else None)
    t = Trainer(_cfg(root / "ddp", lat, steps=8), resume="auto")
    after_load = torch.get_rng_state()
    with torch.random.fork_rng():
        seed_all(fresh_rank_seed(0, 2, 1))
        res["fresh_rng_ok"] = torch.equal(torch.get_rng_state(), after_load)
    summary = t.fit()
    res.update(seen=seen, stopped=summary["stopped"], step=summary["step"])

    Trainer.train_step = original
    t = Trainer(_cfg(root / "fsdp", lat, steps=4, fsdp=True), resume="auto")
    _, _, opt = full_state_dicts(t.model, t.ema.module, t.optimizer, fsdp=True)
    ck = read_checkpoint(root / "fsdp" / "checkpoints" / "ckpt_00000002.pt")
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    res["fsdp_opt_loaded"] = rank != 0 or all(
        torch.equal(opt["state"][n][k], ck["optimizer"]["state"][i][k])
        for i, n in enumerate(names) for k in ("exp_avg", "exp_avg_sq"))
    res["fsdp_step"] = t.fit()["step"]
    torch.save(res, root / f"rank{rank}.pt")
    # both ranks past every collective before either tears the group down, and neither gone
    # before both have: otherwise a rank aborted now and then ("terminate called without an
    # active exception", SIGABRT in CI)
    shut_down(DistInfo(rank, 2, rank, torch.device("cpu"), True))


@pytest.mark.slow
def test_resume_on_two_ranks_stop_on_one_signal_resume_on_one(tmp_path, latents, monkeypatch):
    import torch.multiprocessing as mp

    ref = []                                              # an uninterrupted 1-rank run
    monkeypatch.setattr(Trainer, "train_step", _record_batches(ref))
    train(_cfg(tmp_path / "ref", latents))
    train(_cfg(tmp_path / "ddp", latents, steps=2))
    train(_cfg(tmp_path / "fsdp", latents, steps=2, fsdp=True))
    monkeypatch.undo()

    mp.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path), str(latents)), nprocs=2,
             join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert "batch_size 9" in r0["odd_batch"] and "world size 2" in r0["odd_batch"]
    assert r1["fresh_rng_ok"] and not r0["fresh_rng_ok"]  # rank 1 had no saved random state
    # rank 0 was never signalled, yet both stopped after step 4 with one checkpoint
    assert (r0["stopped"], r0["step"], r1["stopped"], r1["step"]) == ("SIGTERM", 4) * 2
    ck = read_checkpoint(latest_checkpoint(tmp_path / "ddp" / "checkpoints"))
    assert (ck["step"], ck["world_size"], ck["epoch"], ck["batch_in_epoch"]) == (4, 2, 0, 4)
    # steps 3-4 on two ranks hold the samples one rank would have used, split between them
    for (s0, i0), (s1, i1), (s, i) in zip(r0["seen"], r1["seen"], ref[2:4]):
        assert s0 == s1 == s and len(i0) == len(i1) == 4 and sorted(i0 + i1) == sorted(i)

    seen = []
    monkeypatch.setattr(Trainer, "train_step", _record_batches(seen))
    train(_cfg(tmp_path / "ddp", latents), resume="auto")
    assert seen == ref[4:6]                               # 2 ranks -> 1: steps 5-6 as ever
    assert [s for s, _ in _losses(tmp_path / "ddp")] == [1, 2, 3, 4, 5, 6]

    # FSDP: 1 rank -> 2 sharded (positional optimizer state to named) -> 1 (named to positional)
    assert r0["fsdp_opt_loaded"] and r0["fsdp_step"] == r1["fsdp_step"] == 4
    path = latest_checkpoint(tmp_path / "fsdp" / "checkpoints")
    ck = read_checkpoint(path)
    assert ck["world_size"] == 2 and isinstance(next(iter(ck["optimizer"]["state"])), str)
    t = Trainer(_cfg(tmp_path / "fsdp", latents, fsdp=True), resume="auto")
    names = [n for n, p in t.model.named_parameters() if p.requires_grad]
    mine = t.optimizer.state_dict()["state"]
    for i, n in enumerate(names):
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(mine[i][k], ck["optimizer"]["state"][n][k]), (n, k)
    assert t.fit()["step"] == 6


def _pickled_globals(path: Path) -> set:
    """The `module name` of every global a torch checkpoint's pickle names."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.add(arg)
        elif op.name == "STACK_GLOBAL":
            found.add(" ".join(strings[-2:]))
    return found


def test_checkpoints_name_no_diffit_module_so_they_survive_moves(tmp_path, latents):
    # trainer checkpoints hold tensors, numbers, strings and dicts only (configs as asdict) and
    # are read with weights_only=True, which refuses any other global: a checkpoint written
    # before diffit/train*.py moved to diffit/training/ loads and resumes after it
    out = tmp_path / "r"
    train(_cfg(out, latents, steps=1))
    path = latest_checkpoint(out / "checkpoints")
    names = _pickled_globals(path)
    assert names and all(n.split(" ")[0].split(".")[0] in ("torch", "collections")
                         for n in names), names
    assert Trainer(_cfg(out, latents, steps=2), resume="auto").step == 1
