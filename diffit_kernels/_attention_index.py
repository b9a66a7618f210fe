"""Host-side index arithmetic of tmsa_attention, plain torch: the token geometry the kernels
take as arguments, and the fixed-order plans that reduce the kernels' per-program ds partials
into the table or dense-bias gradient. diffit_kernels/attention.py gives the math (the virtual
window-major token order, the relative code, why dtable is reduced this way).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch

from ._common import cdiv, cuda_capturing


class _Geom:
    """Where each virtual token lives and how its relative-position code is formed."""

    def __init__(self, N: int, geometry: Sequence[int]):
        if len(geometry) == 4:
            Gh, Gw, gh, gw = (int(g) for g in geometry)
        else:
            Gh, Gw, gh, gw = 1, N, 1, N
        self.windowed = (gh, gw) != (Gh, Gw)
        self.gh, self.gw, self.Gw = gh, gw, Gw
        self.n_win = gh * gw if self.windowed else N     # tokens one query attends over
        self.nW = N // self.n_win
        self.nWw = Gw // gw if self.windowed else 1
        self.R = (2 * gh - 1) * (2 * gw - 1)
        self.rel_off = (gh - 1) * (2 * gw - 1) + gw - 1
        self._args = None

    def args(self, device: torch.device):
        """The kernels' geometry arguments: n_win, gw, TOK, n_lut (looked up once per call's
        geometry: the backward launches three kernels with them)."""
        if self._args is None or self._args[0] != str(device):
            if self.windowed:
                tok = _token_lut(self.nW * self.n_win, self.gh, self.gw, self.Gw, str(device))
            else:
                tok = _placeholder(str(device))
            self._args = (str(device), (self.n_win, self.gw, tok, tok.shape[1]))
        return self._args[1]


def _to_device(t: torch.Tensor, device: str) -> torch.Tensor:
    """t copied to the device of the cached table it becomes. Inside a CUDA graph capture it
    cannot be: the copy would run only at the graph's replays, leaving the cached table
    unwritten for every call outside the graph (and a copy from pageable memory synchronizes,
    which a capture forbids). Nothing is cached then: the error says to call first."""
    if device.startswith("cuda") and cuda_capturing():
        raise RuntimeError(
            "tmsa_attention builds its index tables on the device at the first call of each "
            "geometry (token grid, window, batch, tile), which a CUDA graph capture cannot do: "
            "call it once outside the capture with the same shapes first, as "
            "torch.cuda.make_graphed_callables and torch.compile's CUDA graphs do")
    return t.to(device)


# virtual tokens past N that a tile may reach (tiles overhang N by less than one block, and
# no block exceeds 128): the token table's zero padding
LUT_PAD = 256


@functools.lru_cache(maxsize=8)
def _cached_placeholder(device: str) -> torch.Tensor:
    return torch.empty(3, 16, dtype=torch.int32, device=device)


def _placeholder(device: str) -> torch.Tensor:
    """Global attention's token-table argument. Its kernels compute their tokens (WINDOWED is
    a constexpr) and never read it, so uninitialised memory of the device does: no copy, so
    it can be allocated inside a CUDA graph capture too (from the graph's pool, not cached),
    and a new global grid's forward can be captured once its kernels are loaded."""
    if device.startswith("cuda") and cuda_capturing():
        return torch.empty(3, 16, dtype=torch.int32, device=device)
    return _cached_placeholder(device)


@functools.lru_cache(maxsize=64)
def _token_lut(N: int, gh: int, gw: int, Gw: int, device: str) -> torch.Tensor:
    """[3, n_lut] int32: the row, relative-position code and window of every virtual token
    of windowed attention (the kernels' _tokens), zero past N; n_lut a multiple of 16. Global
    attention computes its own (the identity) and takes _placeholder instead."""
    n_win, nWw = gh * gw, Gw // gw
    v = torch.arange(N)
    w, t = v // n_win, v % n_win
    i = t // gw
    row = ((w // nWw) * gh + i) * Gw + (w % nWw) * gw + t % gw
    out = torch.zeros(3, cdiv(N + LUT_PAD, 16) * 16, dtype=torch.int32)
    out[0, :N], out[1, :N], out[2, :N] = row, t + i * (gw - 1), w
    return _to_device(out, device)


def _code(t: torch.Tensor, gw: int) -> torch.Tensor:
    return (t // gw) * (2 * gw - 1) + t % gw


def _bin_gather_index(ta: torch.Tensor, tc: torch.Tensor, valid: torch.Tensor, geom_key):
    """Padded [R, k] index into a flat partial (+ one trailing zero slot) listing, per table
    row, the partial elements whose (query, key) tokens sit at that relative offset."""
    gh, gw = geom_key
    bins = _code(ta, gw) - _code(tc, gw) + (gh - 1) * (2 * gw - 1) + gw - 1
    return _index_of_bins(bins, valid, (2 * gh - 1) * (2 * gw - 1))


def _index_of_bins(bins: torch.Tensor, valid: torch.Tensor, R: int) -> torch.Tensor:
    """Padded [R, k] index into a flat partial of valid.numel() elements (the pad: that count):
    per table row, the partial elements (valid ones, in element order) whose relative offset
    is that row. The table-gradient kernel sums each row of it in order."""
    bins = bins.flatten()
    keep = valid.flatten()
    bins, flat = bins[keep], torch.arange(bins.numel())[keep]
    order = torch.sort(bins, stable=True).indices
    bins, flat = bins[order], flat[order]
    counts = torch.bincount(bins, minlength=R)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(bins.numel()) - start[bins]
    index = torch.full((R, max(1, int(counts.max()))), valid.numel(), dtype=torch.long)
    index[bins, pos] = flat
    return index.to(torch.int32)


@functools.lru_cache(maxsize=64)
def _fused_bins(n_win: int, G: int, BLOCK: int, gh: int, gw: int, device: str) -> torch.Tensor:
    """Bins of a fused-kernel partial [BLOCK, BLOCK] (summed over programs): G windows of n_win
    tokens packed block-diagonally."""
    a = torch.arange(BLOCK)
    ta, tc = (a % n_win)[:, None].expand(BLOCK, BLOCK), (a % n_win)[None, :].expand(BLOCK, BLOCK)
    valid = ((a // n_win)[:, None] == (a // n_win)[None, :]) & (a < G * n_win)[:, None] & \
        (a < G * n_win)[None, :]
    return _to_device(_bin_gather_index(ta.flatten(), tc.flatten(), valid, (gh, gw)), device)


@functools.lru_cache(maxsize=64)
def _dbias_plan(n_win: int, nW: int, B: int, BM: int, BN: int, group_diagonals: bool,
                target: int, table_gh_gw: Optional[Tuple[int, int]], device: str):
    """Slots (tile pairs, or whole tile diagonals when every pair on one shares offsets),
    programs (contiguous runs of one slot's iterations), and the index tensors that reduce the
    per-program partials: programs -> slots (sum), slots -> table rows (gather + sum)."""
    Tm, Tn = cdiv(n_win, BM), cdiv(n_win, BN)
    if group_diagonals and BM != BN:
        raise ValueError(f"tile diagonals share offsets only for square tiles, got {BM}x{BN}")
    if group_diagonals:
        slots = [(max(t, 0), max(-t, 0), min(Tm - max(t, 0), Tn - max(-t, 0)))
                 for t in range(-(Tn - 1), Tm)]
    else:
        slots = [(i, j, 1) for i in range(Tm) for j in range(Tn)]
    iters = [p * nW * B for _, _, p in slots]
    per = max(1, cdiv(sum(iters), max(target, len(slots))))
    plan, members = [], []
    for s, total in enumerate(iters):
        ids = []
        for it0 in range(0, total, per):
            ids.append(len(plan))
            plan.append((s, it0, min(it0 + per, total)))
        members.append(ids)
    P = len(plan)
    width = max(len(m) for m in members)
    slot_index = torch.full((len(slots), width), P, dtype=torch.long)  # P: the zero row
    for s, ids in enumerate(members):
        slot_index[s, :len(ids)] = torch.tensor(ids)
    bins = None
    if table_gh_gw is not None:
        # every program's [BM, BN] partial maps to table rows through its slot's tile pair:
        # bins index the raw [P, BM, BN] partials, programs of a slot in order
        i0 = torch.tensor([slots[s][0] for s, _, _ in plan])[:, None, None]
        j0 = torch.tensor([slots[s][1] for s, _, _ in plan])[:, None, None]
        ta = (i0 * BM + torch.arange(BM)[None, :, None]).expand(P, BM, BN)
        tc = (j0 * BN + torch.arange(BN)[None, None, :]).expand(P, BM, BN)
        valid = (ta < n_win) & (tc < n_win)
        bins = _to_device(_bin_gather_index(ta.flatten(), tc.flatten(), valid, table_gh_gw),
                          device)
    return (_to_device(torch.tensor(plan, dtype=torch.int32), device),
            _to_device(torch.tensor(slots, dtype=torch.int32), device),
            _to_device(slot_index, device), bins, P)


def _reduce_slots(partial: torch.Tensor, slot_index: torch.Tensor, N: int) -> torch.Tensor:
    """[H, P, BM, BN] per-program partials of the dbias kernel -> [H, N, N] dense-bias
    gradient, summed in a fixed order."""
    H, P, BM, BN = partial.shape
    part = torch.cat([partial.reshape(H, P, BM * BN), partial.new_zeros(H, 1, BM * BN)], dim=1)
    per_slot = part[:, slot_index].sum(2)                     # [H, S, BM * BN]
    Tm, Tn = cdiv(N, BM), cdiv(N, BN)
    return per_slot.reshape(H, Tm, Tn, BM, BN).permute(0, 1, 3, 2, 4).reshape(
        H, Tm * BM, Tn * BN)[:, :N, :N]


@functools.lru_cache(maxsize=64)
def _ds_table_plan(N: int, n_win: int, gh: int, gw: int, BN: int, span_pad: int, device: str):
    """How the dK/dV kernel's ds partial (ACC_DS) reduces into the table: the partial of one
    head and batch group is [key tiles, BN, span_pad] (key i * BN + x, query lo_i + r of key
    tile i's span); summed over the groups, each table row gathers its elements.
    Returns (bins [R, k] into that flattened partial, its element count L)."""
    Tn = -(-N // BN)
    i = torch.arange(Tn)[:, None, None]
    x = torch.arange(BN)[None, :, None]
    r = torch.arange(span_pad)[None, None, :]
    c = i * BN + x                                       # key (virtual token)
    lo = (i * BN // n_win) * n_win
    hi = ((torch.clamp(i * BN + BN, max=N) - 1) // n_win + 1) * n_win
    a = lo + r                                           # query
    valid = (c < N) & (a < hi) & (a // n_win == c // n_win)
    bins = _code(a % n_win, gw) - _code(c % n_win, gw) + (gh - 1) * (2 * gw - 1) + gw - 1
    R = (2 * gh - 1) * (2 * gw - 1)
    return (_to_device(_index_of_bins(torch.where(valid, bins, 0), valid, R), device),
            Tn * BN * span_pad)
