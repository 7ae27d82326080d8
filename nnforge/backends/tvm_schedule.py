"""Default (untuned) CPU schedules for the TVM backend, as dlight-style schedule rules.

TVM 0.27's dlight has only GEMV and Reduction rules for CPUs: matmuls, convolutions and elementwise
kernels would stay naive single-threaded loops (~100x slower than eager PyTorch), and its Reduction
rule made softmax over a symbolic length ~9x slower than no schedule at all. The rules here need no
tuning and are tried in order on every fused kernel:

- ``CPUMatmul``: any matmul-like kernel (batched, broadcast, with fused prologue/epilogue; convolutions
  arrive here as im2col + matmul) is normalised to ``C[S, I, J] += A[S, I, K] * B[S, K, J]``, padded
  to whole micro-tiles and tiled into a register-blocked micro-kernel: MR rows x NR columns (two
  vector registers) of accumulators held in registers across K, the epilogue applied per tile, tiles
  spread over threads. About 220 GFLOP/s per core on AVX-512 for transformer-sized matmuls. NR is a
  power of two (other widths made LLVM's tile code 10-40x slower); a matmul with 1-4 rows (batch-1
  linear layers: GEMV, memory bound) takes wide tiles so each row of the weight is read in long runs.
- ``CPURowwise``: softmax, layer norm, pooling and other reductions: rows in parallel, row loops left
  for LLVM to vectorise (a pooling window's output row stays out of the parallel loop, innermost).
- ``CPUElementwise``: injective kernels: outer loops in parallel, innermost left to LLVM (split by the
  width of a fused reshape, as in im2col, so its index divisions become loops).
- ``CPUWinogradOutput``: the output transform of a Winograd convolution (tvm_winograd) with its fused
  epilogue: one 2x2 output tile per step, tiles along a row left to LLVM (interleaved stores).
- ``CPUDepthwiseConv`` (tvm_depthwise.py): the direct depthwise convolution kernel with its fused
  epilogue: channels in parallel, the window unrolled into vector multiply-adds over output rows.
- dlight's ``cpu.GEMV`` for what is left.

A rule that fails, or whose result TVM's verifier rejects, does not apply (the kernel falls through
to the next rule), so a schedule problem can cost speed but never a build.

``schedule_passes(target, name)``: "default" (the above), "dlight" (dlight's CPU rules only, for
comparison) or "none".
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.analysis import verify_well_formed
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.dlight.gpu.matmul import (
    IterKind,
    IterTrait,
    detect_iter_traits,
    get_reduction_blocks,
    make_iter_fusion_index_map,
)
from tvm.sym import Analyzer
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width
from tvm.tirx.analysis import undefined_vars

from .tvm_winograd import OUTPUT_BLOCK as WINOGRAD_OUTPUT
from .tvm_winograd import TILES_BLOCK as WINOGRAD_TILES

MAX_INLINED_CHARS = 40_000  # printed size of a block past which inlining stops (see _inline)
COSTLY_CHARS = 1_000  # a value this long (exp/erf/tanh polynomials) is worth storing, not recomputing


def _inline(sch, block, reverse: bool = False) -> bool:
    """``compute_inline`` (or ``reverse_compute_inline``) ``block`` unless that fails or would blow up.

    Inlining copies the producer's expression into every read of it. fast_exp reads its input about
    12 times, a NaN-keeping clamp twice, so exp(clamp(exp(clamp(x)))) became a 400 kB expression
    that TVM's StmtSimplify never finished (and a 15 kB one took it 15 s). Like XLA's fusion, a costly
    value that its consumer reads more than once stays stored instead of being recomputed.
    """
    trial = sch.copy()
    try:
        grown = trial.get_producers(block) if reverse else trial.get_consumers(block)
        before = sum(len(str(trial.get(b))) for b in grown)
        stmt = trial.get(block).body
        value = len(str(stmt.value)) if isinstance(stmt, tirx.BufferStore) else 0
        (trial.reverse_compute_inline if reverse else trial.compute_inline)(block)
    except Exception:  # noqa: BLE001  (not inlinable: the last block, or one read by several)
        return False
    after = [len(str(trial.get(b))) for b in grown]
    if max(after, default=0) > MAX_INLINED_CHARS:
        return False
    if not reverse and value > COSTLY_CHARS and sum(after) - before > 1.5 * value:
        return False
    if reverse and not all(_writes_in_bounds(trial.get(b)) for b in grown):
        return False
    (sch.reverse_compute_inline if reverse else sch.compute_inline)(block)
    return True


def _writes_in_bounds(block) -> bool:
    """Every buffer write of ``block`` at a plain block variable stays inside the buffer along that axis.

    TVM's reverse_compute_inline takes an epilogue that reads only some rows of the matmul (``y[:, 0]``
    after a linear) and writes it for every row the matmul computes: past the end of the output.
    """
    domains = {iv.var: iv.dom.extent for iv in block.iter_vars}
    analyzer = Analyzer()
    for w in block.writes:
        for r, dim in zip(w.region, w.source.shape):
            extent = domains.get(r.min)
            if extent is not None and not analyzer.can_prove(extent <= dim):
                return False
    return True


def _is_cpu(target: Target) -> bool:
    return target.kind.name == "llvm"


def _int(x):
    return int(x.value) if isinstance(x, tirx.IntImm) else (x if isinstance(x, int) else None)


def vector_lanes(target: Target, dtype_bits: int) -> int:
    bits = llvm_get_vector_width(target)
    bits = bits if bits and bits > 0 else 128
    return max(bits // dtype_bits, 1)


def _innermost_kind(region, kinds):
    """The iter kind of the variable indexing a buffer region's innermost non-unit axis."""
    for r in reversed(list(region.region)):
        used = [v for v in kinds if _uses(r.min, v)]
        if used:
            return kinds[used[-1]]
    return None


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in undefined_vars(expr))


def _pick_nr(n_j, lanes: int, nr_vectors: int) -> int:
    """Columns per micro-kernel: a power of two, for a static J one that divides J (no padding).

    Other widths (28, 40, 48, 49 columns) made LLVM's code for the MR-row tile 10-40x slower
    (measured on znver5: a 14x14 convolution with 28 columns ran at 8 GFLOP/s, padded to 32 at
    180), so a J without a power-of-two divisor of at least 8 is padded instead."""
    want = lanes * nr_vectors
    if n_j is None:
        return want
    pow2 = n_j & -n_j  # the largest power of two dividing J
    if n_j <= want and pow2 == n_j:
        return n_j
    if pow2 >= min(8, lanes):
        return min(pow2, want)
    return want if n_j > want else min(want, 1 << (n_j - 1).bit_length())  # pad J


GEMV_NR_VECTORS = 16  # one row of A (batch-1 linear): a wide J tile, so each row of B is read in long runs


def pick_gemv_nr(n_j, lanes: int, n_i: int = 1):
    """Columns per tile for a matmul with 1-4 rows (GEMV-like, memory bound): wide whole-vector
    tiles, so each row of B is read in long runs (narrow ones touched a new page per row: 2048^2
    at 14 GB/s, at 256 columns 80), with the accumulators still in registers: 16 vectors for one
    row, 4 for up to 4 rows. One row also takes a multiple of 8 up to 4 vectors (1000 columns: 40;
    with more rows such widths are 10x slower). Never a width that needs J padding, which would
    copy B, the weight, on every call."""
    if n_j is None:
        return None
    most = GEMV_NR_VECTORS if n_i == 1 else 4
    for d in range(min(n_j, lanes * most), 0, -1):
        if n_j % d == 0 and d % lanes == 0:
            return d
    for d in range(min(n_j, 4 * lanes), 7, -1) if n_i == 1 else ():
        if n_j % d == 0 and d % 8 == 0:
            return d
    return None


def _vector_registers(target: Target) -> int:
    """Architectural vector registers: 32 with AVX-512 or on AArch64, else 16."""
    if "aarch64" in str(target.attrs.get("mtriple", "")):
        return 32
    return 32 if (llvm_get_vector_width(target) or 0) >= 512 else 16


def _pick_mr(n_i, registers: int, nr_vectors: int, default: int) -> int:
    """Rows per micro-kernel: MR x NR accumulators + NR B vectors + 1 broadcast must fit the
    registers; for a static I prefer a row count that divides it (no padding)."""
    most = max(1, (registers - nr_vectors - 1) // max(nr_vectors, 1))
    if n_i is not None and n_i <= min(default, most):
        return n_i
    choices = [m for m in (6, 8, 7, 5, 4, 3) if m <= most] or [most]
    if n_i is not None:
        for m in choices:
            if n_i % m == 0:
                return m
    return min(default, most)


def _divides(factor: int, extent) -> bool:
    if factor == 1:
        return True
    v = _int(extent)
    if v is not None:
        return v % factor == 0
    # a symbolic extent may still be a known multiple (batch * 3136)
    return Analyzer().can_prove_equal(tirx.floormod(extent, factor), 0)


class CPURule(ScheduleRule):
    """A rule for llvm targets whose ``_apply(func, target)`` returns a schedule or None; checked
    (``_checked``): a rule that fails or whose result TVM's verifier rejects does not apply."""

    def is_target_available(self, target: Target) -> bool:
        return _is_cpu(target)

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        return _checked(self._apply, func, target)

    def _apply(self, func, target: Target):
        raise NotImplementedError


@dataclass
class MatmulConfig:
    mr: int = 6  # rows per micro-kernel
    nr_vectors: int = 2  # vector registers per row (NR = nr_vectors * lanes)


class CPUMatmul(CPURule):
    """Register-blocked, packed, parallel schedule for matmul-like kernels on llvm targets.

    1. Normalise to C[S, I, J] += A[S, I, K] * B[S, K, J] (reindex + layout transforms).
    2. Pad I (and a symbolic or awkward J) to whole micro-tiles, so that the inner loops carry no
       bound checks: A is copied once into a zero-padded buffer, C is computed into a padded buffer.
    3. Loops (S, J/NR) parallel, I/MR, K, then MR rows (unrolled) x NR columns (vectorised): the
       MR x NR accumulators live in registers across the K loop.
    4. The epilogue (bias, activation, residual add) runs per tile on the way out.
    B is used in place when it is already J-contiguous, else (a transposed operand such as k in
    q @ k^T) packed once into a J-contiguous copy.
    """

    def __init__(self, config: MatmulConfig | None = None):
        self.config = config or MatmulConfig()

    def _apply(self, func, target: Target):  # noqa: C901
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        red = get_reduction_blocks(sch, sch.get_child_blocks(root))
        if not red:
            return None
        main = red[0]
        stmt = sch.get(main)
        traits = _iter_traits(stmt)
        if traits is None:
            return None
        out_dtype = str(stmt.writes[0].source.dtype)
        if out_dtype not in ("float32", "float16", "float64"):
            return None
        a_traits, b_traits, c_traits, block_traits = traits
        kinds = {iv.var: t.kind for iv, t in zip(stmt.iter_vars, block_traits)}
        b_j_inner = _innermost_kind(stmt.reads[1], kinds) == IterKind.kIter_J
        S_, I_, J_, K_ = IterKind.kIter_S, IterKind.kIter_I, IterKind.kIter_J, IterKind.kIter_K
        try:
            ra = sch.reindex(main, ("read", 0))
            rb = sch.reindex(main, ("read", 1))
            rc = sch.reindex(main, ("write", 0))
            sch.transform_layout(ra, ("write", 0), make_iter_fusion_index_map(a_traits, [S_, I_, K_]))
            sch.transform_layout(rb, ("write", 0), make_iter_fusion_index_map(b_traits, [S_, K_, J_]))
            sch.transform_layout(rc, ("read", 0), make_iter_fusion_index_map(c_traits, [S_, I_, J_]))
            sch.transform_block_layout(main, make_iter_fusion_index_map(block_traits, [S_, I_, J_, K_]))
        except Exception:  # noqa: BLE001  (an access pattern reindex cannot take, e.g. convolution windows)
            return None

        # blocks beside the matmul (a causal mask built from iota, a broadcast bias) are inlined into
        # their users, so that the epilogue has no producer left outside the tile loops
        _inline_side_blocks(sch, main)

        lanes = vector_lanes(target, tvm.runtime.DataType(out_dtype).bits)
        cfg = self.config
        s, i, j, k = sch.get_loops(main)
        n_i, n_j = _int(sch.get(i).extent), _int(sch.get(j).extent)
        nr = pick_gemv_nr(n_j, lanes, n_i) if n_i is not None and n_i <= 4 else None
        nr = nr or _pick_nr(n_j, lanes, cfg.nr_vectors)
        mr = _pick_mr(n_i, _vector_registers(target), nr // lanes if nr % lanes == 0 else cfg.nr_vectors, cfg.mr)
        ext_i, ext_j = sch.get(i).extent, sch.get(j).extent
        pad_i = not _divides(mr, ext_i)
        pad_j = not _divides(nr, ext_j)
        if pad_i or pad_j:
            sch.pad_einsum(main, [1, mr if pad_i else 1, nr if pad_j else 1, 1])
        # producers: A (re-index, maybe padded) and B (re-index, maybe padded)
        a_blocks = _chain_producers(sch, main, 0)
        b_blocks = _chain_producers(sch, main, 1)
        self._producers(sch, a_blocks, inline_ok=not pad_i, lanes=lanes)
        self._producers(sch, b_blocks, inline_ok=b_j_inner and not pad_j, lanes=lanes)

        s, i, j, k = sch.get_loops(main)
        io, ii = sch.split(i, [None, mr])
        jo, ji = sch.split(j, [None, nr])
        sch.reorder(s, jo, io, k, ii, ji)
        _dequantize_per_panel(sch, b_blocks, jo, lanes)  # low-bit weights (ops/lowbit.py): see the function
        acc = sch.cache_write(main, 0, "local")
        # Inline the output chain (re-index, epilogue) first, then move it under the row-tile loop:
        # in the other order TVM 0.27 loses bound checks. With padding, the chain is inlined into the
        # copy-out of the padded result (whose domain is the unpadded one), never into the padded
        # write-back, which reverse_compute_inline would let write the padding rows out of bounds.
        if pad_i or pad_j:
            (out,) = sch.get_consumers(acc)
            _inline_consumers(sch, out)
            tail = [acc] + _chain_consumers(sch, acc)
        else:
            _inline_consumers(sch, acc)
            tail = [acc] + _chain_consumers(sch, acc)
        for b in tail:
            sch.reverse_compute_at(b, io, preserve_unit_loops=True)
        for b in tail:
            _vectorize_inner(sch, b, lanes)
        sch.unroll(ii)
        sch.vectorize(ji)
        sch.parallel(sch.fuse(s, jo))
        sch.decompose_reduction(main, k)
        return sch

    @staticmethod
    def _producers(sch, blocks, inline_ok: bool, lanes: int):
        """Inline a pure re-index; otherwise compute the copy once at the root, in parallel."""
        for b in blocks:
            if inline_ok and _inline(sch, b):
                continue
            # a padding block reads the re-index block: inline that one into it
            for p in sch.get_producers(b):
                _inline(sch, p)
            if inline_ok is False:
                _parallel_vectorize(sch, b, lanes)
                return  # the rest was inlined into this one


def _iter_traits(stmt):
    """dlight's ``detect_iter_traits``, also for a matmul with no I axis (one row of A: a GEMV such
    as a batch-1 linear layer), which dlight rejects; I then becomes a unit axis."""
    traits = detect_iter_traits(stmt)
    if traits is not None or len(stmt.reads) != 2 or len(stmt.writes) != 1:
        return traits
    regions = [stmt.reads[0].region, stmt.reads[1].region, stmt.writes[0].region]
    if any(_int(r.extent) != 1 for reg in regions for r in reg):
        return None
    a, b, c = ({v for r in reg for v in undefined_vars(r.min)} for reg in regions)
    kinds = {}
    for iv in stmt.iter_vars:
        v = iv.var
        if _int(iv.dom.extent) == 1:
            kind = IterKind.kIter_T
        elif iv.iter_type == tirx.IterVar.DataPar and v in a and v in b and v in c:
            kind = IterKind.kIter_S
        elif iv.iter_type == tirx.IterVar.DataPar and v in b and v in c and v not in a:
            kind = IterKind.kIter_J
        elif iv.iter_type == tirx.IterVar.CommReduce and v in a and v in b and v not in c:
            kind = IterKind.kIter_K
        else:
            return None
        kinds[v] = IterTrait(kind, iv.dom.extent)
    if {t.kind for t in kinds.values()} & {IterKind.kIter_J, IterKind.kIter_K} != {IterKind.kIter_J, IterKind.kIter_K}:
        return None
    pick = lambda axes: [kinds[iv.var] for iv in stmt.iter_vars if iv.var in axes]  # noqa: E731
    return pick(a), pick(b), pick(c), [kinds[iv.var] for iv in stmt.iter_vars]


def _dequantize_per_panel(sch, b_blocks, jo, lanes: int) -> None:
    """Low-bit weights (ops/lowbit.py, _qmatmul): a packed B computed from integer codes (int8, or int4
    nibbles in uint8; the dequantize is inlined into the pack) is computed per K x NR column panel under
    ``jo`` instead of whole at the root. Each panel is dequantized once and read by every row tile, the
    weights stay int8/uint8 in memory, and no full float copy of them is made per call. The panel's
    loops come out as (row of W = column of the panel, k): swapped, so the vector loop writes whole panel
    rows (measured ~2x less dequantize overhead than vector loads along k and scattered writes)."""
    for b in b_blocks:
        try:
            reads = sch.get(b).reads
        except Exception:  # noqa: BLE001  (inlined into the matmul: nothing is packed)
            continue
        if all(str(r.source.dtype).startswith("float") for r in reads):
            continue
        sch.compute_at(b, jo, preserve_unit_loops=True)
        loops = sch.get_loops(b)
        sch.reorder(loops[-1], loops[-2])
        _vectorize_inner(sch, b, lanes)


def _chain_producers(sch, block, read_index: int) -> list:
    """Producer blocks feeding ``block``'s read ``read_index``, nearest first."""
    buf = sch.get(block).reads[read_index].source
    out = []
    for p in sch.get_producers(block):
        if any(w.source.same_as(buf) for w in sch.get(p).writes):
            out.append(p)
    return out


def _checked(fn, func, target):
    """Run a schedule function; any failure or ill-formed result means "not applicable" (the
    kernel then falls through to the next rule), never a broken build."""
    try:
        sch = fn(func, target)
    except Exception:  # noqa: BLE001
        return None
    if sch is None:
        return None
    try:
        if not verify_well_formed(sch.mod["main"], assert_mode=False):
            return None
    except Exception:  # noqa: BLE001
        return None
    return sch


def _ancestors(sch, block) -> list:
    out, frontier = [], [block]
    while frontier:
        nxt = []
        for b in frontier:
            for p in sch.get_producers(b):
                out.append(p)
                nxt.append(p)
        frontier = nxt
    return out


def _inline_side_blocks(sch, main) -> None:
    """Inline spatial blocks that are neither before nor after the matmul (independent inputs of
    the epilogue), so that the epilogue can follow the matmul's tiles."""
    root = sch.get_sblock("root")
    related = {sch.get(b).name_hint for b in _ancestors(sch, main) + _chain_consumers(sch, main)}
    related.add(sch.get(main).name_hint)
    for b in sch.get_child_blocks(root):
        if sch.get(b).name_hint in related or not _is_spatial(sch, b):
            continue
        _inline(sch, b)


def _inline_consumers(sch, block) -> None:
    """Inline every spatial consumer (re-index copies, elementwise epilogue) into ``block``."""
    changed = True
    while changed:
        changed = False
        chain = _chain_consumers(sch, block)
        for c in chain:  # first fold elementwise steps into their own consumers (x * f(x) patterns)
            changed |= _inline(sch, c)
        for c in _chain_consumers(sch, block):
            changed |= _inline(sch, c, reverse=True)


def _chain_consumers(sch, block) -> list:
    out, frontier = [], [block]
    while frontier:
        nxt = []
        for b in frontier:
            for c in sch.get_consumers(b):
                out.append(c)
                nxt.append(c)
        frontier = nxt
    return out


def _vectorize_inner(sch, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    e = _int(sch.get(inner).extent)
    if e is None or e < 2:
        return
    if e % lanes == 0 and e > lanes:
        _, v = sch.split(inner, [None, lanes])
        sch.vectorize(v)
    elif e <= 4 * lanes:
        sch.vectorize(inner)


def _parallel_vectorize(sch, block, lanes: int) -> None:
    """A spatial block at the root: parallel over all but the innermost axis, vectorise that one."""
    loops = sch.get_loops(block)
    if len(loops) > 1:
        sch.parallel(sch.fuse(*loops[:-1]))
    _vectorize_inner(sch, block, lanes)


class CPURowwise(CPURule):
    """Kernels with reductions that are not matmuls: softmax, layer/RMS norm, pooling, sums.

    Elementwise steps that feed other elementwise steps are folded into them; values a reduction
    reads stay stored (a reduction over a recomputed value does not vectorise without reassociation,
    and would recompute exp/erf per element scalar). When every block works along the same innermost
    row (softmax, layer norm) one parallel loop runs over the rows and each block computes its row
    under it (``_fuse_rows``); otherwise every block runs its leading spatial axes in parallel. Static
    elementwise rows are vectorised explicitly (``_vectorize_row``), the reductions left to LLVM.
    (dlight's cpu.Reduction splits the row loops by the vector width instead, which with a symbolic
    row length leaves bound checks inside every vector: softmax became ~9x slower than no schedule.)
    """

    def _apply(self, func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or all(bi.is_injective() for bi in infos):
            return None
        for bi in infos[:-1]:
            if bi.is_injective() and all(_is_spatial(sch, c) for c in sch.get_consumers(bi.block_rv)):
                _inline(sch, bi.block_rv)
        fused = _fuse_rows(sch.copy(), target)
        if fused is not None:
            return fused
        self._per_block(sch, target)
        return sch

    def _per_block(self, sch, target):
        lanes = vector_lanes(target, 32)
        for bi in normalize_prim_func(sch):
            dk = bi.dom_kind()
            lead = len(dk) - len(dk.lstrip("S"))
            loops = sch.get_loops(bi.block_rv)
            if len(loops) != len(dk):
                continue
            if _is_window(sch, loops, dk, lead):
                lead -= 1  # the output row stays out of the parallel loop
            lead = min(lead, len(loops) - 1)  # the innermost loop stays for LLVM to vectorise
            if lead <= 0:
                continue
            extents = [_int(sch.get(lp).extent) for lp in loops[:lead]]
            if all(e is not None for e in extents) and _prod(extents) < 4:
                continue
            sch.parallel(sch.fuse(*loops[:lead]) if lead > 1 else loops[0])
            if bi.is_injective():
                _vectorize_row(sch, bi.block_rv, lanes)


def _fuse_rows(sch, target):
    """Softmax-like kernels (every block reduces or maps along the same innermost row): one parallel
    loop over the rows, under which each block computes its own row, so the intermediates (softmax's
    exp) are row-sized local buffers instead of tensors as large as the input, written and read back
    through memory (the digits ViT after merging, batch 256: 1.35x -> 1.48x). None: not such a kernel."""
    infos = normalize_prim_func(sch)
    if not infos or len(infos) < 2 or not infos[-1].is_injective():
        return None
    last = infos[-1]
    rows = len(last.dom_kind()) - 1
    if rows < 1 or any(
        len(bi.dom_kind()) not in (rows, rows + 1) or not bi.dom_kind()[:rows] == "S" * rows for bi in infos
    ):
        return None
    loops = sch.get_loops(last.block_rv)
    if len(loops) != rows + 1:
        return None
    try:
        row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
        for bi in reversed(infos[:-1]):
            sch.compute_at(bi.block_rv, row, preserve_unit_loops=True)
    except Exception:  # noqa: BLE001  (not a row-wise pattern after all)
        return None
    for bi in infos[:-1]:  # each producer computes just this row (a mean over another axis would be redone per row)
        if any(_int(sch.get(lp).extent) != 1 for lp in sch.get_loops(bi.block_rv)[1 : 1 + rows]):
            return None
    sch.parallel(row)
    lanes = vector_lanes(target, 32)
    for bi in infos:
        if bi.is_injective():
            _vectorize_row(sch, bi.block_rv, lanes)
    return sch


def _vectorize_row(sch, block, lanes: int) -> None:
    """Vectorise a spatial block's static innermost loop explicitly, four vectors at a time (as LLVM's
    own vectoriser interleaves them). Left to LLVM, rows shorter than its 4 vectors stayed scalar:
    softmax over 49 keys took 3.3 ns an element, over 64 keys 0.74. A row that is not a multiple of
    the chunk is partitioned into whole chunks and one shorter vector for the tail."""
    loops = sch.get_loops(block)
    e = _int(sch.get(loops[-1]).extent) if loops else None
    if e is None or e < 2:
        return
    chunk = 4 * lanes if e >= 4 * lanes else lanes
    whole = e - e % chunk
    if whole in (0, e):
        body = loops[-1]
    else:
        body, tail = sch.loop_partition(loops[-1], [whole, None])
        sch.vectorize(tail)
    if whole > chunk:
        _, body = sch.split(body, [None, chunk])
    sch.vectorize(body)


def _is_window(sch, loops, dk: str, lead: int) -> bool:
    """A pooling-like block: a small constant window (e.g. max pool 3x3) reduced per output, with a
    static output row of 8 or more. Its last output axis must stay out of the parallel loop: LLVM
    unrolls the window and vectorises along the row (fused in, max pool ran 4x slower)."""
    last = _int(sch.get(loops[lead - 1]).extent) if lead >= 1 else None
    window = [_int(sch.get(lp).extent) for lp in loops[lead:]]
    return (
        dk == "S" * lead + "R" * len(window)
        and bool(window)
        and last is not None
        and last >= 8
        and all(e is not None and e <= 16 for e in window)
    )


def _is_spatial(sch, block) -> bool:
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


PARALLEL_MIN_ELEMENTS = 1 << 14  # smaller static kernels stay single-threaded


class CPUElementwise(CPURule):
    """Injective kernels (elementwise chains, transposes, gathers, im2col): elementwise steps are
    inlined, then the outer loops run in parallel; the innermost loop is left to LLVM, which
    vectorises it where the access pattern allows."""

    def _apply(self, func, target):
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
        if not blocks or not all(_is_spatial(sch, b) for b in blocks):
            return None
        for b in blocks[:-1]:
            _inline(sch, b)
        for b in sch.get_child_blocks(root):
            loops = sch.get_loops(b)
            if len(loops) < 2:
                continue
            extents = [_int(sch.get(lp).extent) for lp in loops]
            if all(e is not None for e in extents) and _prod(extents) < PARALLEL_MIN_ELEMENTS:
                continue
            sch.parallel(sch.fuse(*loops[:-1]))
        for b in sch.get_child_blocks(root):
            _split_by_inner_divisor(sch, b)
        return sch


class CPUWinogradOutput(CPURule):
    """tvm_winograd's output transform, tiles Z[n, o, ty, i, j, tx] from M[16, O, tiles] and then
    Y[n, o, y, x] = Z[.., y // 2, y % 2, x % 2, x // 2], with the elementwise epilogue fused after it
    (bias, residual add, activation). Per (image, channel) in parallel and per row of tiles, Z is
    computed into a small local buffer, the tile offsets i, j unrolled (so each of the 16 planes it
    reads is a constant) and vectorised over tx; then the two output rows are written vectorised over
    x, picking from Z. (Left to LLVM, the loop stayed scalar: 7 ns per output.)"""

    def _apply(self, func, target):
        sch = s_tir.Schedule(func)
        try:
            out, tiles = sch.get_sblock(WINOGRAD_OUTPUT), sch.get_sblock(WINOGRAD_TILES)
        except Exception:  # noqa: BLE001  (no such block: not a Winograd output kernel)
            return None
        _inline_consumers(sch, out)
        lanes = vector_lanes(target, 32)
        for b in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(b).name_hint not in (WINOGRAD_OUTPUT, WINOGRAD_TILES):  # what could not be inlined
                _parallel_vectorize(sch, b, lanes)
        n, o, y, x = sch.get_loops(out)
        yo, yi = sch.split(y, [None, 2])
        sch.parallel(sch.fuse(n, o))
        sch.compute_at(tiles, yo)
        sch.set_scope(tiles, 0, "local")
        i, j, tx = sch.get_loops(tiles)[-3:]
        sch.unroll(i)
        sch.unroll(j)
        sch.vectorize(tx)
        sch.unroll(yi)
        sch.vectorize(x)
        return sch


def _split_by_inner_divisor(sch, block) -> None:
    """Split the innermost loop by the largest constant its index is divided by (a fused reshape:
    im2col written as [N, C*kh*kw, OH*OW] reads x[.., j // OW * s + .., j % OW * s + ..]), so the
    division and remainder become loop variables instead of being computed per element."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extent = _int(sch.get(loops[-1]).extent)
    stmt = sch.get(block)
    if not extent or not stmt.iter_vars or _int(stmt.iter_vars[-1].dom.extent) != extent:
        return
    inner = stmt.iter_vars[-1].var  # the innermost loop is bound to the last block variable
    found = set()
    todo = [stmt.body] if isinstance(stmt.body, tirx.BufferStore) else []
    while todo:  # walk the stored expression (this TVM has no Python post_order_visit for TIR)
        e = todo.pop()
        if isinstance(e, (tirx.FloorDiv, tirx.FloorMod)) and _int(e.b) and _uses(e.a, inner):
            found.add(_int(e.b))
        for field in ("a", "b", "value", "condition", "true_value", "false_value"):
            if isinstance(getattr(e, field, None), tvm.ir.expr.Expr):
                todo.append(getattr(e, field))
        for field in ("args", "indices"):
            todo.extend(x for x in (getattr(e, field, None) or []) if isinstance(x, tvm.ir.expr.Expr))
    divisors = [c for c in found if 4 <= c < extent and extent % c == 0]  # (a shorter row would not vectorise)
    if divisors:
        sch.split(loops[-1], [None, max(divisors)])


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


class Guarded(ScheduleRule):
    """A rule from elsewhere (dlight's) made safe: an exception inside it means "not applicable".

    (dlight's cpu.GEMV asserts on a matmul whose reduction has extent 1, which would abort the build.)
    """

    def __init__(self, rule: ScheduleRule):
        self.rule = rule

    def is_target_available(self, target: Target) -> bool:
        return self.rule.is_target_available(target)

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        return _checked(lambda f, t: _one(self.rule.apply(f, t, tunable)), func, target)


def _one(result):
    return result[0] if isinstance(result, list) else result


def gpu_schedule_passes(target: Target) -> list:
    """TVM's default CUDA schedules (dlight's GPU rules, as its CUDA pipeline applies them), each
    guarded, so that a rule that asserts falls through to the next one instead of failing the build."""
    g = dl.gpu
    return [
        dl.ApplyDefaultSchedule(
            Guarded(g.Matmul()), Guarded(g.GEMV()), Guarded(g.Reduction()), Guarded(g.GeneralReduction()), g.Fallback()
        )
    ]


def schedule_passes(target: Target, schedule: str = "default") -> list:
    if schedule == "none":
        return []
    if schedule == "dlight":
        return [dl.ApplyDefaultSchedule(Guarded(dl.cpu.GEMV()), Guarded(dl.cpu.Reduction()))]
    from .tvm_depthwise import CPUDepthwiseConv  # (imports this module)

    return [
        dl.ApplyDefaultSchedule(
            CPUWinogradOutput(),
            CPUDepthwiseConv(),
            CPUMatmul(),
            CPURowwise(),
            CPUElementwise(),
            Guarded(dl.cpu.GEMV()),
        )
    ]
