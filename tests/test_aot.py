"""GPU readiness without a GPU: every shipped kernel config compiles for sm_80 and sm_90a with
no spills, shared memory within the card, and tensor-core instructions where it uses tl.dot;
the tensor-core kernels for Blackwell too, sm_100a and (the configs 99 KB cards keep) sm_120a,
spills reported there, not gated."""
import pytest

pytestmark = pytest.mark.aot


def _specs():
    from diffit_kernels._aot import all_specs

    return all_specs()


SPECS = _specs()
BUILDS = [(s, arch) for s in SPECS for arch in s.targets]


def _build_id(spec, arch):
    from diffit_kernels._aot import ARCH_NAME

    return f"{spec.kernel}[{spec.config}]-{ARCH_NAME[arch]}"


def _build(spec, arch):
    """A build as a test case. Those outside the spill rule (candidates that may spill, and
    Blackwell's builds) carry the marker `spills_reported`, which a second Triton release's run
    leaves out (tests/aot_triton.sh): a candidate that fails to build or fit there is one its
    card's autotuner skips; the rule's builds (a list's first config or a spill-free candidate,
    on sm_80 / sm_90a) run under every release."""
    from diffit_kernels._aot import SPILL_GATED

    gated = arch in SPILL_GATED and not spec.spill_ok
    return pytest.param(spec, arch, id=_build_id(spec, arch),
                        marks=[] if gated else [pytest.mark.spills_reported])


@pytest.mark.parametrize("spec,arch", [_build(*b) for b in BUILDS])
def test_config_compiles_clean(spec, arch):
    from diffit_kernels._aot import compile_spec

    row = compile_spec(spec, arch, loop=False)  # the gate: SASS read where a check needs it
    assert not row.problems, f"{spec.kernel} [{spec.config}] on {row.arch}: {row.problems}"


def test_every_op_module_ships_configs():
    import diffit_kernels

    for mod in diffit_kernels.OP_MODULES:
        assert mod.aot_specs(), f"{mod.__name__} lists no kernel configs for the compile report"


def test_loop_body_is_the_longest_backward_branch_body():
    from diffit_kernels._aot import loop_body

    def loop_size(sass):
        return len(loop_body(sass))

    code = [(0x00, "MOV R1, R2"), (0x10, "IADD3 R1, R1, 0x1, RZ"), (0x20, "FADD R2, R2, R3"),
            (0x30, "@P0 BRA 0x10"), (0x40, "ISETP.GE.AND P1, PT, R1, R4, PT"),
            (0x50, "@!P1 BRA 0x0"), (0x60, "EXIT"), (0x70, "BRA 0x70")]
    sass = "\n".join(f"        /*{a:04x}*/                   {t} ;    /* 0x0 */" for a, t in code)
    assert loop_size(sass) == 6            # 0x00..0x50; the trap's self-branch is no loop
    assert loop_size("\n".join(sass.splitlines()[1:4])) == 3
    assert loop_size("") == 0


def test_scalar_16bit_accesses_are_counted_in_the_loop_only():
    from diffit_kernels._aot import AotRow, MAX_SCALAR16, loop_body, scalar16

    code = [(0x00, "LDG.E.U16 R1, desc[UR4][R2.64]"), (0x10, "LDG.E.128 R4, desc[UR4][R2.64]"),
            (0x20, "@!P1 LDG.E.U16 R9, desc[UR8][R22.64+0x80]"), (0x30, "STG.E.S16 [R2], R1"),
            (0x40, "LDS.U16 R3, [R5]"), (0x50, "@P0 BRA 0x10"), (0x60, "STG.E.U16 [R2], R1")]
    sass = "\n".join(f"        /*{a:04x}*/                   {t} ;    /* 0x0 */" for a, t in code)
    body = loop_body(sass)
    assert len(body) == 5 and scalar16(body) == 2      # shared-memory and out-of-loop ones not
    row = AotRow("k", "c", "sm_90a", 4, 2, 0, 0, 0, 0, 1, True, vector16=True)
    row.scalar16 = MAX_SCALAR16
    assert not row.problems
    row.scalar16 = MAX_SCALAR16 + 1
    assert row.problems == [f"{MAX_SCALAR16 + 1} scalar 16-bit global loads / stores in the "
                            "loop: rows not vectorised"]
    row.vector16 = False
    assert not row.problems


def test_spills_are_the_local_loads_and_stores_of_the_sass():
    """Spill bytes are read from the shipped cubin's SASS, each local store / load at its width
    (the .LU last-use mark is no width); global and shared accesses are not spills."""
    from diffit_kernels._aot import local_bytes

    code = ["STL [R1+0x4], R3", "STL.64 [R1+0x8], R4", "LDL.LU R12, [R1+0x8]",
            "@P0 LDL.128 R8, [R1+0x10]", "STL.U16 [R1+0x20], R2", "LDG.E.64 R2, desc[UR4][R6.64]",
            "STS.128 [R5], R8", "LDS R3, [R5]"]
    sass = "\n".join(f"        /*{16 * i:04x}*/                   {t} ;    /* 0x0 */"
                     for i, t in enumerate(code))
    assert local_bytes(sass) == 4 + 8 + 4 + 16 + 2
    assert local_bytes("") == 0


def test_hgmma_is_expected_on_sm90a_for_wgmma_sized_tiles_only():
    from diffit_kernels import attention
    from diffit_kernels._aot import AotRow

    row = AotRow("k", "c", "sm_90a", 4, 2, 0, 0, 0, 16, 0, True, hgmma_expected=True)
    assert row.problems == ["HMMA only on sm_90a: no HGMMA (wgmma) for a 64-wide 16-bit dot "
                            "tile"]
    row.hgmma = 4
    assert not row.problems
    row = AotRow("k", "c", "sm_80", 4, 2, 0, 0, 0, 16, 0, True, hgmma_expected=True)
    assert not row.problems                            # sm_80 has no wgmma
    # Blackwell: tcgen05's MMAs for the same tiles; HMMA for the others
    row = AotRow("k", "c", "sm_100a", 4, 2, 0, 0, 0, 16, 0, True, hgmma_expected=True)
    assert row.problems == ["HMMA only on sm_100a: no tcgen05 MMA (UTC*MMA) for a 64-wide "
                            "16-bit dot tile"]
    row.utcmma = 18
    assert not row.problems
    row = AotRow("k", "c", "sm_100a", 1, 2, 0, 0, 0, 0, 0, True)
    assert row.problems == ["no tensor-core instruction (HMMA/HGMMA/UTC*MMA) in the SASS"]
    row.hmma = 20
    assert not row.problems
    specs = {s.config: s for s in attention.aot_specs()}
    assert specs["bf16 D=72 slab 128x32 w8 s3"].hgmma_expected
    assert not specs["bf16 D=72 table-win 16x16 w1 s2"].hgmma_expected   # one warp: HMMA
    assert not specs["bf16 D=72 table 32x32 w4 s1"].hgmma_expected       # no 64-wide side
    assert not any(s.hgmma_expected for s in specs.values() if s.config.startswith("fp32"))


def test_spills_are_gated_where_configs_are_chosen_and_blackwell_builds_dot_kernels():
    """A list's fixed config must not spill on sm_80 / sm_90a; Blackwell reports its spills
    (no config is chosen for it) and gates the rest: shared memory, tensor cores. The
    tensor-core kernels build for sm_100a, and the configs their lists keep for 99 KB cards
    for sm_120a; the row kernels for sm_80 / sm_90a only."""
    from diffit_kernels._aot import SMEM_99KB, SMEM_LIMIT, AotRow

    for arch in ("sm_80", "sm_90a"):
        row = AotRow("k", "c", arch, 4, 2, 96, 12, 0, 16, 0, True)
        assert row.problems == ["12 bytes spilled"]
        row.spill_ok = True
        assert not row.problems
    row = AotRow("k", "c", "sm_100a", 4, 2, 96, 12, 0, 16, 0, True)
    assert not row.problems
    row.shared_bytes = SMEM_LIMIT[100] + 1
    assert row.problems == [f"shared memory {SMEM_LIMIT[100] + 1} B > {SMEM_LIMIT[100]} B"]
    assert all(s.targets == ((80, 90, 100) + ((120,) if s.fits_99kb else ()) if s.uses_dot
                             else (80, 90)) for s in SPECS)
    assert sum(100 in s.targets for s in SPECS) > 100
    assert 50 < sum(120 in s.targets for s in SPECS) < sum(100 in s.targets for s in SPECS)
    # consumer Blackwell: 99 KB per block
    row = AotRow("k", "c", "sm_120a", 4, 2, 96, 0, SMEM_99KB + 1024, 16, 0, True)
    assert row.problems == [f"shared memory {SMEM_99KB + 1024} B > {SMEM_99KB} B"]


def test_each_list_keeps_a_config_for_99kb_cards():
    """sm_86 / sm_89 cards (RTX 30 / 40, A10, L4) give a block 99 KB of shared memory: the
    config of each list such a card relies on must fit it there (its sm_80 build); others
    may not (the d 64 global forward's first tile takes 112 KB)."""
    from diffit_kernels import _attention_aot, _attention_launch, attention
    from diffit_kernels._aot import SMEM_99KB, AotRow

    row = AotRow("k", "c", "sm_80", 8, 3, 0, 0, SMEM_99KB + 1024, 16, 0, True)
    assert row.problems == [f"shared memory {SMEM_99KB + 1024} B > {SMEM_99KB} B: the config "
                            "its list keeps for sm_86 / sm_89 cards must fit them"]
    row.fits_99kb = False
    assert not row.problems
    row = AotRow("k", "c", "sm_90a", 8, 3, 0, 0, SMEM_99KB + 1024, 16, 4, True)
    assert not row.problems                            # Hopper: 227 KB
    specs = {s.config: s for s in attention.aot_specs()}
    assert not specs["bf16 D=64 table 128x64 w8 s3"].fits_99kb    # the list's first of two
    assert specs["bf16 D=64 table 64x64 w4 s3"].fits_99kb         # its last
    d72 = _attention_launch._CONFIG_TABLE[("dbias", False, 2)][1][(64, 16)]
    assert _attention_aot._fits_99kb("dbias", d72, d72[0])        # plan "separate": untimed
    assert not _attention_aot._fits_99kb("dbias", d72, d72[1])    # "separate-64": timed
    # the wide plan's tile (the fused kernel at one 64-token window per tile): a timed plan
    assert not any(s.fits_99kb for s in specs.values() if s.constexprs.get("BLOCK") == 64)


def test_16bit_specs_check_vectorised_rows():
    """Every 16-bit attention build, and the row kernels' 16-bit builds at widths a vector
    covers (the plan of DiffiT's C = 1152 among them; odd and narrow widths load
    element-wise)."""
    from diffit_kernels import attention, norm, projection
    from diffit_kernels._aot import rows_vectorise

    specs = attention.aot_specs()
    assert all(s.vector16 == (s.uses_dot and not s.config.startswith("fp32")) for s in specs)
    assert sum(s.vector16 for s in specs) > 100
    assert rows_vectorise("bf16", 1152) and rows_vectorise("fp16", 72)
    assert not any((rows_vectorise("bf16", 1025), rows_vectorise("bf16", 32),
                    rows_vectorise("fp32", 1152)))
    for mod, width in ((norm, 1040), (projection, 1152)):  # the example width of that plan
        rows = [s for s in mod.aot_specs() if f" C{width} " in f" {s.config} "
                and not s.config.startswith("fp32")]
        assert rows and all(s.vector16 for s in rows), mod.__name__
        assert all(rows_vectorise(s.config.split()[0], int(s.config.split()[1][1:]))
                   for s in mod.aot_specs() if s.vector16 and s.config.split()[1][0] == "C")


def _jit_specialisation(value: int):
    """(type, divisibility key) the installed Triton's JIT gives an int argument."""
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:
        native_specialize_impl = None
    from triton.backends.compiler import BaseBackend

    if native_specialize_impl is not None:
        return native_specialize_impl(BaseBackend, value, False, True, True)
    from triton.runtime import jit

    if not hasattr(jit, "specialize_impl"):
        pytest.skip("this Triton exposes no specialisation function to compare with")
    return jit.specialize_impl(value, lambda *a: "", False, True, True)


@pytest.mark.parametrize("value", [0, 1, 2, 16, 72, 1152, 294912, -16, 2 ** 31 - 1, 2 ** 31,
                                   2 ** 40 + 16])
def test_example_ints_are_typed_as_the_jit_types_them(value):
    from diffit_kernels._aot import jit_int

    jit = _jit_specialisation(value)
    if value == 1:
        assert jit[0] == "constexpr"  # _constants makes it one
        return
    kind, div16 = jit_int(value)
    assert (kind, div16) == (jit[0], jit[1] == "D"), (value, jit)


def test_example_values_build_the_jit_specialisation():
    from diffit_kernels import norm
    from diffit_kernels._aot import _constants, _full_signature

    spec = next(s for s in norm.aot_specs() if s.example.get("ROWS") == 1)
    sig = _full_signature(spec)
    assert sig["ROWS"] == "constexpr" and _constants(spec)["ROWS"] == 1
    assert sig["stride_x_n"] == "i32"
    spec.example = {**spec.example, "NOT_AN_ARG": 3}
    with pytest.raises(ValueError, match="NOT_AN_ARG"):
        _full_signature(spec)


def test_every_defined_kernel_is_built():
    import sys

    from triton.runtime import JITFunction

    import diffit_kernels

    built = {s.kernel for s in SPECS}
    modules = {m.__name__ for m in diffit_kernels.OP_MODULES} | {
        m for m in sys.modules if m.startswith("diffit_kernels._") and m.endswith("_kernels")}
    # launched kernels (the helpers they call are @triton.jit too, named without "_kernel")
    defined = {n for m in modules for n, f in vars(sys.modules[m]).items()
               if isinstance(f, JITFunction) and "_kernel" in n}
    assert len(defined) >= 13 and defined - built == set(), sorted(defined - built)


def test_readme_states_the_gates_build_counts():
    """The README's "N builds; the M that ... must not spill" is the gate's own count, and the
    M it says CI builds under Triton 3.6 are the builds the spill rule gates."""
    import re
    from pathlib import Path

    from diffit_kernels._aot import SPILL_GATED

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    m = re.search(r"\((\d+) builds; the (\d+) sm_80 / sm_90a builds that are", text)
    assert m, "the README no longer states the compile gate's build counts"
    builds = sum(len(s.targets) for s in SPECS)
    strict = sum(len(set(s.targets) & set(SPILL_GATED)) for s in SPECS if not s.spill_ok)
    assert (int(m.group(1)), int(m.group(2))) == (builds, strict)
    # the second release's CI run: the builds without the spills_reported marker
    m = re.search(r"under 3\.6 \(torch 2\.11's pin\), the (\d+) the\s+spill rule gates", text)
    assert m, "the README no longer states what CI builds under Triton 3.6"
    assert int(m.group(1)) == strict == sum(1 for b in BUILDS if not _build(*b).marks)


def test_the_report_builds_in_threads_and_prints_in_order(monkeypatch, tmp_path):
    """run_report builds in COMPILE_THREADS threads and prints its rows in the specs' order,
    each the row one thread builds."""
    from diffit_kernels import _aot, _common

    specs = SPECS[:3]
    out = {}
    for threads in (1, 3):
        monkeypatch.setattr(_common, "COMPILE_THREADS", threads)
        monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / str(threads)))  # no cache hits
        lines = []
        rows = _aot.run_report(specs, archs=(90,), printer=lines.append)
        out[threads] = ([vars(r) for r in rows], lines)
    assert [r["kernel"] for r in out[3][0]] == [s.kernel for s in specs]
    assert out[1] == out[3]


def test_the_gate_skips_the_sass_listing_only_where_no_check_reads_it():
    """The gate's builds (loop=False) list the SASS only where a check reads it (reads_sass):
    a plain row kernel's build skips it and keeps every other reading; a 16-bit dot keeps it."""
    from diffit_kernels._aot import compile_spec, reads_sass

    plain = next(s for s in SPECS if not reads_sass(s))
    dot = next(s for s in SPECS if s.uses_dot and 80 in s.targets)
    full, gate = compile_spec(plain, 80), compile_spec(plain, 80, loop=False)
    assert full.loop > 0 and gate.loop == -1 and not gate.problems
    assert (gate.registers, gate.spill_bytes, gate.shared_bytes) == (
        full.registers, full.spill_bytes, full.shared_bytes)
    row = compile_spec(dot, 80, loop=False)
    assert row.loop > 0 and row.hmma > 0
