"""Ahead-of-time compile report: every shipped kernel config, built for sm_80 and sm_90a (and
the tensor-core kernels for Blackwell, sm_100a and sm_120a), no GPU.

Each op module exposes `aot_specs()`, the configs its launchers can pick. Here each one goes
through `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`; then cuobjdump
reads the cubin Triton built (registers, stack frame, and from its SASS the spills' local loads
and stores and the tensor-core instructions).
Must run in a process without TRITON_INTERPRET (the interpreter replaces the compiler).

The configs are chosen on sm_80 and sm_90a builds, and there the fixed config of each list must
not spill. Blackwell (sm_100a: B200, B300) builds the kernels whose tiles are tensor-core dots,
where its compiler path differs most (tcgen05 MMAs from tensor memory, where Hopper issues
wgmma): each must build, fit the block's shared memory and keep its tensor cores (tcgen05 for
exactly the tiles that take wgmma on sm_90a); its spills are reported, not gated (no config is
chosen for it yet: a card's autotuner measures). Consumer Blackwell (sm_120a: RTX 50 series,
RTX PRO 6000) gives a block 99 KB and has no tcgen05: the config each tensor-core list keeps for
99 KB cards (fits_99kb) builds for it, within 99 KB, with tensor cores. The row kernels (loads,
reductions, stores) take the same path on every arch.
"""
from __future__ import annotations

import bisect
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _common

# per block on sm_86 / sm_89 / sm_120 cards (RTX 30 / 40 / 50 series, A10, A40, L4, L40, RTX PRO
# 6000 Blackwell): each launch list keeps a config within it (the one its AotSpec marks
# fits_99kb), which such a card's autotuner falls back to (it times a config past the card as
# not fitting)
SMEM_99KB = 99 * 1024
# bytes of shared memory per block (A100; H100 / H200; B200 / B300; RTX 50 / RTX PRO 6000)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: SMEM_99KB}
ARCHS = (80, 90, 100, 120)
# the archs the configs are chosen on: a list's fixed config must not spill there
SPILL_GATED = (80, 90)
ARCH_NAME = {80: "sm_80", 90: "sm_90a", 100: "sm_100a", 120: "sm_120a"}
ARCH_OF = {name: arch for arch, name in ARCH_NAME.items()}
# Scalar 16-bit global loads / stores (LDG / STG .U16) a vectorised kernel may have in its
# longest loop: a 16-row tile of a head dim's narrow second chunk (d 72 = 64 + 16) spread one
# element per thread over 8 warps loads 2. Rows whose address hints the compiler misreads
# load every element alone: Triton 3.6 with the old [8, 1] hint built 20-224 of them per
# iteration (the H200's ec83eac run), invisible to the interpreter.
MAX_SCALAR16 = 4


@dataclasses.dataclass
class AotSpec:
    kernel: str                  # the @triton.jit function's name
    fn: Any                      # the JITFunction
    signature: Dict[str, str]    # runtime arg -> Triton type ("*bf16", "i32", "fp32", ...)
    constexprs: Dict[str, Any]   # constexpr arg -> value
    num_warps: int
    num_stages: int
    config: str                  # short label: which launch this is ("bf16 D=72 BM=64 BN=64")
    uses_dot: bool               # built on tl.dot with fp16/bf16 operands: tensor cores expected
    # the archs it is built for (None: `targets`)
    archs: Optional[Sequence[int]] = None
    spill_ok: bool = False       # an autotune candidate after the default: may spill
    # int args given by an example value (a DiffiT launch's), typed and specialised the way
    # Triton's JIT does for that value (jit_int): the build is the one that runs at that shape
    example: Dict[str, int] = dataclasses.field(default_factory=dict)
    vector16: bool = False       # 16-bit rows, vectorised: <= MAX_SCALAR16 scalar in the loop
    # a 16-bit dot tile wgmma takes on sm_90a (a 64+ dimension, one warpgroup or more): HGMMA
    # expected there, never HMMA alone (smaller tiles and single warps run HMMA by design);
    # and on sm_100a tcgen05's MMAs (UTC*MMA), which Triton builds for the same tiles
    hgmma_expected: bool = False
    # the config of its list that a 99 KB card runs (the list's last, or its only one): its
    # sm_80 build must fit SMEM_99KB (earlier, larger candidates may not)
    fits_99kb: bool = True

    @property
    def targets(self) -> Tuple[int, ...]:
        """The archs it is built for: sm_80 and sm_90a; where it uses tensor-core dots, sm_100a,
        and sm_120a for the config its list keeps for 99 KB cards (fits_99kb)."""
        if self.archs is not None:
            return tuple(self.archs)
        if not self.uses_dot:
            return SPILL_GATED
        return (80, 90, 100) + ((120,) if self.fits_99kb else ())


@dataclasses.dataclass
class AotRow:
    kernel: str
    config: str
    arch: str
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    hmma: int
    hgmma: int
    uses_dot: bool
    error: Optional[str] = None
    utcmma: int = 0              # Blackwell's tensor-core MMAs (tcgen05: UTCHMMA, ...)
    spill_ok: bool = False
    loop: int = 0                # SASS instructions in the longest loop body (loop_body)
    scalar16: int = 0            # scalar 16-bit global loads / stores in that loop
    vector16: bool = False
    hgmma_expected: bool = False
    fits_99kb: bool = True

    @property
    def problems(self) -> List[str]:
        out = []
        if self.error:
            return [self.error]
        arch = ARCH_OF[self.arch]
        if self.spill_bytes and not self.spill_ok and arch in SPILL_GATED:
            out.append(f"{self.spill_bytes} bytes spilled")
        limit = SMEM_LIMIT[arch]
        if self.shared_bytes > limit:
            out.append(f"shared memory {self.shared_bytes} B > {limit} B")
        elif self.fits_99kb and self.arch == "sm_80" and self.shared_bytes > SMEM_99KB:
            out.append(f"shared memory {self.shared_bytes} B > {SMEM_99KB} B: the config its "
                       "list keeps for sm_86 / sm_89 cards must fit them")
        if self.uses_dot and self.hmma + self.hgmma + self.utcmma == 0:
            out.append("no tensor-core instruction (HMMA/HGMMA/UTC*MMA) in the SASS")
        elif self.hgmma_expected and self.arch == "sm_90a" and self.hgmma == 0:
            out.append("HMMA only on sm_90a: no HGMMA (wgmma) for a 64-wide 16-bit dot tile")
        elif self.hgmma_expected and arch == 100 and self.utcmma == 0:
            out.append("HMMA only on sm_100a: no tcgen05 MMA (UTC*MMA) for a 64-wide 16-bit "
                       "dot tile")
        if self.vector16 and self.scalar16 > MAX_SCALAR16:
            out.append(f"{self.scalar16} scalar 16-bit global loads / stores in the loop: rows "
                       "not vectorised")
        return out


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: it ships with the triton wheel under "
                           "triton/backends/nvidia/bin")
    return found


def rows_vectorise(dtype: str, width: int) -> bool:
    """Whether a row kernel's 16-bit rows of `width` elements are expected to load vectorised
    (AotSpec.vector16): a multiple of 8 elements, at least 64 (narrower rows leave a thread one
    element; odd widths cannot align)."""
    return dtype in ("bf16", "fp16") and width % 8 == 0 and width >= 64


def loop_body(sass: str) -> List[str]:
    """The instructions of the longest loop body of a SASS listing (from a backward branch's
    target to the branch): one iteration's static work per thread, e.g. what an attention
    kernel issues per key tile; its length is a rough cost to compare variants of one loop."""
    code = [(int(m.group(1), 16), m.group(2)) for m in
            (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*)", line) for line in sass.splitlines())
            if m]
    addrs = [a for a, _ in code]  # ascending
    best: Tuple[int, int] = (0, 0)
    for i, (end, text) in enumerate(code):
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < end:
            start = bisect.bisect_left(addrs, int(m.group(1), 16))
            if i + 1 - start > best[1] - best[0]:
                best = (start, i + 1)
    return [text for _, text in code[best[0]:best[1]]]


def scalar16(instructions: Sequence[str]) -> int:
    """Scalar 16-bit global loads and stores (LDG / STG with a .U16 or .S16 width) among
    SASS instructions."""
    return sum(1 for t in instructions if re.search(r"\b(LDG|STG)\.\S*\.[US]16\b", t))


_LOCAL_WIDTH = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def local_bytes(sass: str) -> int:
    """Bytes of the local-memory stores and loads (STL / LDL) in a SASS listing, each counted
    once as ptxas -v counts its "bytes spill stores / loads": a Triton kernel keeps no array in
    local memory, so these are its register spills."""
    total = 0
    for m in re.finditer(r"\b(?:STL|LDL)((?:\.\w+)*)\s", sass):
        total += next((_LOCAL_WIDTH[x] for x in m.group(1).split(".") if x in _LOCAL_WIDTH), 4)
    return total


def jit_int(value: int) -> Tuple[str, bool]:
    """(Triton type, divisible by 16) that the JIT gives an int argument of this value (Triton
    3.4-3.9 alike): i32 inside int32's range, else i64; marked divisible by 16 when it is (zero
    too). A value of 1 becomes a compile-time constant (see _constants)."""
    return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0


def _constants(spec: AotSpec) -> Dict[str, Any]:
    return {**{n: 1 for n, v in spec.example.items() if v == 1}, **spec.constexprs}


def _full_signature(spec: AotSpec) -> Dict[str, str]:
    unknown = sorted(set(spec.example) - set(spec.fn.arg_names))
    if unknown:
        raise ValueError(f"{spec.kernel}: example values for arguments it does not take: "
                         f"{unknown}")
    sig = {}
    consts = _constants(spec)
    for name in spec.fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in spec.example:
            sig[name] = jit_int(spec.example[name])[0]
        elif name in spec.signature:
            sig[name] = spec.signature[name]
        else:
            raise ValueError(f"{spec.kernel}: argument {name!r} missing from the AOT signature")
    return sig


def reads_sass(spec: AotSpec) -> bool:
    """Whether the gate's checks of a build read its SASS: tensor-core instructions (a 16-bit
    dot) or a vectorised row kernel's loop. Other builds need it only for the report's loop
    column."""
    return spec.uses_dot or spec.vector16


def compile_spec(spec: AotSpec, arch: int, loop: bool = True) -> AotRow:
    """Compile one config for one arch and read its resource usage. `loop=False` skips the
    SASS listing (~0.4 s of a ~1 s build) where no check reads it (reads_sass) and the build
    has no stack frame (so no spills): the row's loop column is then -1."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = AotRow(spec.kernel, spec.config, ARCH_NAME[arch], spec.num_warps, spec.num_stages,
                 0, 0, 0, 0, 0, spec.uses_dot, spill_ok=spec.spill_ok, vector16=spec.vector16,
                 hgmma_expected=spec.hgmma_expected, fits_99kb=spec.fits_99kb)
    sig = _full_signature(spec)
    # pointers are 16-byte aligned, as the JIT specialises torch allocations (and example
    # ints that are multiples of 16)
    div16 = {n for n, v in spec.example.items() if jit_int(v)[1]}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*") or (n in div16 and t != "constexpr")}
    try:
        src = ASTSource(fn=spec.fn, signature=sig, constexprs=_constants(spec), attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as e:  # report the failure as a row; the aot test fails on it
        row.error = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return row
    row.shared_bytes = int(getattr(ck.metadata, "shared", 0) or 0)
    # everything is read from the cubin Triton built (the one a card loads): a second ptxas run
    # on its PTX without Triton's own options (-lineinfo, its register-allocation flags) built
    # a different binary, with other register counts and, at times, other spills
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(ck.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True)
        if usage.returncode != 0:
            row.error = "cuobjdump failed: " + (usage.stderr.strip() or "?").splitlines()[-1][:300]
            return row
        m = re.search(r"REG:(\d+)", usage.stdout)
        row.registers = int(m.group(1)) if m else -1
        m = re.search(r"STACK:(\d+)", usage.stdout)
        stack = int(m.group(1)) if m else -1
        if not loop and not reads_sass(spec) and stack == 0:
            row.loop = -1  # no stack frame: nothing spilled, and no check reads the SASS
            return row
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True,
                              text=True).stdout
    row.spill_bytes = local_bytes(sass)
    row.hgmma = len(re.findall(r"\bHGMMA\.", sass))
    row.hmma = len(re.findall(r"\bHMMA\.", sass))
    row.utcmma = len(re.findall(r"\bUTC\w*MMA\b", sass))
    body = loop_body(sass)
    row.loop, row.scalar16 = len(body), scalar16(body)
    return row


def all_specs() -> List[AotSpec]:
    from . import OP_MODULES

    specs: List[AotSpec] = []
    for mod in OP_MODULES:
        specs.extend(mod.aot_specs())
    return specs


def run_report(specs: Optional[Sequence[AotSpec]] = None, archs: Sequence[int] = ARCHS,
               printer=print) -> List[AotRow]:
    """Compile every spec for every arch, print a table and return the rows."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the compile report needs a process without TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    specs = all_specs() if specs is None else specs
    rows = []
    head = (f"{'kernel':34} {'config':34} {'arch':7} {'warps':>5} {'stg':>3} {'regs':>4} "
            f"{'spill':>5} {'smem KiB':>8} {'HMMA':>5} {'HGMMA':>5} {'UTC':>4} {'loop':>5} "
            f"{'s16':>3}  status")
    printer(head)
    printer("-" * len(head))
    jobs = [(spec, arch) for spec in specs for arch in archs if arch in spec.targets]
    # builds in threads (Triton's compiler, ptxas and cuobjdump release the GIL), printed in order
    with ThreadPoolExecutor(_common.COMPILE_THREADS) as pool:
        for r in pool.map(lambda job: compile_spec(*job), jobs):
            rows.append(r)
            status = "ok" if not r.problems else "FAIL: " + "; ".join(r.problems)
            printer(f"{r.kernel[:34]:34} {r.config[:34]:34} {r.arch:7} {r.num_warps:5d} "
                    f"{r.num_stages:3d} {r.registers:4d} {r.spill_bytes:5d} "
                    f"{r.shared_bytes / 1024:8.1f} {r.hmma:5d} {r.hgmma:5d} {r.utcmma:4d} "
                    f"{r.loop:5d} {r.scalar16:3d}  {status}")
    bad = sum(1 for r in rows if r.problems)
    printer(f"{len(rows)} kernel builds, {bad} with problems")
    return rows
