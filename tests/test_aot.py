"""GPU readiness without a GPU: every shipped kernel config compiles for sm_80 and sm_90a with
no spills, shared memory within the card, and tensor-core instructions where it uses tl.dot."""
import pytest

pytestmark = pytest.mark.aot


def _specs():
    from diffit_kernels._aot import all_specs

    return all_specs()


SPECS = _specs()


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s.kernel}[{s.config}]" for s in SPECS])
@pytest.mark.parametrize("arch", [80, 90], ids=["sm_80", "sm_90a"])
def test_config_compiles_clean(spec, arch):
    from diffit_kernels._aot import compile_spec

    if arch not in spec.archs:
        pytest.skip(f"{spec.kernel} is not shipped for sm_{arch}")
    row = compile_spec(spec, arch)
    assert not row.problems, f"{spec.kernel} [{spec.config}] on {row.arch}: {row.problems}"


def test_every_op_module_ships_configs():
    import diffit_kernels

    for mod in diffit_kernels.OP_MODULES:
        assert mod.aot_specs(), f"{mod.__name__} lists no kernel configs for the compile report"


def test_loop_size_counts_the_longest_backward_branch_body():
    from diffit_kernels._aot import loop_size

    code = [(0x00, "MOV R1, R2"), (0x10, "IADD3 R1, R1, 0x1, RZ"), (0x20, "FADD R2, R2, R3"),
            (0x30, "@P0 BRA 0x10"), (0x40, "ISETP.GE.AND P1, PT, R1, R4, PT"),
            (0x50, "@!P1 BRA 0x0"), (0x60, "EXIT"), (0x70, "BRA 0x70")]
    sass = "\n".join(f"        /*{a:04x}*/                   {t} ;    /* 0x0 */" for a, t in code)
    assert loop_size(sass) == 6            # 0x00..0x50; the trap's self-branch is no loop
    assert loop_size("\n".join(sass.splitlines()[1:4])) == 3
    assert loop_size("") == 0
