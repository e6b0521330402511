"""CPU emulation of the CUDA grouped LoRA kernels' work decomposition (csrc/kernels/cuda).

Dimensions: T tokens, in input features, out output features, E experts, r rank; p a sorted
position (a token's place after the plan's stable sort by expert).

What is replayed, with the constants parsed from csrc/kernels/cuda/tiling.h:
- the plan (keys = expert + 1, a stable sort, segment bounds by lower bound);
- each kernel's grid, and inside each block the mapping of warps, lanes and threads to rows,
  columns and k: the tile loaders (16-byte vectors or scalars, tails, zero fill), the wmma
  fragments (pointers, leading dimensions and layouts, as wmma::load_matrix_sync reads them),
  the FMA micro-tiles, the epilogues, the gather kernels' windows of tokens in the caller's
  order and their runs, row slices, lane strides and sub-warps, the split-K partials and their
  ordered reductions;
- the ops layer's choices (csrc/ops/grouped_lora_cuda.cpp): kernel path, 16-byte-load
  eligibility, layouts, splits.
Blocks run in a Python loop; the threads of a block run vectorised as index arrays.

Memory is emulated: global buffers check every access against their bounds and every 16-byte
access against its alignment, and count the writes to each element; shared memory is poisoned
with NaN before each stage, so a read of an element the loaders never wrote shows up as NaN.

Arithmetic: dot products are summed in float64 and rounded to the accumulation type (the
hardware's summation order is not emulated); epilogues run in the accumulation type and round
to the element type as the kernels do. So results match the float64 reference to rounding,
and any indexing error shows as a wrong, missing, doubly written or NaN element.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

TILING_H = Path(__file__).resolve().parent.parent / "csrc" / "kernels" / "cuda" / "tiling.h"
_CONSTANT = re.compile(r"^\s*inline constexpr int64_t (k\w+) = (\d+);", re.MULTILINE)
REQUIRED = [
    "kVecBytes",
    "kSegThreads",
    "kSegTileM",
    "kSegTileN",
    "kSegTileK",
    "kSegWarpsM",
    "kSegWarpsN",
    "kMma",
    "kFmaThreadsN",
    "kSmemPad",
    "kAccPad",
    "kGatherThreads",
    "kGatherTokens",
    "kGatherShrinkRows",
    "kGatherShrinkK",
    "kGatherExpandRows",
    "kGatherMaxRank",
    "kGradTokensPerSplit",
    "kGradMaxSplits",
    "kGradMaxWorkspaceBytes",
    "kSegmentMinTokensPerExpert",
]
MAX_GRID_YZ = 65535  # grouped_lora_cuda.h kMaxGridYZ
STATIC_SMEM_LIMIT = 48 * 1024
ELEMENT_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}


def read_tiling(path=TILING_H):
    """The constants of tiling.h as attributes named as in C++ (t.kSegTileM)."""
    values = {name: int(value) for name, value in _CONSTANT.findall(Path(path).read_text())}
    missing = [name for name in REQUIRED if name not in values]
    assert not missing, f"{path}: constants missing or not plain integers: {missing}"
    return SimpleNamespace(**values)


def check_tiling(t):
    """The static_asserts of the kernels, for the parsed constants."""
    warps = t.kSegThreads // 32
    assert t.kSegThreads % 32 == 0 and t.kSegWarpsM * t.kSegWarpsN == warps, "one warp per warp tile"
    assert (t.kSegTileM // t.kSegWarpsM) % t.kMma == 0 and (t.kSegTileN // t.kSegWarpsN) % t.kMma == 0
    assert t.kSegTileK % t.kMma == 0, "BK is whole fragments"
    assert t.kSegThreads % t.kFmaThreadsN == 0 and t.kSegTileM % (t.kSegThreads // t.kFmaThreadsN) == 0
    assert t.kSegTileN % t.kFmaThreadsN == 0, "the FMA micro-tiles cover the block tile"
    assert t.kSmemPad % 8 == 0 and (t.kSegTileN + t.kAccPad) % 4 == 0, "wmma leading dimensions"
    for dtype in ELEMENT_BYTES:
        SegmentKernel(t, dtype)  # loader divisibility and shared-memory size
    gather_warps = t.kGatherThreads // 32
    assert t.kGatherThreads % 32 == 0 and t.kGatherShrinkRows % gather_warps == 0
    assert (t.kGatherShrinkRows // gather_warps) * t.kGatherTokens <= 32, "one lane per (row, token) sum"
    assert t.kGatherShrinkK % (32 * 8) == 0, "whole vectors per lane"
    assert t.kGatherExpandRows % t.kGatherThreads == 0, "whole row steps down to W = 1"
    for dtype, size in ELEMENT_BYTES.items():
        assert t.kGatherTokens * t.kGatherShrinkK * size <= STATIC_SMEM_LIMIT
        assert t.kGatherTokens * t.kGatherMaxRank * acc_bytes(dtype) <= STATIC_SMEM_LIMIT


def ceil_div(a, b):
    return -(-a // b)


def vec_elems(t, dtype):
    return t.kVecBytes // ELEMENT_BYTES[dtype]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_bytes(dtype):
    return 8 if dtype == torch.float64 else 4


def is_half_like(dtype):
    return dtype in (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Emulated memory
# ---------------------------------------------------------------------------------------------


class Buffer:
    """A global allocation: flat values of one dtype starting `base` elements past a 256-byte
    aligned address. Checks bounds and 16-byte alignment; counts writes per element."""

    def __init__(self, values, base=0):
        self.values = values.reshape(-1).clone()
        self.base = base
        self.writes = torch.zeros(self.values.numel(), dtype=torch.int64)

    @property
    def dtype(self):
        return self.values.dtype

    def _check(self, idx, what):
        if idx.numel():
            assert int(idx.min()) >= 0 and int(idx.max()) < self.values.numel(), f"{what} out of bounds"

    def load(self, idx):
        self._check(idx, "load")
        return self.values[idx]

    def load_vec(self, idx, width):
        """16-byte loads at element offsets idx: [n] -> [n, width]."""
        if idx.numel():
            byte = (self.base + idx) * ELEMENT_BYTES[self.dtype]
            assert bool((byte % 16 == 0).all()), "misaligned 16-byte global load"
        lanes = idx[:, None] + torch.arange(width)
        self._check(lanes, "vector load")
        return self.values[lanes]

    def store(self, idx, values):
        self._check(idx, "store")
        self.values[idx] = values.to(self.dtype)
        self.writes.index_put_((idx,), torch.ones_like(idx), accumulate=True)


@dataclass
class Ptr:
    buf: Buffer
    start: int = 0  # elements from the buffer's first element

    def aligned(self, ld, dtype, t):
        """vec_ok: 16-byte aligned rows start + i * ld."""
        byte = (self.buf.base + self.start) * ELEMENT_BYTES[dtype]
        return byte % t.kVecBytes == 0 and ld % vec_elems(t, dtype) == 0


class Shared:
    """A shared-memory array, poisoned with NaN; counts the writes of the current stage."""

    def __init__(self, numel, dtype, byte_offset=0):
        self.values = torch.full((numel,), float("nan"), dtype=torch.float64)
        self.dtype = dtype
        self.byte_offset = byte_offset  # from the block's 128-byte aligned shared memory
        self.writes = torch.zeros(numel, dtype=torch.int64)

    def poison(self):
        self.values.fill_(float("nan"))
        self.writes.zero_()

    def byte(self, idx):
        return self.byte_offset + idx * ELEMENT_BYTES[self.dtype]

    def store(self, idx, values):
        assert int(idx.min()) >= 0 and int(idx.max()) < self.values.numel(), "shared store out of bounds"
        self.values[idx] = values.double()
        self.writes.index_put_((idx,), torch.ones_like(idx), accumulate=True)

    def load(self, idx):
        assert int(idx.min()) >= 0 and int(idx.max()) < self.values.numel(), "shared load out of bounds"
        return self.values[idx]


@dataclass
class RowSource:
    """Rows of a row-major operand with unit column stride: row(p) = perm[p] or p."""

    ptr: Ptr
    ld: int
    perm: torch.Tensor = None
    vec: bool = False

    def row_offsets(self, p):
        rows = self.perm[p] if self.perm is not None else p
        return self.ptr.start + rows * self.ld


# ---------------------------------------------------------------------------------------------
# The plan (grouped_lora_plan.cu)
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    tokens: int
    experts: int
    perm: torch.Tensor  # [T] token at sorted position p
    sorted_keys: torch.Tensor  # [T] ascending
    seg_begin: torch.Tensor  # [E + 2]


def key_bits(E):
    bits = 1
    while bits < 31 and (1 << bits) <= E:
        bits += 1
    return bits


def make_plan(expert_ids, E):
    ids = expert_ids.long()
    keys = torch.where((ids >= 0) & (ids < E), ids + 1, torch.zeros_like(ids))
    assert keys.numel() == 0 or int(keys.max()) < (1 << key_bits(E)), "the radix sort's bits miss a key"
    sorted_keys, perm = torch.sort(keys, stable=True)
    seg_begin = torch.searchsorted(sorted_keys, torch.arange(E + 2), right=False)
    return Plan(ids.numel(), E, perm, sorted_keys, seg_begin)


# ---------------------------------------------------------------------------------------------
# Segment kernel (grouped_lora_sgmv.cu)
# ---------------------------------------------------------------------------------------------


class SegmentKernel:
    def __init__(self, t, dtype):
        self.t, self.dtype = t, dtype
        self.BM, self.BN, self.BK = t.kSegTileM, t.kSegTileN, t.kSegTileK
        self.threads, self.pad = t.kSegThreads, t.kSmemPad
        self.ldc = self.BN + t.kAccPad
        self.V = vec_elems(t, dtype)
        self.mma = is_half_like(dtype)
        self.acc = acc_dtype(dtype)
        size = ELEMENT_BYTES[dtype]
        self.p_elems = max(self.BM * (self.BK + self.pad), self.BK * (self.BM + self.pad))
        self.q_elems = max(self.BN * (self.BK + self.pad), self.BK * (self.BN + self.pad))
        assert self.p_elems * size % 128 == 0, "Q starts 128-byte aligned"
        smem = max((self.p_elems + self.q_elems) * size, self.BM * self.ldc * acc_bytes(dtype))
        assert smem <= STATIC_SMEM_LIMIT, f"segment kernel needs {smem} bytes of static shared memory"
        for R, C in ((self.BM, self.BK), (self.BN, self.BK), (self.BK, self.BM), (self.BK, self.BN)):
            assert C % self.V == 0 and (R * C // self.V) % self.threads == 0, "whole vectors per thread"
            assert (R * C) % self.threads == 0, "whole elements per thread"
        self.P = Shared(self.p_elems, dtype, 0)
        self.Q = Shared(self.q_elems, dtype, self.p_elems * size)
        self.C = Shared(self.BM * self.ldc, self.acc, 0)

    # -- loaders ----------------------------------------------------------------------------

    def load_tile(self, R, C, dst, ld_dst, src, first, rows_valid, c0, cols):
        """load_tile<R, C>: element (i, c) = src.row(first + i)[c0 + c], zero outside."""
        tid = torch.arange(self.threads)
        V = self.V
        if src.vec:
            per_row = C // V
            v = (tid[None, :] + self.threads * torch.arange(R * per_row // self.threads)[:, None]).reshape(-1)
            row, c = v // per_row, (v % per_row) * V
            col = c0 + c
            value = torch.zeros(v.numel(), V, dtype=torch.float64)
            valid = row < rows_valid
            full = valid & (col + V <= cols)
            if full.any():
                offsets = src.row_offsets(first + row[full]) + col[full]
                value[full] = src.ptr.buf.load_vec(offsets, V).double()
            tail = valid & ~full
            for q in range(V):
                m = tail & (col + q < cols)
                if m.any():
                    value[m, q] = src.ptr.buf.load(src.row_offsets(first + row[m]) + col[m] + q).double()
            start = row * ld_dst + c
            assert bool((dst.byte(start) % 16 == 0).all()), "misaligned 16-byte shared store"
            dst.store((start[:, None] + torch.arange(V)).reshape(-1), value.reshape(-1))
        else:
            idx = (tid[None, :] + self.threads * torch.arange(R * C // self.threads)[:, None]).reshape(-1)
            row, c = idx // C, idx % C
            col = c0 + c
            value = torch.zeros(idx.numel(), dtype=torch.float64)
            m = (row < rows_valid) & (col < cols)
            if m.any():
                value[m] = src.ptr.buf.load(src.row_offsets(first + row[m]) + col[m]).double()
            dst.store(row * ld_dst + c, value)

    def check_tile_written(self, dst, R, C, ld_dst):
        region = (torch.arange(R)[:, None] * ld_dst + torch.arange(C)).reshape(-1)
        assert bool((dst.writes[region] == 1).all()), "the loader left or doubled an element of the tile"
        assert int(dst.writes.sum()) == R * C, "the loader wrote outside the tile"

    # -- cores ------------------------------------------------------------------------------

    # The cores keep accumulators per owner, as registers: the tensor-core path one 16x16
    # fragment per (warp, i, j), the FMA path a micro-tile per thread. step() and store() each
    # work out which tile elements an owner's accumulators stand for, as the kernel's two loops
    # do; if they disagreed, results would land in the wrong places.

    def _warp_fragments(self):
        """Per warp: the first row of each of its fragment rows [W, FM] and the first column of
        each of its fragment columns [W, FN] (MmaCore: row0 + i * kMma, col0 + j * kMma)."""
        t, f = self.t, self.t.kMma
        warps = torch.arange(self.threads // 32)
        row0 = (warps // t.kSegWarpsN) * (self.BM // t.kSegWarpsM)
        col0 = (warps % t.kSegWarpsN) * (self.BN // t.kSegWarpsN)
        fm = row0[:, None] + torch.arange(self.BM // t.kSegWarpsM // f) * f
        fn = col0[:, None] + torch.arange(self.BN // t.kSegWarpsN // f) * f
        return fm, fn

    def _micro_tiles(self):
        """Per thread: its micro-tile's rows [threads, mM] and columns [threads, mN] (FmaCore)."""
        t = self.t
        tid = torch.arange(self.threads)
        micro_m = self.BM // (self.threads // t.kFmaThreadsN)
        micro_n = self.BN // t.kFmaThreadsN
        m = (tid // t.kFmaThreadsN)[:, None] * micro_m + torch.arange(micro_m)
        n = (tid % t.kFmaThreadsN)[:, None] + t.kFmaThreadsN * torch.arange(micro_n)
        return m, n

    def core_init(self):
        if self.mma:
            fm, fn = self._warp_fragments()
            f = self.t.kMma
            return torch.zeros(fm.shape[0], fm.shape[1], fn.shape[1], f, f, dtype=torch.float64)
        m, n = self._micro_tiles()
        return torch.zeros(m.shape[0], m.shape[1], n.shape[1], dtype=torch.float64)

    def core_step(self, acc, k_major):
        """One BK step of the core on the staged tiles, into the owners' accumulators."""
        ldp = self.BM + self.pad if k_major else self.BK + self.pad
        ldq = self.BN + self.pad if k_major else self.BK + self.pad
        if self.mma:
            self._mma_step(acc, k_major, ldp, ldq)
        else:
            self._fma_step(acc, k_major, ldp, ldq)

    def _mma_step(self, acc, k_major, ldp, ldq):
        f = self.t.kMma
        m, n = self._warp_fragments()  # [W, FM], [W, FN]
        a16 = torch.arange(f)
        for ld in (ldp, ldq):
            assert ld * ELEMENT_BYTES[self.dtype] % 16 == 0, "wmma ldm must be a 16-byte multiple"
        for kk in range(0, self.BK, f):
            a_ptr = kk * ldp + m if k_major else m * ldp + kk
            b_ptr = kk * ldq + n if k_major else n * ldq + kk
            assert bool((self.P.byte(a_ptr) % 32 == 0).all()), "wmma matrix_a pointer not 256-bit aligned"
            assert bool((self.Q.byte(b_ptr) % 32 == 0).all()), "wmma matrix_b pointer not 256-bit aligned"
            # matrix_a (M x K): row_major (i, k) at i * ld + k; col_major at i + k * ld.
            if k_major:
                a_idx = a_ptr[..., None, None] + a16[:, None] + a16[None, :] * ldp
            else:
                a_idx = a_ptr[..., None, None] + a16[:, None] * ldp + a16[None, :]
            # matrix_b (K x N): row_major (k, j) at k * ld + j; col_major at k + j * ld.
            if k_major:
                b_idx = b_ptr[..., None, None] + a16[:, None] * ldq + a16[None, :]
            else:
                b_idx = b_ptr[..., None, None] + a16[:, None] + a16[None, :] * ldq
            A = self.P.load(a_idx.reshape(-1)).reshape(a_idx.shape)  # [W, FM, 16 m, 16 k]
            B = self.Q.load(b_idx.reshape(-1)).reshape(b_idx.shape)  # [W, FN, 16 k, 16 n]
            pairs = acc.shape  # [W, FM, FN, 16, 16]
            acc += torch.bmm(
                A[:, :, None].expand(pairs).reshape(-1, f, f), B[:, None].expand(pairs).reshape(-1, f, f)
            ).reshape(pairs)

    def _fma_step(self, acc, k_major, ldp, ldq):
        m, n = self._micro_tiles()  # [threads, mM], [threads, mN]
        k = torch.arange(self.BK)
        a_idx = k * ldp + m[..., None] if k_major else m[..., None] * ldp + k  # [threads, mM, BK]
        b_idx = k * ldq + n[..., None] if k_major else n[..., None] * ldq + k
        a = self.P.load(a_idx.reshape(-1)).reshape(a_idx.shape)
        b = self.Q.load(b_idx.reshape(-1)).reshape(b_idx.shape)
        acc += torch.bmm(a, b.transpose(1, 2))  # [threads, mM, mN]

    def core_store(self, acc):
        """core.store: each owner's accumulators, rounded to the accumulation type, to C
        [BM][ldc]. An element no owner stores stays NaN; one stored twice is caught."""
        self.C.poison()
        if self.mma:  # store_matrix_sync(c_s + row * ldc + col, frag, ldc, mem_row_major)
            f = self.t.kMma
            fm, fn = self._warp_fragments()
            ptrs = fm[:, :, None] * self.ldc + fn[:, None, :]  # [W, FM, FN]
            assert bool((self.C.byte(ptrs) % 32 == 0).all()), "wmma store pointer not 256-bit aligned"
            a16 = torch.arange(f)
            idx = ptrs[..., None, None] + a16[:, None] * self.ldc + a16[None, :]  # [W, FM, FN, 16, 16]
        else:  # c_s[(m0 + i) * ldc + n0 + j * kFmaThreadsN] = acc[i][j]
            m, n = self._micro_tiles()
            idx = m[:, :, None] * self.ldc + n[:, None, :]
        rows, cols = idx // self.ldc, idx % self.ldc
        assert bool((rows < self.BM).all() and (cols < self.BN).all()), "a core element outside the tile"
        self.C.store(idx.reshape(-1), acc.reshape(-1).to(self.acc))
        assert int(self.C.writes.max()) <= 1, "two owners store one accumulator"

    def epilogue_indices(self):
        """(row, col) of each thread's epilogue elements: idx = tid + threads * i < BM * BN."""
        tid = torch.arange(self.threads)
        idx = tid[None, :] + self.threads * torch.arange(ceil_div(self.BM * self.BN, self.threads))[:, None]
        idx = idx.reshape(-1)
        idx = idx[idx < self.BM * self.BN]
        return idx // self.BN, idx % self.BN

    def read_c(self, row, col):
        value = self.C.load(row * self.ldc + col)
        assert not bool(value.isnan().any()), "the epilogue read an accumulator the core never stored"
        return value.to(self.acc)

    # -- forward ----------------------------------------------------------------------------

    def forward(self, plan, p_src, weight, N, K, q_vec, out, ld_out, expand, scales=None, accumulate=False):
        """segment_forward_kernel over its whole grid."""
        T = plan.tokens
        tiles_n = ceil_div(N, self.BN)
        assert tiles_n <= MAX_GRID_YZ
        for bx in range(ceil_div(T, self.BM)):
            for by in range(tiles_n):
                w0, n0 = bx * self.BM, by * self.BN
                w1 = min(T, w0 + self.BM)
                for key in range(int(plan.sorted_keys[w0]), int(plan.sorted_keys[w1 - 1]) + 1):
                    s0 = max(w0, int(plan.seg_begin[key]))
                    s1 = min(w1, int(plan.seg_begin[key + 1]))
                    if s0 >= s1:
                        continue
                    if key == 0:
                        if expand and not accumulate:
                            self._zero_rows(plan, out, ld_out, N, s0, s1 - s0, n0)
                        continue
                    self._forward_pass(
                        plan,
                        p_src,
                        weight,
                        N,
                        K,
                        q_vec,
                        out,
                        ld_out,
                        expand,
                        scales,
                        accumulate,
                        key - 1,
                        s0,
                        s1 - s0,
                        n0,
                    )

    def _forward_pass(self, plan, p_src, weight, N, K, q_vec, out, ld_out, expand, scales, accumulate, e, s0, rows, n0):
        acc = self.core_init()
        q_src = RowSource(Ptr(weight.buf, weight.start + e * N * K), K, None, q_vec)
        n_valid = min(self.BN, N - n0)
        ld = self.BK + self.pad
        for k0 in range(0, K, self.BK):
            self.P.poison()
            self.Q.poison()
            self.load_tile(self.BM, self.BK, self.P, ld, p_src, s0, rows, k0, K)
            self.load_tile(self.BN, self.BK, self.Q, ld, q_src, n0, n_valid, k0, K)
            self.check_tile_written(self.P, self.BM, self.BK, ld)
            self.check_tile_written(self.Q, self.BN, self.BK, ld)
            self.core_step(acc, k_major=False)
        self.core_store(acc)
        row, col = self.epilogue_indices()
        keep = (row < rows) & (col < n_valid)
        row, col = row[keep], col[keep]
        value = self.read_c(row, col)
        if expand:
            dst = out.start + plan.perm[s0 + row] * ld_out + n0 + col
            base = out.buf.load(dst).to(self.acc) if accumulate else torch.zeros_like(value)
            out.buf.store(dst, base + scales[e].to(self.acc) * value)
        else:
            out.buf.store(out.start + (s0 + row) * ld_out + n0 + col, value)

    def _zero_rows(self, plan, out, ld_out, N, s0, rows, n0):
        row, col = self.epilogue_indices()
        keep = (row < rows) & (col < min(self.BN, N - n0))
        row, col = row[keep], col[keep]
        out.buf.store(out.start + plan.perm[s0 + row] * ld_out + n0 + col, torch.zeros(row.numel()))

    # -- weight gradient --------------------------------------------------------------------

    def weight_grad(self, plan, L, R, M, N, scales, dW, ws, splits):
        """segment_weight_grad_kernel over its grid, then the ordered reduction if split."""
        E = plan.experts
        tiles_n = ceil_div(N, self.BN)
        assert E <= MAX_GRID_YZ and splits <= MAX_GRID_YZ
        for bx in range(ceil_div(M, self.BM) * tiles_n):
            m0, n0 = bx // tiles_n * self.BM, bx % tiles_n * self.BN
            for e in range(E):
                seg0, seg1 = int(plan.seg_begin[e + 1]), int(plan.seg_begin[e + 2])
                chunk = ceil_div(ceil_div(seg1 - seg0, splits), self.BK) * self.BK
                for split in range(splits):
                    t_begin = min(seg1, seg0 + split * chunk)
                    t_end = min(seg1, t_begin + chunk)
                    self._grad_block(plan, L, R, M, N, scales, dW, ws, splits, m0, n0, e, split, t_begin, t_end)
        if splits > 1:
            total = E * M * N
            i = torch.arange(total)
            s = torch.zeros(total, dtype=self.acc)
            for sp in range(splits):  # in order
                s = s + ws.buf.load(ws.start + sp * total + i).to(self.acc)
            dW.buf.store(dW.start + i, scales[i // (M * N)].to(self.acc) * s)

    def _grad_block(self, plan, L, R, M, N, scales, dW, ws, splits, m0, n0, e, split, t_begin, t_end):
        acc = self.core_init()
        for t0 in range(t_begin, t_end, self.BK):
            rows = min(self.BK, t_end - t0)
            self.P.poison()
            self.Q.poison()
            self.load_tile(self.BK, self.BM, self.P, self.BM + self.pad, L, t0, rows, m0, M)
            self.load_tile(self.BK, self.BN, self.Q, self.BN + self.pad, R, t0, rows, n0, N)
            self.check_tile_written(self.P, self.BK, self.BM, self.BM + self.pad)
            self.check_tile_written(self.Q, self.BK, self.BN, self.BN + self.pad)
            self.core_step(acc, k_major=True)
        self.core_store(acc)
        row, col = self.epilogue_indices()
        keep = (row < min(self.BM, M - m0)) & (col < min(self.BN, N - n0))
        row, col = row[keep], col[keep]
        value = self.read_c(row, col)
        offset = (e * M + m0 + row) * N + n0 + col
        if splits == 1:
            dW.buf.store(dW.start + offset, scales[e].to(self.acc) * value)
        else:
            ws.buf.store(ws.start + split * plan.experts * M * N + offset, value)


# ---------------------------------------------------------------------------------------------
# Gather kernel (grouped_lora_bgmv.cu)
# ---------------------------------------------------------------------------------------------


@dataclass
class Ids:
    """expert_ids as the gather kernels read them, in token order: key = id + 1, 0 for -1 or an
    id outside [0, E)."""

    tokens: int
    keys: torch.Tensor  # [T]


def gather_ids(expert_ids, E):
    ids = expert_ids.long()
    return Ids(ids.numel(), torch.where((ids >= 0) & (ids < E), ids + 1, torch.zeros_like(ids)))


def scan_runs(ids, w0, w1):
    """The runs of consecutive equal keys in tokens [w0, w1): (key, begin, end), as the gather
    kernels find them (run_end: scan the window's staged keys)."""
    runs, pos = [], w0
    while pos < w1:
        end = pos + 1
        while end < w1 and int(ids.keys[end]) == int(ids.keys[pos]):
            end += 1
        runs.append((int(ids.keys[pos]), pos, end))
        pos = end
    return runs


def lanes_per_row(vectors):
    w = 1
    while w < 32 and w < vectors:
        w *= 2
    return w


def gather_splits(t, in_features):
    return ceil_div(in_features, t.kGatherShrinkK)


class GatherKernel:
    def __init__(self, t, dtype):
        self.t, self.dtype = t, dtype
        self.threads, self.G = t.kGatherThreads, t.kGatherTokens
        self.warps = self.threads // 32
        self.KC = t.kGatherShrinkK
        self.rows_per_warp = t.kGatherShrinkRows // self.warps
        self.V = vec_elems(t, dtype)
        self.acc = acc_dtype(dtype)
        self.xs = Shared(self.G * self.KC, dtype)
        self.vs = Shared(self.G * t.kGatherMaxRank, self.acc)

    def shrink(self, ids, x, ldx, A, in_features, r, partials, vec):
        """gather_shrink_kernel over grid (windows, row tiles, splits)."""
        t, T = self.t, ids.tokens
        splits = gather_splits(t, in_features)
        assert splits <= MAX_GRID_YZ
        for bx in range(ceil_div(T, self.G)):
            w0 = bx * self.G
            w1 = min(T, w0 + self.G)
            for bz in range(splits):
                k0 = bz * self.KC
                k1 = min(in_features, k0 + self.KC)
                self._stage_x(ids, x, ldx, w0, w1, k0, k1)
                for by in range(ceil_div(r, t.kGatherShrinkRows)):
                    for key, pos, end in scan_runs(ids, w0, w1):
                        if key > 0:
                            self._shrink_run(
                                ids, A, in_features, r, partials, vec, key - 1, pos - w0, end - pos, by, bz, k0, k1, w0
                            )

    def _stage_x(self, ids, x, ldx, w0, w1, k0, k1):
        self.xs.poison()
        i = (
            torch.arange(self.threads)[None, :]
            + self.threads * torch.arange(ceil_div(self.G * self.KC, self.threads))[:, None]
        )
        i = i.reshape(-1)
        i = i[i < self.G * self.KC]
        pos, k = w0 + i // self.KC, k0 + i % self.KC
        value = torch.zeros(i.numel(), dtype=torch.float64)
        m = (pos < w1) & (k < k1)
        if m.any():
            value[m] = x.buf.load(x.start + pos[m] * ldx + k[m]).double()
        self.xs.store(i, value)
        assert bool((self.xs.writes == 1).all()), "x staging left or doubled an element"

    def _shrink_run(self, ids, A, in_features, r, partials, vec, e, g0, nt, by, bz, k0, k1, w0):
        t, G, V = self.t, self.G, self.V
        R = self.rows_per_warp
        width, steps = (V, self.KC // (32 * V)) if vec else (1, self.KC // 32)
        # Every (warp, row i, step u, lane) of the unrolled loops at once.
        warp = torch.arange(self.warps)[:, None, None, None]
        i = torch.arange(R)[None, :, None, None]
        u = torch.arange(steps)[None, None, :, None]
        lane = torch.arange(32)[None, None, None, :]
        j = by * t.kGatherShrinkRows + warp * R + i  # row of A
        k = k0 + (lane + 32 * u) * width  # first element of the lane's load
        j, k = torch.broadcast_tensors(j, k)
        active = (j < r) & (k < k1)  # the kernel's `break`s
        owner = (warp * R + i).expand_as(active)[active]  # (warp, row) whose sum it joins
        jj, kk = j[active], k[active]
        a_e = A.start + e * r * in_features
        if vec:
            assert bool((kk + V <= k1).all()), "a vector crosses the slice end"
            w = A.buf.load_vec(a_e + jj * in_features + kk, V).double()  # [n, V]
        else:
            w = A.buf.load(a_e + jj * in_features + kk).double()[:, None]
        # The butterfly leaves each (warp, row)'s sum over lanes and steps in every lane.
        sums = torch.zeros(self.warps * R, G, dtype=torch.float64)
        for g in range(min(G, nt)):
            start = (g0 + g) * self.KC + (kk - k0)
            if vec:
                assert bool((self.xs.byte(start) % 16 == 0).all()), "misaligned shared vector load"
            xv = self.xs.load((start[:, None] + torch.arange(width)).reshape(-1)).reshape(-1, width)
            sums[:, g].index_add_(0, owner, (w * xv).sum(1))
        sums = sums.reshape(self.warps, R, G)
        j_first = by * t.kGatherShrinkRows + torch.arange(self.warps) * R  # [W]
        for i in range(R):
            for g in range(G):
                assert i * G + g < 32, "the writing lane"
                j = j_first + i
                keep = (j < r) & (g < nt)
                if keep.any():
                    dst = partials.start + (bz * ids.tokens + w0 + g0 + g) * r + j[keep]
                    partials.buf.store(dst, sums[keep, i, g].to(self.acc))

    def expand(self, ids, partials, splits, B, scales, out, r, y, ldy, accumulate, vec):
        """gather_expand_kernel over grid (windows, row tiles)."""
        t, T = self.t, ids.tokens
        assert r <= t.kGatherMaxRank
        tiles = ceil_div(out, t.kGatherExpandRows)
        assert tiles <= MAX_GRID_YZ
        W = lanes_per_row(r // self.V if vec else r)
        for bx in range(ceil_div(T, self.G)):
            w0 = bx * self.G
            w1 = min(T, w0 + self.G)
            self._stage_v(ids, partials, splits, r, w0, w1)
            for by in range(tiles):
                o0 = by * t.kGatherExpandRows
                for key, pos, end in scan_runs(ids, w0, w1):
                    if key > 0:
                        self._expand_run(
                            ids, B, scales, out, r, y, ldy, accumulate, vec, W, key - 1, pos - w0, end - pos, w0, o0
                        )
                    elif not accumulate:
                        nt, rows = end - pos, t.kGatherExpandRows
                        i = torch.arange(nt * rows)
                        o = o0 + i % rows
                        m = o < out
                        y.buf.store(y.start + (pos + i[m] // rows) * ldy + o[m], torch.zeros(int(m.sum())))

    def _stage_v(self, ids, partials, splits, r, w0, w1):
        self.vs.poison()
        t = self.t
        i = (
            torch.arange(self.threads)[None, :]
            + self.threads * torch.arange(ceil_div(self.G * r, self.threads))[:, None]
        )
        i = i.reshape(-1)
        i = i[i < self.G * r]
        g, j = i // r, i % r
        pos = w0 + g
        value = torch.zeros(i.numel(), dtype=self.acc)
        m = pos < w1
        m[m.clone()] = ids.keys[pos[m]] > 0
        if m.any():
            s = torch.zeros(int(m.sum()), dtype=self.acc)
            for sp in range(splits):  # in order
                s = s + partials.buf.load(partials.start + (sp * ids.tokens + pos[m]) * r + j[m]).to(self.acc)
            value[m] = s.to(self.dtype).to(self.acc)  # V rounded to the input dtype
        self.vs.store(g * t.kGatherMaxRank + j, value)

    def _expand_run(self, ids, B, scales, out, r, y, ldy, accumulate, vec, W, e, g0, nt, w0, o0):
        t, G, V = self.t, self.G, self.V
        rows_per_warp = 32 // W
        tid = torch.arange(self.threads)
        warp, lane = tid // 32, tid % 32
        sub, lw = lane // W, lane % W
        b_e = B.start + e * out * r
        scale = scales[e].to(self.acc)
        width = V if vec else 1
        for base in range(o0, o0 + t.kGatherExpandRows, self.warps * rows_per_warp):
            o = base + warp * rows_per_warp + sub  # [threads]
            acc = torch.zeros(self.threads, G, dtype=torch.float64)
            jv = 0
            while True:  # the j loop: j = lw * width + jv * W * width while j < r
                j = lw * width + jv * W * width
                active = (o < out) & (j < r)
                if not active.any():
                    break
                oo, jj = o[active], j[active]
                if vec:
                    assert bool((jj + V <= r).all())
                    b = B.buf.load_vec(b_e + oo * r + jj, V).double()
                else:
                    b = B.buf.load(b_e + oo * r + jj).double()[:, None]
                for g in range(min(G, nt)):
                    v = self.vs.load(((g0 + g) * t.kGatherMaxRank + jj)[:, None] + torch.arange(width))
                    assert not bool(v.isnan().any()), "the expand read a V element nobody staged"
                    acc[active, g] += (b * v).sum(1)
                jv += 1
            # Sub-warp butterfly: lanes of one (warp, sub) share the sum.
            group = warp * rows_per_warp + sub
            sums = torch.zeros(self.warps * rows_per_warp, G, dtype=torch.float64).index_add_(0, group, acc)
            writer = (lw == 0) & (o < out)
            for g in range(min(G, nt)):
                tok = w0 + g0 + g
                dst = y.start + tok * ldy + o[writer]
                value = sums[group[writer], g].to(self.acc)
                prior = y.buf.load(dst).to(self.acc) if accumulate else torch.zeros_like(value)
                y.buf.store(dst, prior + scale * value)


# ---------------------------------------------------------------------------------------------
# The ops layer (grouped_lora_cuda.cpp), end to end
# ---------------------------------------------------------------------------------------------


def use_segment_path(t, T, E, r, path="auto"):
    if r > t.kGatherMaxRank:
        return True
    if path != "auto":
        return path == "segment"
    return T >= t.kSegmentMinTokensPerExpert * min(T, max(E, 1))


def weight_grad_splits(t, dtype, T, E, M, N):
    per_expert = ceil_div(T, max(E, 1))
    splits = min(max(ceil_div(per_expert, t.kGradTokensPerSplit), 1), t.kGradMaxSplits)
    split_bytes = max(1, E * M * N * acc_bytes(dtype))
    splits = min(splits, max(1, t.kGradMaxWorkspaceBytes // split_bytes))
    return min(splits, MAX_GRID_YZ)


def strided_rows(matrix, ld=None, base=0):
    """A Buffer holding matrix [rows, cols] with row stride ld starting `base` elements past an
    aligned address (padding NaN: reading it would show), and the Ptr to its first row."""
    rows, cols = matrix.shape
    ld = cols if ld is None else ld
    flat = torch.full((base + max(rows - 1, 0) * ld + cols,), float("nan"), dtype=matrix.dtype)
    for i in range(rows):
        flat[base + i * ld : base + i * ld + cols] = matrix[i]
    return Ptr(Buffer(flat, base=0), base), ld


def _row_stride(T, cols, ld):
    return cols if T <= 1 else ld


@dataclass
class Emulated:
    result: torch.Tensor  # [T, out]
    writes: torch.Tensor  # [T, out] writes per element of y
    path: str


def grouped_lora(x, lora_a, lora_b, expert_ids, scales, y=None, *, path="auto", x_ld=None, x_base=0, t=None):
    """The CUDA op end to end: grouped_lora (y None: a poisoned output, every element must be
    written) or grouped_lora_add_ into y. x is laid out with row stride x_ld (default in),
    starting x_base elements past an aligned address."""
    t = read_tiling() if t is None else t
    dtype = x.dtype
    T, in_features = x.shape
    E, r, _ = lora_a.shape
    out = lora_b.shape[1]
    plan = make_plan(expert_ids, E)  # the segment kernel's; the gather kernel has none
    accumulate = y is not None
    y_init = y.clone() if accumulate else torch.full((T, out), float("nan"), dtype=dtype)
    y_buf = Buffer(y_init)
    x_ptr, ld = strided_rows(x, x_ld, x_base)
    ldx = _row_stride(T, in_features, ld)
    A = Ptr(Buffer(lora_a.contiguous()))
    B = Ptr(Buffer(lora_b.contiguous()))
    segment = use_segment_path(t, T, E, r, path)
    if T and E and r and in_features and out:
        if segment:
            kernel = SegmentKernel(t, dtype)
            v = Ptr(Buffer(torch.full((T * r,), float("nan"), dtype=dtype)))
            x_src = RowSource(x_ptr, ldx, plan.perm, x_ptr.aligned(ldx, dtype, t))
            kernel.forward(plan, x_src, A, r, in_features, A.aligned(in_features, dtype, t), v, r, expand=False)
            v_src = RowSource(v, r, None, v.aligned(r, dtype, t))
            kernel.forward(
                plan,
                v_src,
                B,
                out,
                r,
                B.aligned(r, dtype, t),
                Ptr(y_buf),
                out,
                expand=True,
                scales=scales,
                accumulate=accumulate,
            )
        else:
            kernel = GatherKernel(t, dtype)
            ids = gather_ids(expert_ids, E)  # no plan: token order
            splits = gather_splits(t, in_features)
            partials = Ptr(Buffer(torch.full((splits * T * r,), float("nan"), dtype=acc_dtype(dtype))))
            kernel.shrink(ids, x_ptr, ldx, A, in_features, r, partials, A.aligned(in_features, dtype, t))
            kernel.expand(ids, partials, splits, B, scales, out, r, Ptr(y_buf), out, accumulate, B.aligned(r, dtype, t))
    elif not accumulate:
        y_buf.values.zero_()  # at::zeros in the ops layer
        y_buf.writes.fill_(1)
    return Emulated(y_buf.values.reshape(T, out), y_buf.writes.reshape(T, out), "segment" if segment else "gather")


@dataclass
class EmulatedGrads:
    grad_a: torch.Tensor
    grad_b: torch.Tensor
    writes_a: torch.Tensor
    writes_b: torch.Tensor
    splits: tuple


def weight_grads(grad, x, lora_a, lora_b, expert_ids, scales, *, t=None, splits=None, x_ld=None):
    """_grouped_lora_weight_grads on CUDA end to end. `splits` overrides the (dA, dB) splits;
    x is laid out with row stride x_ld (default in)."""
    t = read_tiling() if t is None else t
    dtype = x.dtype
    T, in_features = x.shape
    E, r, _ = lora_a.shape
    out = lora_b.shape[1]
    plan = make_plan(expert_ids, E)
    kernel = SegmentKernel(t, dtype)
    x_ptr, ldx = strided_rows(x, x_ld)
    ldx = _row_stride(T, in_features, ldx)
    g_ptr, ldg = strided_rows(grad)
    ldg = _row_stride(T, out, ldg)
    A = Ptr(Buffer(lora_a.contiguous()))
    BT = Ptr(Buffer(lora_b.transpose(1, 2).contiguous()))  # [E, r, out]
    x_src = RowSource(x_ptr, ldx, plan.perm, x_ptr.aligned(ldx, dtype, t))
    g_src = RowSource(g_ptr, ldg, plan.perm, g_ptr.aligned(ldg, dtype, t))
    v = Ptr(Buffer(torch.full((T * r,), float("nan"), dtype=dtype)))
    u = Ptr(Buffer(torch.full((T * r,), float("nan"), dtype=dtype)))
    kernel.forward(plan, x_src, A, r, in_features, A.aligned(in_features, dtype, t), v, r, expand=False)
    kernel.forward(plan, g_src, BT, r, out, BT.aligned(out, dtype, t), u, r, expand=False)
    dA = Ptr(Buffer(torch.full((E * r * in_features,), float("nan"), dtype=dtype)))
    dB = Ptr(Buffer(torch.full((E * out * r,), float("nan"), dtype=dtype)))
    chosen = []
    for L, R, M, N, dW, forced in (
        (
            RowSource(u, r, None, u.aligned(r, dtype, t)),
            x_src,
            r,
            in_features,
            dA,
            None if splits is None else splits[0],
        ),
        (g_src, RowSource(v, r, None, v.aligned(r, dtype, t)), out, r, dB, None if splits is None else splits[1]),
    ):
        s = weight_grad_splits(t, dtype, T, E, M, N) if forced is None else forced
        chosen.append(s)
        ws = Ptr(Buffer(torch.full((s * E * M * N,), float("nan"), dtype=acc_dtype(dtype)))) if s > 1 else None
        kernel.weight_grad(plan, L, R, M, N, scales, dW, ws, s)
    return EmulatedGrads(
        dA.buf.values.reshape(E, r, in_features),
        dB.buf.values.reshape(E, out, r),
        dA.buf.writes.reshape(E, r, in_features),
        dB.buf.writes.reshape(E, out, r),
        tuple(chosen),
    )
