"""Model benchmarks: latent DiffiT-XL/2 at 256 and 512 px, the ffhq64 image-space U-Net.

Passes per model:
    fwd              eval-mode forward under no_grad
    fwd+bwd+adamw    one training step: forward, MSE against a fixed random target, backward,
                     fused AdamW step (the loss is negligible next to the network)
    guided sampling  latent model only: a full DDIM loop of classifier-free guided steps
                     (forward_with_cfg on the [cond | uncond] batch), images/s counts images out
Providers:
    ours          backend="triton": the fused kernels
    ours+compile  the fused kernels inside regional torch.compile of the blocks (fullgraph: the
                  ops are custom ops Dynamo traces through; what lies between them fuses), what
                  `python -m diffit sample` and multi-process training run on CUDA when their
                  backend trial chooses ours (--backend auto, the default, times ours against
                  the reference; --backend triton always runs ours)
    ours+graphs   the same, each compiled block also replayed as a CUDA graph (inductor's
                  reduce-overhead; torch.compiler.cudagraph_mark_step_begin() before each
                  training step or model call): what `python -m diffit train` runs in one
                  process on CUDA when its trial chooses ours, and `python -m diffit sample
                  --compile-mode reduce-overhead`
    eager         backend="torch": the plain-PyTorch reference ops
    compile       torch.compile of the eager model (static shapes): its whole forward in a full
                  run; in --quick the repeated blocks only (regional compilation: one graph
                  serves all 28 blocks, the same kernels inside each), as compiling the whole
                  model would eat most of the 10-minute budget
    compile+graphs  the reference's blocks compiled as ours+graphs compiles ours (regional,
                  reduce-overhead, a graph step per training step or model call): what
                  `python -m diffit train` runs in one process on CUDA when its trial chooses
                  the reference, so ours+graphs against it is the trial's own choice
The compiled providers compile exactly as the commands do (diffit.accel.compile_blocks). On
CPU (the harness) "ours", "ours+compile" and "ours+graphs" build the model with backend="auto":
the reference ops, or the kernels under TRITON_INTERPRET=1 (CUDA graphs exist on CUDA only).
All providers run fp32 weights under autocast to the run's dtype (fp32: no autocast) with the
same seed, inputs and optimizer. The U-Net runs channels_last for every provider.

--quick has these cases (the most telling first): the DiffiT-XL/2 256 px training step (B32) and
the ffhq64 U-Net training step (B64), each for ours+graphs (the training default's configuration
with ours), compile (blocks, the goal's yardstick), compile+graphs (the training default's with
the reference), ours+compile, ours and eager; the 512 px training step (B8) for the first four
of those; a 10-step guided DDIM loop (B16) and the 256 px forward for ours+compile (the sampling
default's, with ours), compile and ours (and ours+graphs for the sampling loop). Every case's
first two providers run before any case's others, so the run's time budget, when it runs out,
skips extra providers rather than a goal's case; the CSV lists rows case by case. The full run
has every pass at every size for every provider, with 50-step sampling.

Columns: ms (do_bench median, warm-up / compile / autotune excluded), images_per_s, tflops
(FLOPs counted by torch.utils.flop_counter on the eager model on the meta device: every matmul
and conv; the optimizer step is not counted), peak_mb (torch.cuda.max_memory_allocated during
one call, weights and optimizer state included), activations_mb (that peak minus what was
allocated before the call), wall_s (seconds the row took, building and compiling included) and
for compile rows graphs / graph_breaks (what Dynamo made of it). A provider that fails (out of
memory, kernels not available) is a row with its error; cases after the run's time budget are
rows saying they were skipped. model.csv is rewritten after every row.

    python -m benchmarks.bench_model [--quick] [--dtype bf16] [--out DIR]
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from benchmarks.common import (after_error, bench, bench_main, compile_counts, compiled,
                               counts_since, cuda_or_explain, environment, error_text,
                               out_of_time, results_dir, save_figure, skipped_text,
                               write_csv)
import benchmarks.common as common

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASSES = ("fwd", "fwd+bwd+adamw", "guided sampling")
PROVIDERS = ("ours", "ours+compile", "ours+graphs", "eager", "compile", "compile+graphs")
# the model backend of each provider on CUDA (on CPU ours uses "auto", see the docstring)
BACKENDS = {"ours": "triton", "ours+compile": "triton", "ours+graphs": "triton",
            "eager": "torch", "compile": "torch", "compile+graphs": "torch"}
COMPILED = ("ours+compile", "ours+graphs", "compile", "compile+graphs")
# CUDA graphs: one graph step per training step or model call
GRAPHS = ("ours+graphs", "compile+graphs")
# compiled as the commands compile (diffit.accel.compile_blocks: regional, fullgraph)
BLOCKS = ("ours+compile",) + GRAPHS
RING = 3  # input sets cycled between calls


@dataclasses.dataclass(frozen=True)
class ModelCase:
    model: str                      # preset: "DiffiT-XL/2" (latent) or "ffhq64" (U-Net)
    kind: str                       # "latent" | "unet"
    image_size: int                 # pixels; the latent model works at image_size / 8
    batch: int                      # images per call (guided sampling: before doubling)
    pass_: str                      # one of PASSES
    providers: Tuple[str, ...]      # subset of PROVIDERS, in run order
    steps: int = 0                  # DDIM steps of the guided sampling loop
    rep_ms: int = 100               # do_bench time budget

    @property
    def name(self) -> str:
        label = self.model if self.kind == "latent" else f"{self.model} U-Net"
        steps = f" DDIM{self.steps}" if self.steps else ""
        return f"{label} {self.image_size}px B{self.batch}{steps}"

    @property
    def id(self) -> str:
        return f"{self.name} {self.pass_}".replace("/", "").replace(" ", "-")


def cases(quick: bool = False, tiny_cpu: bool = False) -> List[ModelCase]:
    """The case list, shared by run() and the pytest-benchmark tests."""
    if tiny_cpu:  # the harness on CPU: tiny presets, reference provider, every code path once
        e = ("eager",)
        return [ModelCase("DiffiT-tiny", "latent", 32, 2, "fwd", e, rep_ms=1),
                ModelCase("DiffiT-tiny", "latent", 32, 2, "fwd+bwd+adamw", e, rep_ms=1),
                ModelCase("tiny", "unet", 8, 2, "fwd+bwd+adamw", e, rep_ms=1),
                ModelCase("DiffiT-tiny", "latent", 32, 2, "guided sampling", e, steps=2,
                          rep_ms=1)]
    if quick:
        rep = 400
        train = ("ours+graphs", "compile", "compile+graphs", "ours+compile", "ours", "eager")
        sample = ("ours+compile", "compile", "ours", "ours+graphs")
        xl256 = dict(model="DiffiT-XL/2", kind="latent", image_size=256, batch=32, rep_ms=rep)
        return [ModelCase(**xl256, pass_="fwd+bwd+adamw", providers=train),
                ModelCase("ffhq64", "unet", 64, 64, "fwd+bwd+adamw", train, rep_ms=rep),
                ModelCase("DiffiT-XL/2", "latent", 512, 8, "fwd+bwd+adamw", train[:4],
                          rep_ms=rep),
                ModelCase("DiffiT-XL/2", "latent", 256, 16, "guided sampling", sample, steps=10,
                          rep_ms=rep),
                ModelCase(**xl256, pass_="fwd", providers=sample[:3])]
    rep, out = 1500, []
    for pass_ in ("fwd", "fwd+bwd+adamw"):
        out += [ModelCase("DiffiT-XL/2", "latent", 256, 32, pass_, PROVIDERS, rep_ms=rep),
                ModelCase("DiffiT-XL/2", "latent", 512, 8, pass_, PROVIDERS, rep_ms=rep),
                ModelCase("ffhq64", "unet", 64, 64, pass_, PROVIDERS, rep_ms=rep)]
    out += [ModelCase("DiffiT-XL/2", "latent", 256, 32, "guided sampling", PROVIDERS, steps=50,
                      rep_ms=rep),
            ModelCase("DiffiT-XL/2", "latent", 512, 8, "guided sampling", PROVIDERS, steps=50,
                      rep_ms=rep)]
    return out


# ---- building ---------------------------------------------------------------------------------
def build_model(case: ModelCase, backend: str, device) -> torch.nn.Module:
    from diffit.latent import DiffiT
    from diffit.unet import DiffiTUNet

    torch.manual_seed(0)
    with torch.device(device):
        if case.kind == "latent":
            return DiffiT.from_preset(case.model, input_size=case.image_size // 8,
                                      backend=backend)
        return DiffiTUNet.from_preset(case.model, backend=backend)


def _inputs(case: ModelCase, model, device, gen: torch.Generator):
    """One input set: (x, t, y) for the latent model, (x, c_noise) for the U-Net."""
    B = case.batch
    if case.kind == "unet":
        cfg = model.config
        x = torch.randn(B, cfg.in_channels, case.image_size, case.image_size, generator=gen)
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        sigma = (torch.randn(B, generator=gen) * 1.2 - 1.2).exp()     # EDM's training sigmas
        return x, (sigma.log() / 4).to(device), None
    I = case.image_size // 8
    x = torch.randn(B, model.in_channels, I, I, generator=gen).to(device)
    t = torch.randint(0, 1000, (B,), generator=gen).to(device)
    y = (torch.randint(0, model.num_classes, (B,), generator=gen).to(device)
         if model.num_classes else None)
    return x, t, y


def _amp(dtype: str, device):
    dt = DTYPES[dtype]
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dt)


def _call(model, x, t, y):
    return model(x, t) if y is None else model(x, t, y)


def make_step(case: ModelCase, model, dtype: str, device, graphs: bool = False
              ) -> Callable[[], object]:
    """The timed callable of `case` on an already built (and possibly compiled) model; graphs:
    the blocks replay CUDA graphs, so each training step, or each model call of a forward or
    sampling loop (diffit.accel.mark_graph_steps, as `python -m diffit sample` does), starts a
    new cudagraph-trees step."""
    gen = torch.Generator().manual_seed(1)
    if graphs and case.pass_ != "fwd+bwd+adamw":
        from diffit.accel import mark_graph_steps
        mark_graph_steps(model)
    sets = [_inputs(case, model, device, gen) for _ in range(RING)]
    nxt = itertools.cycle(sets).__next__

    if case.pass_ == "fwd":
        model.eval()

        def fwd():
            x, t, y = nxt()
            with torch.no_grad(), _amp(dtype, device):
                return _call(model, x, t, y)
        return fwd

    if case.pass_ == "fwd+bwd+adamw":
        model.train()
        x0 = sets[0][0]
        target = torch.randn(x0.shape[0], model.out_channels, *x0.shape[2:], device=device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0,
                                fused=torch.device(device).type == "cuda")

        def train_step():
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            x, t, y = nxt()
            with _amp(dtype, device):
                out = _call(model, x, t, y)
            F.mse_loss(out.float(), target).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return train_step

    if case.pass_ == "guided sampling":
        from diffit.diffusion import create_diffusion

        if case.kind != "latent":
            raise ValueError(f"guided sampling is benchmarked for the latent model, not {case}")
        model.eval()
        diffusion = create_diffusion(f"ddim{case.steps}", learn_sigma=model.learn_sigma)
        # the guidance scale sample.py uses by default at this resolution
        cfg_scale = 4.4 if case.image_size <= 256 else 1.49
        null = torch.full((case.batch,), model.num_classes, dtype=torch.long, device=device)

        def sample():
            z, _, y = nxt()
            z2, y2 = torch.cat([z, z]), torch.cat([y, null])
            with torch.no_grad(), _amp(dtype, device):
                return diffusion.ddim_sample_loop(
                    model.forward_with_cfg, z2.shape, noise=z2, device=device,
                    model_kwargs=dict(y=y2, cfg_scale=cfg_scale))
        return sample

    raise ValueError(f"pass must be one of {PASSES}, got {case.pass_!r}")


@contextlib.contextmanager
def prepared(case: ModelCase, provider: str, dtype: str, device, quick: bool
             ) -> Iterator[Callable[[], object]]:
    """Build the provider's model, warm it up (compile, autotune, optimizer state), yield the
    timed callable; free everything afterwards so the next provider's peak memory is its own."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    _release(device)  # whatever an earlier case's caller still held
    fn = None
    backend = BACKENDS[provider]
    if backend == "triton" and torch.device(device).type != "cuda":
        backend = "auto"  # the CPU harness: the reference, or the kernels under the interpreter
    model = build_model(case, backend, device)
    if case.kind == "unet":
        model = model.to(memory_format=torch.channels_last)
    try:
        from diffit.accel import compile_blocks

        if provider in BLOCKS:
            compile_blocks(model, backend=common.COMPILE_BACKEND,
                           mode="reduce-overhead" if provider in GRAPHS else "default")
        elif provider == "compile":
            if quick:
                compile_blocks(model, backend=common.COMPILE_BACKEND, fullgraph=False)
            else:
                # the bound forward, not the module: forward_with_cfg calls self.forward
                model.forward = compiled(model.forward)
        fn = make_step(case, model, dtype, device, graphs=provider in GRAPHS)
        fn()
        if torch.device(device).type == "cuda":
            fn()  # AdamW state exists and every input set has passed the compiled graph's guards
        _sync(device)
        yield fn
    finally:
        fn = model = None  # noqa: F841 - the step closure holds the model and the optimizer
        if provider in COMPILED:
            torch._dynamo.reset()
        _release(device)


def _release(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _memory(fn: Callable[[], object], device) -> Tuple[float, float]:
    """(peak MB during one call, that peak minus MB allocated before it); NaN without CUDA."""
    if torch.device(device).type != "cuda":
        return float("nan"), float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2 ** 20, (peak - before) / 2 ** 20


_FLOPS: Dict[Tuple, float] = {}


def count_flops(case: ModelCase) -> float:
    """FLOPs of one call of the case's pass, counted on the eager model on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (case.model, case.kind, case.image_size, case.batch, case.pass_, case.steps)
    if key in _FLOPS:
        return _FLOPS[key]
    fwd_case = dataclasses.replace(case, pass_="fwd",
                                   batch=case.batch * (2 if case.steps else 1))
    model = build_model(fwd_case, "torch", "meta")
    x, t, y = _inputs(fwd_case, model, "meta", torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        out = _call(model, x, t, y)
        if case.pass_ == "fwd+bwd+adamw":
            out.float().square().mean().backward()
    flops = float(counter.get_total_flops()) * (case.steps or 1)
    _FLOPS[key] = flops
    return flops


def measure(case: ModelCase, provider: str, dtype: str, device, quick: bool) -> dict:
    """One CSV row: time, throughput and memory of `provider` on `case`."""
    before = compile_counts()
    with prepared(case, provider, dtype, device, quick) as fn:
        peak_mb, act_mb = _memory(fn, device)
        ms = bench(fn, rep=case.rep_ms)
        del fn  # so that leaving the block frees the model before the next provider builds
    stats = counts_since(before) if provider in COMPILED else {}
    flops = count_flops(case)
    return dict(ms=_sig(ms), images_per_s=_sig(case.batch / (ms * 1e-3)),
                tflops=_sig(flops / (ms * 1e-3) / 1e12), peak_mb=round(peak_mb, 1),
                activations_mb=round(act_mb, 1), **stats)


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def run(quick: bool = False, dtype: str = "bf16", out_dir: Optional[str] = None,
        tiny_cpu: bool = False) -> List[dict]:
    """Time every (case, provider); write model.csv + model.png; return the rows.

    On CUDA a provider that fails (out of memory, kernels not available) gets a row with its
    error and no numbers; with tiny_cpu (the CI harness check) failures raise."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if tiny_cpu:
        device = torch.device("cpu")
    else:
        if not cuda_or_explain("bench_model"):
            return []
        device = torch.device("cuda")
    env = environment()
    d = results_dir(out_dir)
    nan = float("nan")
    rows: List[dict] = []
    done: Dict[Tuple[int, int], dict] = {}
    todo = cases(quick, tiny_cpu)
    # every case's first two providers (the command's default and the goal's yardstick) before
    # any case's others, so a spent time budget skips the extra providers, not a goal's case
    order = [(i, j) for i, c in enumerate(todo) for j in range(min(2, len(c.providers)))]
    order += [(i, j) for i, c in enumerate(todo) for j in range(2, len(c.providers))]
    for i, j in order:
        case, provider = todo[i], todo[i].providers[j]
        row = dict(op="model", case=case.name, model=case.model, image_size=case.image_size,
                   batch=case.batch, steps=case.steps, provider=provider, dtype=dtype,
                   **{"pass": case.pass_},
                   compile_scope=("blocks" if quick or provider in BLOCKS
                                  else "model") if provider in COMPILED else "",
                   ms=nan, images_per_s=nan, tflops=nan, peak_mb=nan, activations_mb=nan,
                   error="")
        t0 = time.perf_counter()
        if out_of_time():
            row["error"] = skipped_text()
        else:
            try:
                row.update(measure(case, provider, dtype, device, quick))
            except Exception as e:  # noqa: BLE001 - recorded in the row, the run goes on
                if tiny_cpu:
                    raise
                row["error"] = error_text(e)
                del e  # its traceback holds the failed case's tensors
                after_error()
        row.update(wall_s=round(time.perf_counter() - t0, 1), card=env["card"],
                   torch=env["torch"], triton=env["triton"])
        done[(i, j)] = row
        rows = [done[k] for k in sorted(done)]  # case by case, providers in their order
        if row["error"]:
            print(f"model {case.name:34} {provider:8} {case.pass_:16} {row['error']}",
                  flush=True)
        else:
            print(f"model {case.name:34} {provider:8} {case.pass_:16} {row['ms']:10.3f} ms "
                  f"{row['images_per_s']:9.1f} img/s {row['tflops']:7.1f} TFLOP/s "
                  f"{row['peak_mb']:9.0f} MB peak ({row['wall_s']:.0f} s)", flush=True)
        write_csv(d / "model.csv", rows)  # a killed run keeps every finished row
    bar_plot(d / "model.png", rows, title=f"DiffiT models, {dtype} ({env['card']})")
    return rows


def bar_plot(path, rows: List[dict], title: str) -> None:
    """images/s per case, one bar per provider, one panel per pass. Bars, not lines: the cases
    are different models, not points on a size axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    passes = list(dict.fromkeys(r["pass"] for r in rows))
    fig, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 4.5), squeeze=False)
    for ax, pass_ in zip(axes[0], passes):
        sub = [r for r in rows if r["pass"] == pass_]
        names = list(dict.fromkeys(r["case"] for r in sub))
        provs = list(dict.fromkeys(r["provider"] for r in sub))
        width = 0.8 / len(provs)
        for i, prov in enumerate(provs):
            got = {r["case"]: r["images_per_s"] for r in sub if r["provider"] == prov}
            xs = [j for j, n in enumerate(names) if got.get(n, float("nan")) == got.get(n)]
            ax.bar([j + (i - (len(provs) - 1) / 2) * width for j in xs],
                   [got[names[j]] for j in xs], width, label=prov)
        vals = [v for r in sub for v in [r["images_per_s"]] if v == v and v > 0]
        if vals and max(vals) > 20 * min(vals):  # a 64 px U-Net next to a 512 px XL model
            ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
        ax.set_title(pass_)
        ax.set_ylabel("images/s (higher is better)")
        if ax.get_legend_handles_labels()[0]:  # every row failed or was skipped: none
            ax.legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)


def main(argv=None) -> int:
    return bench_main(run, __doc__, "fewer providers at 512 px / U-Net, shorter sampling, "
                      "regional compile", DTYPES, argv)


if __name__ == "__main__":
    raise SystemExit(main())
