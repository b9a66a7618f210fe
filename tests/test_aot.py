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
