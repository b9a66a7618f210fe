"""benchmarks.host_ops: the host work of a training step counted on CPU (our launches stubbed):
deterministic, one launch of each kernel per block, and fewer PyTorch ops than the reference."""
from benchmarks import host_ops
from diffit.latent import DiffiT


def test_counts_are_the_code_paths_and_every_block_launches_the_same_kernels():
    a = host_ops.count_step("DiffiT-tiny")
    b = host_ops.count_step("DiffiT-tiny")
    assert a["aten"] == b["aten"] and a["launches"] == b["launches"]   # no timing, no noise
    depth = len(DiffiT.from_preset("DiffiT-tiny").blocks)
    per_block = ("_time_qkv_ln_fwd_kernel", "_time_qkv_bwd_kernel_pack", "_time_qkv_bwd_kernel_ln",
                 "_tmsa_attention_fwd_kernel", "_tmsa_attention_bwd_kernel_delta",
                 "_tmsa_attention_bwd_kernel_dkdv", "_tmsa_attention_bwd_kernel_dq",
                 "_tmsa_attention_table_grad_kernel")
    for k in per_block:
        assert a["launches"][k] == depth, (k, a["launches"])
    # global attention's table slabs (a 16 x 16 grid): one in the forward, one in the backward
    assert a["launches"]["_tmsa_attention_table_slab_kernel"] == 2 * depth
    # one adaln_norm per block and the final layer's
    assert a["launches"]["_adaln_norm_fwd_kernel"] == a["launches"]["_adaln_norm_bwd_kernel"] \
        == depth + 1
    assert set(a["launches"]) == set(per_block) | {"_adaln_norm_fwd_kernel",
                                                   "_adaln_norm_bwd_kernel",
                                                   "_tmsa_attention_table_slab_kernel"}
    # no copy kernel in the blocks' own code: the attention output's head merge is a view
    copies = {(site, op): n for (site, op), n in a["aten_site_ops"].items()
              if site.startswith("layers.py") and op in ("aten.clone", "aten.copy_")}
    assert not copies, copies
    # the stub is gone afterwards: the reference counts no launches, and more PyTorch ops
    eager = host_ops.count_step("DiffiT-tiny", "eager")
    assert not eager["launches"]
    assert sum(eager["aten"].values()) > sum(a["aten"].values())
    assert all(op not in host_ops.VIEWS for op in a["aten_ops"])


def test_cli_prints_the_tables(capsys):
    assert host_ops.main(["--model", "DiffiT-tiny", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DiffiT-tiny training step, ours: ")
    assert "Triton launches by kernel:" in out and "aten ops by site:" in out
