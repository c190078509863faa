// Fused per-sample dynamic convolution (inference, CPU): padnet.ops.fused.
//
// y[b, o, l] = sum_c (sum_k pi[b, k] * dyn[k, o, c] + sta[o, c]) * cols[b, c, l]
//
// cols is the unfolded input [B, CK, L] (im2col, made by the caller; `im2col` below is the fast one).
// The work items are (tile of OT output channels, group of SB samples) pairs, tile-major, split over
// torch's intra-op threads (at::parallel_for). Per item the input columns are walked in chunks of CC:
// the chunk's kernel rows are mixed for all SB samples into a per-thread buffer (each load of the K
// kernels serves SB samples; the next chunk's rows are prefetched into L2 meanwhile) and consumed at
// once by a register-blocked GEMM per sample: accumulators hold RB output channels x PV vectors of
// pixels, each step broadcasts RB kernel values and loads PV pixel vectors of cols. The B per-sample
// kernels are never written to memory. OT, SB and CC are arguments (padnet.ops.fused chooses them from
// the shape and the L2 size; the autotuner times the choices); the buffer's row stride is a compile-time
// constant per CC, so the broadcasts use immediate offsets.
// The factors come in their row layout [K, O, CK] or packed for the tiles (pack_fused_factors: per tile and
// chunk, the K kernels' rows interleaved by vector in one block), which the batch-1 calls use: there the
// kernel is bound by reading the factors, and a work item then reads one run in order.
//
// Portable C++: GCC/Clang vector extensions of the widest width the compiler targets
// (-march=native: 16 floats with AVX-512, 8 with AVX/AVX2, 4 otherwise); pixel counts that
// are not a multiple of the vector width finish with one overlapping vector (a scalar loop
// only below one vector of pixels).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // streaming stores (vstream); elsewhere plain stores
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int VBYTES = 64;
#elif defined(__AVX__)
constexpr int VBYTES = 32;
#else
constexpr int VBYTES = 16;
#endif

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(VBYTES)));
  static constexpr int N = VBYTES / sizeof(T);
};

template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline typename Vec<T>::type vzero() {
  return typename Vec<T>::type{};  // all lanes zero
}

// The register-blocked loops below are unrolled by hand-placed pragmas and must not be
// re-vectorised by the compiler's loop vectoriser (it would vectorise over c and spill the
// accumulators): the GEMM functions are compiled without it.
#define PADNET_NO_AUTOVEC __attribute__((optimize("no-tree-vectorize")))


// w[b][o, c] = sum_k pi[b, k] d[k * ks + o * os + c] (+ sta[o0 + o, c0 + c]) for b < nb, o < ot, c < cc:
// each vector of the K kernels is loaded once and mixed for all nb samples. d is the chunk's first entry in
// the row layout [K, O, CK]: dyn + (o0 * CK + c0), kernel k ks = O * CK entries on, row o os = CK entries on.
// Each load also prefetches, into L2, the entry pf entries further on (the same row's next chunk; past a
// short last chunk, the next row's start) unless it lies at or past pf_end (pf 0: none).
template <typename T>
void mix_rows(const T* pi, const T* d, int64_t ks, int64_t os, int64_t pf, const T* pf_end, const T* sta, T* w,
              int64_t ldw, int64_t wstride, int64_t nb, int64_t K, int64_t CK, int64_t o0, int64_t ot, int64_t c0,
              int64_t cc) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  constexpr int KMAX = 8;
  for (int64_t o = 0; o < ot; ++o) {
    const T* s = sta ? sta + (o0 + o) * CK + c0 : nullptr;
    const T* dr = d + o * os;
    int64_t c = 0;
    if (K <= KMAX) {
      for (; c + N <= cc; c += N) {
        V dk[KMAX];
        for (int64_t k = 0; k < K; ++k) dk[k] = vload<T>(dr + k * ks + c);
        if (pf > 0)
          for (int64_t k = 0; k < K; ++k)
            if (pf_end - (dr + k * ks + c) > pf) __builtin_prefetch(dr + k * ks + c + pf, 0, 2);
        const V sv = s ? vload<T>(s + c) : vzero<T>();
        for (int64_t b = 0; b < nb; ++b) {
          V acc = sv;
          const T* pb = pi + b * K;
          for (int64_t k = 0; k < K; ++k) acc += dk[k] * pb[k];
          vstore<T>(w + b * wstride + o * ldw + c, acc);
        }
      }
    }
    for (; c < cc; ++c) {
      for (int64_t b = 0; b < nb; ++b) {
        T acc = s ? s[c] : T(0);
        for (int64_t k = 0; k < K; ++k) acc += pi[b * K + k] * dr[k * ks + c];
        w[b * wstride + o * ldw + c] = acc;
      }
    }
  }
}

// mix_rows on the packed layout (pack_fused_factors): the chunk's block d holds, per row o < ot, K * cc entries:
// the nv = cc / N whole vectors of the K kernels interleaved ([v][k][lane]), then the K kernels' last cc - nv * N
// entries ([k][j]). A work item thus reads one stream in order; each load also prefetches, into L2, the entry
// pf entries further on (one block ahead) unless it lies at or past pf_end.
template <typename T>
void mix_rows_packed(const T* pi, const T* d, int64_t pf, const T* pf_end, const T* sta, T* w, int64_t ldw,
                     int64_t wstride, int64_t nb, int64_t K, int64_t CK, int64_t o0, int64_t ot, int64_t c0,
                     int64_t cc) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  constexpr int KMAX = 8;
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  const int64_t nv = cc / N, rem = cc - nv * N;
  for (int64_t o = 0; o < ot; ++o) {
    const T* s = sta ? sta + (o0 + o) * CK + c0 : nullptr;
    const T* dr = d + o * K * cc;
    if (K <= KMAX) {
      for (int64_t v = 0; v < nv; ++v) {
        const T* dv = dr + v * K * N;
        V dk[KMAX];
        for (int64_t k = 0; k < K; ++k) dk[k] = vload<T>(dv + k * N);
        for (int64_t q = 0; q < K * N; q += line)
          if (pf_end - (dv + q) > pf) __builtin_prefetch(dv + q + pf, 0, 2);
        const V sv = s ? vload<T>(s + v * N) : vzero<T>();
        for (int64_t b = 0; b < nb; ++b) {
          V acc = sv;
          const T* pb = pi + b * K;
          for (int64_t k = 0; k < K; ++k) acc += dk[k] * pb[k];
          vstore<T>(w + b * wstride + o * ldw + v * N, acc);
        }
      }
    } else {
      for (int64_t v = 0; v < nv; ++v)
        for (int64_t j = 0; j < N; ++j)
          for (int64_t b = 0; b < nb; ++b) {
            T acc = s ? s[v * N + j] : T(0);
            for (int64_t k = 0; k < K; ++k) acc += pi[b * K + k] * dr[(v * K + k) * N + j];
            w[b * wstride + o * ldw + v * N + j] = acc;
          }
    }
    const T* dt = dr + nv * K * N;
    for (int64_t j = 0; j < rem; ++j) {
      for (int64_t b = 0; b < nb; ++b) {
        T acc = s ? s[nv * N + j] : T(0);
        for (int64_t k = 0; k < K; ++k) acc += pi[b * K + k] * dt[k * rem + j];
        w[b * wstride + o * ldw + nv * N + j] = acc;
      }
    }
  }
}

// y_b[o0 + ob + i, l0 + p] = sum_c w[ob + i, c] cols_b[c, l0 + p], i < RB, p < PV * N (all full)
// With TAIL (PV == 1), only lanes [keep, N) are stored: the vector at l0 = L - N overlaps pixels that a full
// block has already written, and finishes the last L % N pixels without a scalar loop. Its accumulators load
// all N lanes, but the lanes it stores are not yet touched by this chunk, so accumulating stays exact.
template <typename T, int RB, int PV, int64_t ldw, bool TAIL = false>
PADNET_NO_AUTOVEC inline void gemm_block(const T* w, const T* cols_b, T* y_b, int64_t CK,
                                         int64_t L, int64_t row0, int64_t l0, bool accumulate, int64_t keep = 0) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  V acc[RB][PV];
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int p = 0; p < PV; ++p)
      acc[i][p] = accumulate ? vload<T>(y_b + (row0 + i) * L + l0 + p * N) : vzero<T>();
  const T* xp = cols_b + l0;
  for (int64_t c = 0; c < CK; ++c, xp += L) {
    V x[PV];
#pragma GCC unroll 4
    for (int p = 0; p < PV; ++p) x[p] = vload<T>(xp + p * N);
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const T wv = w[i * ldw + c];
#pragma GCC unroll 4
      for (int p = 0; p < PV; ++p) acc[i][p] += x[p] * wv;
    }
  }
  if (TAIL) {
    static_assert(!TAIL || PV == 1, "the tail block is one vector wide");
    for (int i = 0; i < RB; ++i) {
      T lanes[N];
      vstore<T>(lanes, acc[i][0]);
      std::memcpy(y_b + (row0 + i) * L + l0 + keep, lanes + keep, (N - keep) * sizeof(T));
    }
    return;
  }
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int p = 0; p < PV; ++p) vstore<T>(y_b + (row0 + i) * L + l0 + p * N, acc[i][p]);
}

// the same for rows [r0, r1) and pixels [l0, l1) of any size (edges), scalar
template <typename T>
void gemm_edge(const T* w, int64_t ldw, const T* cols_b, T* y_b, int64_t CK, int64_t L, int64_t row_base,
               int64_t r0, int64_t r1, int64_t l0, int64_t l1, bool accumulate) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* wr = w + r * ldw;
    for (int64_t l = l0; l < l1; ++l) {
      T acc = accumulate ? y_b[(row_base + r) * L + l] : T(0);
      for (int64_t c = 0; c < CK; ++c) acc += wr[c] * cols_b[c * L + l];
      y_b[(row_base + r) * L + l] = acc;
    }
  }
}

// one block of RB rows over the full vectors of pixels [0, lfull): PV vectors per step, then single vectors
template <typename T, int RB, int PV, int64_t ldw>
PADNET_NO_AUTOVEC inline void row_block(const T* w, const T* cols_b, T* y_b, int64_t CK, int64_t L, int64_t row0,
                                        int64_t lfull, bool accumulate) {
  constexpr int N = Vec<T>::N;
  const int64_t lp = (lfull / (PV * N)) * (PV * N);
  int64_t l0 = 0;
  for (; l0 < lp; l0 += PV * N) gemm_block<T, RB, PV, ldw>(w, cols_b, y_b, CK, L, row0, l0, accumulate);
  if (PV > 1)
    for (; l0 < lfull; l0 += N) gemm_block<T, RB, 1, ldw>(w, cols_b, y_b, CK, L, row0, l0, accumulate);
}

// the next smaller register block for a tile's leftover rows: 6 -> 3 -> 2 -> 1, otherwise halving
constexpr int next_rows(int rb) { return rb == 6 ? 3 : rb == 3 ? 2 : rb / 2; }

// rows [r, ot) in blocks of RB rows, the remainder in the smaller blocks of next_rows down to 1 (a row runs
// alone only where one is left over: 1 of a power of two, 1 or 4 of 6)
template <typename T, int RB, int PV, int64_t ldw>
PADNET_NO_AUTOVEC void row_blocks(const T* w, const T* cols_b, T* y_b, int64_t CK, int64_t L, int64_t o0, int64_t r,
                                  int64_t ot, int64_t lfull, bool accumulate) {
  for (; r + RB <= ot; r += RB) row_block<T, RB, PV, ldw>(w + r * ldw, cols_b, y_b, CK, L, o0 + r, lfull, accumulate);
  if constexpr (RB > 1) row_blocks<T, next_rows(RB), PV, ldw>(w, cols_b, y_b, CK, L, o0, r, ot, lfull, accumulate);
}

// the last L % N pixels (L >= N): one overlapping vector per block of rows
template <typename T, int RB, int64_t ldw>
PADNET_NO_AUTOVEC void tail_blocks(const T* w, const T* cols_b, T* y_b, int64_t CK, int64_t L, int64_t o0, int64_t r,
                                   int64_t ot, int64_t keep, bool accumulate) {
  constexpr int N = Vec<T>::N;
  for (; r + RB <= ot; r += RB)
    gemm_block<T, RB, 1, ldw, true>(w + r * ldw, cols_b, y_b, CK, L, o0 + r, L - N, accumulate, keep);
  if constexpr (RB > 1) tail_blocks<T, next_rows(RB), ldw>(w, cols_b, y_b, CK, L, o0, r, ot, keep, accumulate);
}

// register blocks (AVX-512 has 32 vector registers, AVX2/SSE 16: no spills in either):
// one vector of pixels (deep layers): 16 (8) rows x 1 vector; wide outputs with AVX-512: 4 rows x 4 vectors
// (8 loads per 16 FMAs); otherwise 8 (6) rows x 2 vectors. With 16 registers, 6 x 2 (12 accumulators, 8 loads
// per 12 FMAs) replaced 4 x 2, for which GCC folded the pixel loads into the FMAs (12 loads per 8 FMAs): the
// kernel with K = 1 at 256@8, batch 1, one thread, went from 2.42 to 1.52-1.68 ms against 1.10-1.32 ms for
// MKL's GEMM on the same operands (Zen 3, AVX2, scratch timing). The blocks change no sum's order.
constexpr int RB1 = VBYTES == 64 ? 16 : 8, RB2 = VBYTES == 64 ? 8 : 6;

enum class GemmPath { kWide4, kOneVector, kTwoVectors };

// which register blocks the GEMM runs for L output pixels per sample, N lanes per vector
inline GemmPath gemm_path(int64_t L, int64_t N) {
  if (VBYTES == 64 && L >= 4 * N) return GemmPath::kWide4;
  return L < 2 * N ? GemmPath::kOneVector : GemmPath::kTwoVectors;
}

// the height of the register block the GEMM runs for L output pixels per sample (the full-height blocks
// of a tile: padnet.ops.fused.fused_tiles makes tiles a multiple of it)
int64_t block_rows_for(int64_t L, int64_t itemsize) {
  TORCH_CHECK(itemsize == 4 || itemsize == 8, "register_block_rows: itemsize must be 4 (float32) or 8 (float64)");
  TORCH_CHECK(L >= 1, "register_block_rows: pixels must be positive");
  switch (gemm_path(L, VBYTES / itemsize)) {
    case GemmPath::kWide4: return 4;
    case GemmPath::kOneVector: return RB1;
    default: return RB2;
  }
}

// rows [0, ot) of the mixed tile times cols_b -> y_b rows [o0, o0 + ot)
template <typename T, int64_t ldw>
void gemm_tile(const T* w, const T* cols_b, T* y_b, int64_t CK, int64_t L, int64_t o0, int64_t ot, bool accumulate) {
  constexpr int N = Vec<T>::N;
  const int64_t lfull = (L / N) * N;
  const GemmPath path = gemm_path(L, N);
  if (path == GemmPath::kWide4) {
    if constexpr (VBYTES == 64) row_blocks<T, 4, 4, ldw>(w, cols_b, y_b, CK, L, o0, 0, ot, lfull, accumulate);
  } else if (path == GemmPath::kOneVector) {
    row_blocks<T, RB1, 1, ldw>(w, cols_b, y_b, CK, L, o0, 0, ot, lfull, accumulate);
  } else {
    row_blocks<T, RB2, 2, ldw>(w, cols_b, y_b, CK, L, o0, 0, ot, lfull, accumulate);
  }
  if (lfull < L && L >= N) {  // the tail in blocks of the tile's height (a multiple of the path's block)
    if (path == GemmPath::kOneVector) tail_blocks<T, RB1, ldw>(w, cols_b, y_b, CK, L, o0, 0, ot, N - (L - lfull), accumulate);
    else tail_blocks<T, RB2, ldw>(w, cols_b, y_b, CK, L, o0, 0, ot, N - (L - lfull), accumulate);
  } else if (lfull < L) {  // fewer pixels than one vector: scalar
    gemm_edge<T>(w, ldw, cols_b, y_b, CK, L, o0, 0, ot, lfull, L, accumulate);
  }
}

template <typename T, int64_t CC>
void fused_impl(const torch::Tensor& cols, const torch::Tensor& pi, const torch::Tensor& dyn, bool packed, int64_t K,
                int64_t O, const torch::Tensor& sta, torch::Tensor& y, int64_t OT, int64_t SB) {
  const int64_t B = cols.size(0), CK = cols.size(1), L = cols.size(2);
  const T* colsp = cols.data_ptr<T>();
  const T* pip = pi.data_ptr<T>();
  const T* dynp = dyn.data_ptr<T>();
  const T* dyn_end = dynp + K * O * CK;
  const T* stap = sta.defined() ? sta.data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const int64_t tiles = (O + OT - 1) / OT;
  const int64_t chunks = (B + SB - 1) / SB;
  // row stride of the mixed rows: a compile-time constant (the GEMM's broadcast loads then use immediate
  // offsets), whole cache lines plus one, so that the rows a GEMM step reads do not share a few L1 sets
  constexpr int64_t line = 64 / static_cast<int64_t>(sizeof(T));
  constexpr int64_t ldw = CC + line;
  const int64_t rows_max = std::min(OT, O), samples_max = std::min(SB, B);  // the buffer never exceeds the shape
  const int64_t wstride = rows_max * ldw;
  at::parallel_for(0, tiles * chunks, 1, [&](int64_t begin, int64_t end) {
    // per-thread buffer, kept between calls (a fresh one this size would be page-faulted in on every call)
    thread_local std::vector<T> wmem;
    const size_t need = static_cast<size_t>(samples_max * wstride + line);  // + one line: 64-byte aligned rows
    if (wmem.size() < need) wmem.resize(need);
    T* wbase = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(wmem.data()) + 63) & ~uintptr_t(63));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / chunks, b0 = (item % chunks) * SB;
      const int64_t o0 = t * OT, ot = std::min(OT, O - o0), nb = std::min(SB, B - b0);
      for (int64_t c0 = 0; c0 < CK; c0 += CC) {
        const int64_t cc = std::min(CC, CK - c0);
        if (packed) {  // one stream: the chunk's block, then the next chunk's (the next tile's after the last)
          const T* d = dynp + K * CK * o0 + K * ot * c0;
          mix_rows_packed<T>(pip + b0 * K, d, K * ot * cc, dyn_end, stap, wbase, ldw, wstride, nb, K, CK, o0, ot,
                             c0, cc);
        } else {
          mix_rows<T>(pip + b0 * K, dynp + o0 * CK + c0, O * CK, CK, c0 + CC < CK ? CC : 0, dyn_end, stap, wbase,
                      ldw, wstride, nb, K, CK, o0, ot, c0, cc);
        }
        for (int64_t b = 0; b < nb; ++b)
          gemm_tile<T, ldw>(wbase + b * wstride, colsp + (b0 + b) * CK * L + c0 * L, yp + (b0 + b) * O * L,
                       cc, L, o0, ot, c0 > 0);
      }
    }
  });
}

template <typename T>
void fused_dispatch(const torch::Tensor& cols, const torch::Tensor& pi, const torch::Tensor& dyn, bool packed,
                    int64_t K, int64_t O, const torch::Tensor& sta, torch::Tensor& y, int64_t OT, int64_t SB,
                    int64_t CC) {
  if (CC == 64) fused_impl<T, 64>(cols, pi, dyn, packed, K, O, sta, y, OT, SB);
  else if (CC == 128) fused_impl<T, 128>(cols, pi, dyn, packed, K, O, sta, y, OT, SB);
  else fused_impl<T, 256>(cols, pi, dyn, packed, K, O, sta, y, OT, SB);
}

// The packed layout of the factors dyn [K, O, CK] for fused_dynamic_conv with tiles of OT rows and chunks of CC
// columns: per tile of rows [o0, o0 + ot) (ot = min(OT, O - o0)) and per chunk of columns [c0, c0 + cc), the K
// kernels' rows of the chunk, [k][o][c], one block after the other -- the block of (o0, c0) starts at
// K * CK * o0 + K * ot * c0. A work item then reads one contiguous run instead of K * ot rows of cc entries
// spread over the factors (at batch 1 the kernel is bound by that read: docs/benchmarks.md).
template <typename T>
void pack_impl(const T* dyn, T* out, int64_t K, int64_t O, int64_t CK, int64_t OT, int64_t CC) {
  constexpr int N = Vec<T>::N;
  const int64_t tiles = (O + OT - 1) / OT;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o0 = t * OT, ot = std::min(OT, O - o0);
      for (int64_t c0 = 0; c0 < CK; c0 += CC) {
        const int64_t cc = std::min(CC, CK - c0);
        T* block = out + K * CK * o0 + K * ot * c0;
        const int64_t nv = cc / N, rem = cc - nv * N;
        for (int64_t o = 0; o < ot; ++o) {
          T* row = block + o * K * cc;
          for (int64_t k = 0; k < K; ++k) {
            const T* src = dyn + (k * O + o0 + o) * CK + c0;
            for (int64_t v = 0; v < nv; ++v) std::memcpy(row + (v * K + k) * N, src + v * N, N * sizeof(T));
            std::memcpy(row + nv * K * N + k * rem, src + nv * N, rem * sizeof(T));
          }
        }
      }
    }
  });
}


// ---- element-PAD factors (training): one pass over the weights instead of a chain of aten ops ----
//
// F[k, p] = ld m[p] W[k, p] + ls (1 - m[p]) Ws[p] (padnet.ops.masked_factors.folded_factors), and the map
// of dL/dF to the parameters' gradients. Blocks of FB entries are the parallel work items; the scale
// gradients are summed per block (in the block's dtype, FB terms) and the blocks' sums in double, in
// block order, so the result does not depend on the thread count. The [K, P] operands may be column ranges
// of wider matrices (a tile of the tiled weight-space GEMM): their rows are `*s` entries apart.

constexpr int64_t FB = 2048;  // entries per block: the block's m, Ws and sums stay in L1

// the block's K rows of F' into f (rows fs apart): f[k][i] = ld m[p0 + i] W[k][i] + ls (1 - m[p0 + i]) Ws[p0 + i],
// vectorised by hand (one load of m and Ws per vector for all K rows); fold_factors writes F' with it, and
// the factor GEMMs below form their blocks' rows with it
template <typename T>
void form_element_rows(const T* sta, const T* mask, T ls, T ld, int64_t p0, int64_t m, int64_t K,
                       const T* const* rows, T* f, int64_t fs) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  const V lsv = vzero<T>() + ls, ldv = vzero<T>() + ld;
  int64_t i = 0;
  for (; i + N <= m; i += N) {
    const V mi = vload<T>(mask + p0 + i), si = vload<T>(sta + p0 + i);
    const V md = ldv * mi, st = lsv * (si - si * mi);
    for (int64_t k = 0; k < K; ++k) vstore<T>(f + k * fs + i, md * vload<T>(rows[k] + i) + st);
  }
  for (; i < m; ++i) {
    const T mi = mask[p0 + i], si = sta[p0 + i];
    const T md = ld * mi, st = ls * (si - si * mi);
    for (int64_t k = 0; k < K; ++k) f[k * fs + i] = md * rows[k][i] + st;
  }
}

template <typename T>
void fold_impl(const T* dyn, int64_t ds, const T* sta, const T* mask, T ls, T ld, T* out, int64_t os, int64_t K,
               int64_t P) {
  const int64_t blocks = (P + FB - 1) / FB;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const T*> rows(K);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * FB, n = std::min(FB, P - p0);
      for (int64_t k = 0; k < K; ++k) rows[k] = dyn + k * ds + p0;
      form_element_rows<T>(sta, mask, ls, ld, p0, n, K, rows.data(), out + p0, os);
    }
  });
}

// one block of fold_grads_impl: entries [p0, p0 + n), vectorised over the entries (the sums over k stay in
// registers); the scale gradients' partial sums of the block are returned in *acc_ls_out, *acc_ld_out.
// dL/dF is read from src (src[k * ss + i - p0]: the block's rows, in place when src is g's own block) and
// dL/dW (NEED_D; else dL/dF itself, copied when src is not g) written to g.
template <typename T, bool NEED_D, bool NEED_S>
void fold_grads_block(const T* src, int64_t ss, T* g, int64_t gs_, const T* dyn, int64_t ds, const T* sta,
                      const T* mask, T ls, T ld, T* g_sta, int64_t K, int64_t p0, int64_t n, T* acc_ls_out,
                      T* acc_ld_out) {
  const bool copy = !NEED_D && !(src == g + p0 && ss == gs_);
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  const V lsv = vzero<T>() + ls, ldv = vzero<T>() + ld;
  V acc_ls = vzero<T>(), acc_ld = vzero<T>();
  int64_t i = p0;
  for (; i + N <= p0 + n; i += N) {
    const V m = vload<T>(mask + i);
    V gsum = vzero<T>(), gw = vzero<T>();
    for (int64_t k = 0; k < K; ++k) {
      const V gi = vload<T>(src + k * ss + (i - p0));
      gsum += gi;
      gw += gi * vload<T>(dyn + k * ds + i);
      if (NEED_D) vstore<T>(g + k * gs_ + i, ldv * m * gi);
      else if (copy) vstore<T>(g + k * gs_ + i, gi);
    }
    acc_ld += m * gw;
    const V gs = gsum - gsum * m;  // (1 - m) sum_k g_k
    acc_ls += gs * vload<T>(sta + i);
    if (NEED_S) vstore<T>(g_sta + i, lsv * gs);
  }
  T sum_ls = T(0), sum_ld = T(0);
  for (int j = 0; j < N; ++j) {
    sum_ls += acc_ls[j];
    sum_ld += acc_ld[j];
  }
  for (; i < p0 + n; ++i) {  // the block's tail
    const T m = mask[i];
    T gsum = T(0), gw = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T gi = src[k * ss + (i - p0)];
      gsum += gi;
      gw += gi * dyn[k * ds + i];
      if (NEED_D) g[k * gs_ + i] = ld * m * gi;
      else if (copy) g[k * gs_ + i] = gi;
    }
    sum_ld += m * gw;
    const T gs = gsum - gsum * m;
    sum_ls += gs * sta[i];
    if (NEED_S) g_sta[i] = ls * gs;
  }
  *acc_ls_out = sum_ls;
  *acc_ld_out = sum_ld;
}

template <typename T>
using FoldGradsBlockFn = void (*)(const T*, int64_t, T*, int64_t, const T*, int64_t, const T*, const T*, T, T, T*,
                                  int64_t, int64_t, int64_t, T*, T*);

template <typename T>
FoldGradsBlockFn<T> fold_grads_block_for(bool need_d, bool need_s) {
  return need_d ? (need_s ? fold_grads_block<T, true, true> : fold_grads_block<T, true, false>)
                : (need_s ? fold_grads_block<T, false, true> : fold_grads_block<T, false, false>);
}

// g [K, P] (dL/dF, overwritten with dL/dW if need_d) -> (g_sta [P] if need_s, dL/dls, dL/dld)
template <typename T>
void fold_grads_impl(T* g, int64_t gs_, const T* dyn, int64_t ds, const T* sta, const T* mask, T ls, T ld, T* g_sta,
                     int64_t K, int64_t P, bool need_d, bool need_s, double* g_ls, double* g_ld) {
  const int64_t blocks = (P + FB - 1) / FB;
  std::vector<double> part_ls(blocks, 0.0), part_ld(blocks, 0.0);
  auto block = fold_grads_block_for<T>(need_d, need_s);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * FB;
      T acc_ls, acc_ld;
      block(g + p0, gs_, g, gs_, dyn, ds, sta, mask, ls, ld, g_sta, K, p0, std::min(FB, P - p0), &acc_ls, &acc_ld);
      part_ls[blk] = static_cast<double>(acc_ls);
      part_ld[blk] = static_cast<double>(acc_ld);
    }
  });
  double s_ls = 0.0, s_ld = 0.0;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    s_ls += part_ls[blk];
    s_ld += part_ld[blk];
  }
  *g_ls = s_ls;
  *g_ld = s_ld;
}

// a [K, P] operand whose rows are contiguous and do not overlap (a column range of a wider matrix allowed)
bool row_major_rows(const torch::Tensor& t) {
  return t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
}

void check_factor_args(const char* what, const torch::Tensor& dyn, const torch::Tensor& sta,
                       const torch::Tensor& mask) {
  TORCH_CHECK(dyn.dim() == 2 && sta.dim() == 1 && mask.dim() == 1, what, ": expected dyn [K, P], sta [P], mask [P]");
  TORCH_CHECK(sta.size(0) == dyn.size(1) && mask.size(0) == dyn.size(1), what, ": shape mismatch");
  TORCH_CHECK(dyn.device().is_cpu() && sta.device().is_cpu() && mask.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(dyn.scalar_type() == sta.scalar_type() && dyn.scalar_type() == mask.scalar_type(), what,
              ": one dtype expected");
  TORCH_CHECK(row_major_rows(dyn) && sta.is_contiguous() && mask.is_contiguous(), what,
              ": dyn needs contiguous, non-overlapping rows; sta and mask must be contiguous");
  TORCH_CHECK(dyn.scalar_type() == torch::kFloat || dyn.scalar_type() == torch::kDouble, what,
              ": float32 or float64 only");
}

}  // namespace

// cols [B, CK, L], pi [B, K], dyn [K, O, CK], sta [O, CK] or undefined -> y [B, O, L]
namespace {

void check_tiles(const char* what, int64_t OT, int64_t SB, int64_t CC) {
  TORCH_CHECK(OT >= 1 && OT <= 1024 && SB >= 1 && SB <= 256 && (CC == 64 || CC == 128 || CC == 256), what,
              ": tiles must be 1..1024 rows, 1..256 samples and a chunk of 64, 128 or 256 columns");
}

// y [B, O, L] of the fused kernel; dyn is [K, O, CK] (row layout) or, with `packed`, the [K * O * CK] entries of
// pack_fused_factors(dyn, OT, CC) for these OT and CC
torch::Tensor fused_call(const char* what, torch::Tensor cols, torch::Tensor pi, torch::Tensor dyn, bool packed,
                         int64_t K, int64_t O, const c10::optional<torch::Tensor>& sta_opt, int64_t OT, int64_t SB,
                         int64_t CC) {
  TORCH_CHECK(cols.dim() == 3 && pi.dim() == 2, what, ": bad ranks");
  TORCH_CHECK(cols.device().is_cpu() && pi.device().is_cpu() && dyn.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(pi.size(0) == cols.size(0) && pi.size(1) == K, what, ": shape mismatch");
  TORCH_CHECK(cols.scalar_type() == pi.scalar_type() && pi.scalar_type() == dyn.scalar_type(), what,
              ": one dtype expected");
  check_tiles(what, OT, SB, CC);
  cols = cols.contiguous();
  pi = pi.contiguous();
  dyn = dyn.contiguous();
  const int64_t CK = cols.size(1);
  torch::Tensor sta;
  if (sta_opt.has_value() && sta_opt->defined()) {
    sta = sta_opt->contiguous();
    TORCH_CHECK(sta.dim() == 2 && sta.size(0) == O && sta.size(1) == CK && sta.scalar_type() == dyn.scalar_type() &&
                    sta.device().is_cpu(), what, ": bad static part");
  }
  auto y = torch::empty({cols.size(0), O, cols.size(2)}, cols.options());
  if (cols.scalar_type() == torch::kFloat) {
    fused_dispatch<float>(cols, pi, dyn, packed, K, O, sta, y, OT, SB, CC);
  } else if (cols.scalar_type() == torch::kDouble) {
    fused_dispatch<double>(cols, pi, dyn, packed, K, O, sta, y, OT, SB, CC);
  } else {
    TORCH_CHECK(false, what, ": float32 or float64 only");
  }
  return y;
}

}  // namespace

torch::Tensor fused_dynamic_conv(torch::Tensor cols, torch::Tensor pi, torch::Tensor dyn,
                                 c10::optional<torch::Tensor> sta_opt, int64_t OT, int64_t SB, int64_t CC) {
  TORCH_CHECK(dyn.dim() == 3, "fused_dynamic_conv: bad ranks");
  TORCH_CHECK(cols.dim() == 3 && dyn.size(2) == cols.size(1), "fused_dynamic_conv: shape mismatch");
  return fused_call("fused_dynamic_conv", cols, pi, dyn, false, dyn.size(0), dyn.size(1), sta_opt, OT, SB, CC);
}

// dyn [K, O, CK] -> its entries [K * O * CK] in the packed layout of fused_dynamic_conv_packed (pack_impl)
torch::Tensor pack_fused_factors(torch::Tensor dyn, int64_t OT, int64_t CC) {
  TORCH_CHECK(dyn.dim() == 3 && dyn.device().is_cpu() &&
                  (dyn.scalar_type() == torch::kFloat || dyn.scalar_type() == torch::kDouble),
              "pack_fused_factors: dyn must be a CPU float32/float64 tensor [K, O, CK]");
  check_tiles("pack_fused_factors", OT, 1, CC);
  dyn = dyn.contiguous();
  auto out = torch::empty({dyn.numel()}, dyn.options());
  if (dyn.scalar_type() == torch::kFloat)
    pack_impl<float>(dyn.data_ptr<float>(), out.data_ptr<float>(), dyn.size(0), dyn.size(1), dyn.size(2), OT, CC);
  else
    pack_impl<double>(dyn.data_ptr<double>(), out.data_ptr<double>(), dyn.size(0), dyn.size(1), dyn.size(2), OT, CC);
  return out;
}

// fused_dynamic_conv on packed factors: packed = pack_fused_factors(dyn, OT, CC) of dyn [K, O, CK] (the caller
// packs with the same OT and CC)
torch::Tensor fused_dynamic_conv_packed(torch::Tensor cols, torch::Tensor pi, torch::Tensor packed, int64_t K,
                                        int64_t O, c10::optional<torch::Tensor> sta_opt, int64_t OT, int64_t SB,
                                        int64_t CC) {
  TORCH_CHECK(packed.dim() == 1 && cols.dim() == 3 && K >= 1 && O >= 1 && packed.numel() == K * O * cols.size(1),
              "fused_dynamic_conv_packed: packed must hold K * O * CK entries (pack_fused_factors)");
  return fused_call("fused_dynamic_conv_packed", cols, pi, packed, true, K, O, sta_opt, OT, SB, CC);
}

// dyn [K, P], sta [P], mask [P] (0/1 values), ls, ld (doubles) -> out [K, P] (written, returned). dyn and out
// may be column ranges of wider matrices (rows contiguous, any row stride).
torch::Tensor fold_factors(torch::Tensor dyn, torch::Tensor sta, torch::Tensor mask, double ls, double ld,
                           torch::Tensor out) {
  check_factor_args("fold_factors", dyn, sta, mask);
  TORCH_CHECK(out.sizes() == dyn.sizes() && out.scalar_type() == dyn.scalar_type() && row_major_rows(out) &&
                  out.device().is_cpu(), "fold_factors: out must be a CPU tensor like dyn with contiguous rows");
  const int64_t K = dyn.size(0), P = dyn.size(1);
  if (dyn.scalar_type() == torch::kFloat) {
    fold_impl<float>(dyn.data_ptr<float>(), dyn.stride(0), sta.data_ptr<float>(), mask.data_ptr<float>(),
                     static_cast<float>(ls), static_cast<float>(ld), out.data_ptr<float>(), out.stride(0), K, P);
  } else {
    fold_impl<double>(dyn.data_ptr<double>(), dyn.stride(0), sta.data_ptr<double>(), mask.data_ptr<double>(), ls,
                      ld, out.data_ptr<double>(), out.stride(0), K, P);
  }
  out.unsafeGetTensorImpl()->bump_version();  // written in place, as an out= op would record
  return out;
}

// g [K, P] (dL/dF, overwritten with dL/dW when need_d), dyn, sta, mask as in fold_factors (g and dyn may be
// column ranges of wider matrices) -> (g_sta [P] (empty unless need_s), dL/dls, dL/dld). g_sta is written into
// g_sta_out when it is given (a contiguous [P] tensor of sta's dtype), else allocated.
std::tuple<torch::Tensor, double, double> fold_factor_grads(torch::Tensor g, torch::Tensor dyn, torch::Tensor sta,
                                                            torch::Tensor mask, double ls, double ld, bool need_d,
                                                            bool need_s, c10::optional<torch::Tensor> g_sta_out) {
  check_factor_args("fold_factor_grads", dyn, sta, mask);
  TORCH_CHECK(g.sizes() == dyn.sizes() && g.scalar_type() == dyn.scalar_type() && row_major_rows(g) &&
                  g.device().is_cpu(), "fold_factor_grads: g must be a CPU tensor like dyn with contiguous rows");
  const int64_t K = dyn.size(0), P = dyn.size(1);
  torch::Tensor g_sta;
  if (need_s && g_sta_out.has_value() && g_sta_out->defined()) {
    g_sta = *g_sta_out;
    TORCH_CHECK(g_sta.dim() == 1 && g_sta.size(0) == P && g_sta.is_contiguous() &&
                    g_sta.scalar_type() == sta.scalar_type() && g_sta.device().is_cpu(),
                "fold_factor_grads: g_sta_out must be a contiguous CPU tensor like sta");
  } else {
    g_sta = torch::empty({need_s ? P : 0}, sta.options());
  }
  double g_ls = 0.0, g_ld = 0.0;
  if (dyn.scalar_type() == torch::kFloat) {
    fold_grads_impl<float>(g.data_ptr<float>(), g.stride(0), dyn.data_ptr<float>(), dyn.stride(0),
                           sta.data_ptr<float>(), mask.data_ptr<float>(), static_cast<float>(ls),
                           static_cast<float>(ld), need_s ? g_sta.data_ptr<float>() : nullptr, K, P, need_d, need_s,
                           &g_ls, &g_ld);
  } else {
    fold_grads_impl<double>(g.data_ptr<double>(), g.stride(0), dyn.data_ptr<double>(), dyn.stride(0),
                            sta.data_ptr<double>(), mask.data_ptr<double>(), ls, ld,
                            need_s ? g_sta.data_ptr<double>() : nullptr, K, P, need_d, need_s, &g_ls, &g_ld);
  }
  if (need_d) g.unsafeGetTensorImpl()->bump_version();  // overwritten in place, as mul_ would record
  if (need_s) g_sta.unsafeGetTensorImpl()->bump_version();
  return std::make_tuple(g_sta, g_ls, g_ld);
}


// ---- the factor GEMMs of the tiled weight-space conv (training): one pass each ----
//
// The tiled weight-space conv (padnet.ops.bmm_autograd) needs, per tile of columns of the factor matrix F
// [K, n] and per batch tile of nb samples:
//   forward (and the input gradient): w[b, p] = sum_k pi[b, k] F[k, p]                         (mix_factors)
//   backward, from the per-sample kernels' gradient gw [nb, n]:                          (factor_grad_pass)
//     dL/dF[k, p] (+)= sum_b pi[b, k] gw[b, p]  and  dL/dpi[b, k] += sum_p gw[b, p] F[k, p].
// Two GEMMs (MKL) read gw twice; this pass reads it once. For an element-masked PAD layer F is not stored:
// F[k, p] = ld m[p] W[k, p] + ls (1 - m[p]) Ws[p] (the folded factors above) is applied per block from W, Ws
// and m inside both kernels (see form_element_rows), and on the last batch tile the finished dL/dF is mapped
// to dL/dW, dL/dWs and the scales' gradients in the same pass: F is never written, and with one batch tile
// neither is the unmapped dL/dF (with several, the partial dL/dF is kept in g between them). Blocks of GB
// (mix) or GBG (gradient pass) entries are the parallel work items; sums over entries (dL/dpi, the scales)
// are kept per block and added in block order, in double, so the results do not depend on the thread count.

namespace {

constexpr int64_t GB = 512;    // entries per block of mix_factors: K rows of F stay in L1
constexpr int64_t GBG = 2048;  // entries per block of factor_grad_pass: K rows of F and dL/dF stay in L2, and
                               // each of the B rows of gw is read in runs of 8 KiB (the prefetchers keep up)
// the rows of the per-block buffers are padded by RPAD entries: rows a multiple of 4 KiB apart would make
// each store to one row stall the next row's loads (4K aliasing)
constexpr int64_t RPAD = 48;
constexpr int64_t RSG = GBG + RPAD;
constexpr int64_t RSM = GB + RPAD;
constexpr int64_t KMAX = 64;  // factors per call (the accumulators of dL/dpi live on the stack)

// For element factors F'[k, p] = md[p] W[k, p] + st[p] with  md[p] = ld m[p]  and  st[p] = ls (1 - m[p]) Ws[p].
// Both kernels form the block's K rows of F' once into a per-thread buffer (form_element_rows, vectorised: m
// and Ws loaded once per vector for all K rows), which every sample of the block then reads from L1 / L2 like
// stored factors; the per-sample loops are the stored factors' ones. (The gradient pass needs the rows only
// for dL/dpi.) With no more samples than factors (B <= K) the mix instead applies md and st per vector in
// the per-sample loop (element_block, mix_block<ELEM>):
// sum_k c_k F'[k] = md (sum_k c_k W[k]) + (sum_k c_k) st, the same sum in another order (they agree to
// rounding). Measured on the Zen 3 machine (512@4's tiles, batch 32): forming the rows per block took the
// element mix from +0.8-1.0 ms over the stored factors' per tile to +0.3-0.8 ms, and mapping dL/dF straight
// from the block's buffer (no copy into g first) the gradient pass from +1.0-1.4 ms to +0.0-0.9 ms (scratch
// timings of mix_factors / factor_grad_pass alone, interleaved, medians of 21 calls; the ranges are the runs).
template <typename T>
void element_block(const T* sta, const T* mask, T ls, T ld, int64_t p0, int64_t m, T* md, T* st) {
  for (int64_t i = 0; i < m; ++i) {
    const T mi = mask[p0 + i], si = sta[p0 + i];
    md[i] = ld * mi;
    st[i] = ls * (si - si * mi);
  }
}

// a store that bypasses the caches (the per-sample kernels of a tile are larger than the caches and are read
// back by the next GEMM from memory anyway: no read-for-ownership of the destination lines), where aligned
template <typename T>
inline void vstream(T* p, typename Vec<T>::type v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) _mm512_stream_ps(p, reinterpret_cast<__m512&>(v));
  else _mm512_stream_pd(p, reinterpret_cast<__m512d&>(v));
#elif defined(__AVX__)
  if constexpr (std::is_same<T, float>::value) _mm256_stream_ps(p, reinterpret_cast<__m256&>(v));
  else _mm256_stream_pd(p, reinterpret_cast<__m256d&>(v));
#else
  vstore<T>(p, v);
#endif
}

// one block of mix_impl; KC > 0: K == KC known at compile time (the loops over k unroll); ELEM: md, st given
template <typename T, int KC, bool STREAM, bool ELEM>
void mix_block(const T* pi, int64_t B, int64_t K_, const T* const* rows, const T* md, const T* st, T* out,
               int64_t os, int64_t p0, int64_t m) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  const int64_t K = KC > 0 ? KC : K_;
  const int64_t mv = m - m % N;
  for (int64_t b = 0; b < B; ++b) {
    const T* pb = pi + b * K;
    T* o = out + b * os + p0;
    T c[KC > 0 ? KC : KMAX];
    T csum = T(0);
    for (int64_t k = 0; k < K; ++k) {
      c[k] = pb[k];
      csum += c[k];
    }
    for (int64_t i = 0; i < mv; i += N) {
      V acc = c[0] * vload<T>(rows[0] + i);
      for (int64_t k = 1; k < K; ++k) acc += c[k] * vload<T>(rows[k] + i);
      if (ELEM) acc = acc * vload<T>(md + i) + csum * vload<T>(st + i);
      if (STREAM) vstream<T>(o + i, acc);
      else vstore<T>(o + i, acc);
    }
    for (int64_t i = mv; i < m; ++i) {
      T acc = T(0);
      for (int64_t k = 0; k < K; ++k) acc += c[k] * rows[k][i];
      o[i] = ELEM ? acc * md[i] + csum * st[i] : acc;
    }
  }
}

template <typename T>
using MixBlockFn = void (*)(const T*, int64_t, int64_t, const T* const*, const T*, const T*, T*, int64_t, int64_t,
                            int64_t);

template <typename T, int KC>
MixBlockFn<T> mix_block_for(bool stream, bool elem) {
  return stream ? (elem ? mix_block<T, KC, true, true> : mix_block<T, KC, true, false>)
                : (elem ? mix_block<T, KC, false, true> : mix_block<T, KC, false, false>);
}

template <typename T>
void mix_impl(const T* pi, int64_t B, int64_t K, const T* dyn, int64_t ds, const T* sta, const T* mask, T ls, T ld,
              T* out, int64_t os, int64_t n) {
  constexpr int N = Vec<T>::N;
  const bool stream = reinterpret_cast<uintptr_t>(out) % VBYTES == 0 && os % N == 0;
  const bool elem = mask != nullptr;
  MixBlockFn<T> block = K == 4 ? mix_block_for<T, 4>(stream, elem)
             : K == 2 ? mix_block_for<T, 2>(stream, elem)
             : K == 8 ? mix_block_for<T, 8>(stream, elem)
                      : mix_block_for<T, 0>(stream, elem);
  const int64_t blocks = (n + GB - 1) / GB;
  // element factors with more samples than factors: the block's K rows of F' are formed once into f (K rows
  // of GB entries, RSM apart against 4K aliasing; 8 KiB for K = 4 in float32) and every sample runs the
  // stored factors' loop over them; with few samples the rows are applied per vector instead (no buffer
  // pass). The two round differently (F' rounded first, or not), so a sample's kernel can differ in the last
  // bits between a batch tile of more and one of at most K samples.
  const bool form_rows = elem && B > K;
  if (form_rows) block = K == 4 ? mix_block_for<T, 4>(stream, false)
                       : K == 2 ? mix_block_for<T, 2>(stream, false)
                       : K == 8 ? mix_block_for<T, 8>(stream, false)
                                : mix_block_for<T, 0>(stream, false);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    T md[GB], st[GB];
    std::vector<T> f(form_rows ? K * RSM : 0);
    const T* rows[KMAX];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * GB, m = std::min(GB, n - p0);
      for (int64_t k = 0; k < K; ++k) rows[k] = dyn + k * ds + p0;
      if (form_rows) {
        form_element_rows<T>(sta, mask, ls, ld, p0, m, K, rows, f.data(), RSM);
        for (int64_t k = 0; k < K; ++k) rows[k] = f.data() + k * RSM;
      } else if (elem) {
        element_block<T>(sta, mask, ls, ld, p0, m, md, st);
      }
      block(pi, B, K, rows, md, st, out, os, p0, m);
    }
#if defined(__AVX__)
    if (stream) _mm_sfence();  // this thread's streaming stores are visible before the next GEMM reads them
#endif
  });
}

// one block of grad_pass_impl: r [K][RSG] (dL/dF of the block, updated) when HAS_G, part_pi [B * K] (written)
// when HAS_PI
template <typename T, int KC, bool HAS_G, bool HAS_PI>
void grad_block(const T* gw, int64_t gws, const T* pi, int64_t B, int64_t K_, const T* const* rows, T* r,
                T* part_pi, int64_t p0, int64_t m) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  constexpr int KB = KC > 0 ? KC : KMAX;
  const int64_t K = KC > 0 ? KC : K_;
  const int64_t mv = m - m % N;
  for (int64_t b = 0; b < B; ++b) {
    const T* gb = gw + b * gws + p0;
    T c[KB];
    V acc[KB];
    T tail[KB];
    for (int64_t k = 0; k < K; ++k) {
      c[k] = pi[b * K + k];
      acc[k] = vzero<T>();
      tail[k] = T(0);
    }
    const T* next = b + 1 < B ? gb + gws : gb;  // the next row's run, fetched while this one is worked on
    for (int64_t i = 0; i < mv; i += N) {
      const V gv = vload<T>(gb + i);
      if (i % (64 / sizeof(T)) == 0) __builtin_prefetch(next + i, 0, 3);
      for (int64_t k = 0; k < K; ++k) {
        if (HAS_G) vstore<T>(r + k * RSG + i, vload<T>(r + k * RSG + i) + c[k] * gv);
        if (HAS_PI) acc[k] += gv * vload<T>(rows[k] + i);
      }
    }
    for (int64_t i = mv; i < m; ++i) {
      for (int64_t k = 0; k < K; ++k) {
        if (HAS_G) r[k * RSG + i] += c[k] * gb[i];
        if (HAS_PI) tail[k] += gb[i] * rows[k][i];
      }
    }
    if (HAS_PI) {
      for (int64_t k = 0; k < K; ++k) {
        T sum = tail[k];
        for (int j = 0; j < N; ++j) sum += acc[k][j];
        part_pi[b * K + k] = sum;
      }
    }
  }
}

template <typename T>
using GradBlockFn = void (*)(const T*, int64_t, const T*, int64_t, int64_t, const T* const*, T*, T*, int64_t,
                             int64_t);

template <typename T, int KC>
GradBlockFn<T> grad_block_for(bool has_g, bool has_pi) {
  return has_g ? (has_pi ? grad_block<T, KC, true, true> : grad_block<T, KC, true, false>)
               : (has_pi ? grad_block<T, KC, false, true> : grad_block<T, KC, false, false>);
}

// gw [B, n] (rows gws apart), pi [B, K]; F as in mix_impl. g [K, n] (rows gs apart, may be null): dL/dF,
// accumulated onto its contents when `accumulate`; `finish` (element factors only): the finished dL/dF is
// mapped from the block's buffer into g as dL/dW = ld m dL/dF by fold_grads_block (when need_d; else g gets
// dL/dF itself), g_sta = ls (1 - m) sum_k dL/dF (when given) and the scales' partial
// sums (part_scales [blocks][2]). part_pi [blocks][B * K] (may be null): the blocks' dL/dpi sums.
template <typename T>
void grad_pass_impl(const T* gw, int64_t gws, const T* pi, int64_t B, int64_t K, const T* dyn, int64_t ds,
                    const T* sta, const T* mask, T ls, T ld, T* g, int64_t gs, bool accumulate, bool finish,
                    bool need_d, T* g_sta, T* part_pi, T* part_scales, int64_t n) {
  const bool has_g = g != nullptr, has_pi = part_pi != nullptr, elem = mask != nullptr;
  auto block = K == 4 ? grad_block_for<T, 4>(has_g, has_pi)
             : K == 2 ? grad_block_for<T, 2>(has_g, has_pi)
             : K == 8 ? grad_block_for<T, 8>(has_g, has_pi)
                      : grad_block_for<T, 0>(has_g, has_pi);
  const int64_t blocks = (n + GBG - 1) / GBG;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    // element factors: the block's F' rows are formed once into f (B samples read them), from W, Ws and m
    std::vector<T> raw(has_g ? K * RSG : 0), f(elem && has_pi ? K * RSG : 0);
    const T* rows[KMAX];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t p0 = blk * GBG, m = std::min(GBG, n - p0);
      for (int64_t k = 0; k < K; ++k) rows[k] = dyn + k * ds + p0;
      if (elem && has_pi) {
        form_element_rows<T>(sta, mask, ls, ld, p0, m, K, rows, f.data(), RSG);
        for (int64_t k = 0; k < K; ++k) rows[k] = f.data() + k * RSG;
      }
      T* r = raw.data();
      for (int64_t k = 0; has_g && k < K; ++k) {
        if (accumulate) std::memcpy(r + k * RSG, g + k * gs + p0, m * sizeof(T));
        else std::fill(r + k * RSG, r + k * RSG + m, T(0));
      }
      block(gw, gws, pi, B, K, rows, r, has_pi ? part_pi + blk * B * K : nullptr, p0, m);
      if (!has_g) continue;
      if (!finish) {
        for (int64_t k = 0; k < K; ++k) std::memcpy(g + k * gs + p0, r + k * RSG, m * sizeof(T));
        continue;
      }
      // element factors, the last batch tile: the finished dL/dF mapped from the block's buffer into g
      fold_grads_block_for<T>(need_d, g_sta != nullptr)(r, RSG, g, gs, dyn, ds, sta, mask, ls, ld, g_sta, K, p0, m,
                                                        &part_scales[2 * blk], &part_scales[2 * blk + 1]);
    }
  });
}

void check_rows(const char* what, const char* name, const torch::Tensor& t, int64_t rows, int64_t cols,
                const torch::Tensor& like) {
  TORCH_CHECK(row_major_rows(t) && t.size(0) == rows && t.size(1) == cols, what, ": ", name, " must be [", rows,
              ", ", cols, "] with contiguous rows");
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device().is_cpu(), what, ": ", name,
              " must be a CPU tensor of the factors' dtype");
}

// the optional element operands: both or neither
bool element_operands(const char* what, const torch::Tensor& dyn, const c10::optional<torch::Tensor>& sta,
                      const c10::optional<torch::Tensor>& mask) {
  const bool has_s = sta.has_value() && sta->defined(), has_m = mask.has_value() && mask->defined();
  TORCH_CHECK(has_s == has_m, what, ": give both sta and mask (element factors) or neither (stored factors)");
  TORCH_CHECK(dyn.scalar_type() == torch::kFloat || dyn.scalar_type() == torch::kDouble, what,
              ": float32 or float64 only");
  TORCH_CHECK(row_major_rows(dyn) && dyn.device().is_cpu() && dyn.size(0) >= 1 && dyn.size(0) <= KMAX, what,
              ": dyn must be a CPU [K, n] tensor with contiguous rows and 1 <= K <= ", KMAX);
  if (has_m) check_factor_args(what, dyn, *sta, *mask);
  return has_m;
}

}  // namespace

// pi [B, K], dyn [K, n] (rows contiguous), optional sta [n] and mask [n] (element factors: F is folded on
// the fly), ls, ld -> out [B, n] (rows contiguous; written, returned): out = pi @ F
torch::Tensor mix_factors(torch::Tensor pi, torch::Tensor dyn, c10::optional<torch::Tensor> sta,
                          c10::optional<torch::Tensor> mask, double ls, double ld, torch::Tensor out) {
  const bool element = element_operands("mix_factors", dyn, sta, mask);
  const int64_t K = dyn.size(0), n = dyn.size(1);
  TORCH_CHECK(pi.dim() == 2 && pi.size(1) == K, "mix_factors: pi must be [B, K]");
  pi = pi.to(dyn.scalar_type()).contiguous();
  const int64_t B = pi.size(0);
  check_rows("mix_factors", "out", out, B, n, dyn);
  if (dyn.scalar_type() == torch::kFloat) {
    mix_impl<float>(pi.data_ptr<float>(), B, K, dyn.data_ptr<float>(), dyn.stride(0),
                    element ? sta->data_ptr<float>() : nullptr, element ? mask->data_ptr<float>() : nullptr,
                    static_cast<float>(ls), static_cast<float>(ld), out.data_ptr<float>(), out.stride(0), n);
  } else {
    mix_impl<double>(pi.data_ptr<double>(), B, K, dyn.data_ptr<double>(), dyn.stride(0),
                     element ? sta->data_ptr<double>() : nullptr, element ? mask->data_ptr<double>() : nullptr, ls,
                     ld, out.data_ptr<double>(), out.stride(0), n);
  }
  out.unsafeGetTensorImpl()->bump_version();
  return out;
}

// gw [B, n], pi [B, K], F as in mix_factors; g [K, n] or undefined (dL/dF, accumulated when `accumulate`;
// with element factors and `finish`, g receives dL/dW (need_d; else dL/dF) and g_sta [n] (if given) dL/dWs);
// gpi [B, K] or undefined (dL/dpi, added to). Returns the scales' gradients (dL/dls, dL/dld; 0 unless
// finishing element factors).
std::tuple<double, double> factor_grad_pass(torch::Tensor gw, torch::Tensor pi, torch::Tensor dyn,
                                            c10::optional<torch::Tensor> sta, c10::optional<torch::Tensor> mask,
                                            double ls, double ld, c10::optional<torch::Tensor> g_opt,
                                            bool accumulate, bool finish, bool need_d,
                                            c10::optional<torch::Tensor> gpi_opt,
                                            c10::optional<torch::Tensor> g_sta_opt) {
  const bool element = element_operands("factor_grad_pass", dyn, sta, mask);
  const int64_t K = dyn.size(0), n = dyn.size(1);
  TORCH_CHECK(pi.dim() == 2 && pi.size(1) == K, "factor_grad_pass: pi must be [B, K]");
  pi = pi.to(dyn.scalar_type()).contiguous();
  const int64_t B = pi.size(0);
  check_rows("factor_grad_pass", "gw", gw, B, n, dyn);
  const bool has_g = g_opt.has_value() && g_opt->defined(), has_pi = gpi_opt.has_value() && gpi_opt->defined();
  const bool has_gs = g_sta_opt.has_value() && g_sta_opt->defined();
  TORCH_CHECK(!finish || (element && has_g), "factor_grad_pass: finish maps element factors' dL/dF: give g");
  TORCH_CHECK(!has_gs || finish, "factor_grad_pass: g_sta is written only when finishing");
  if (has_g) check_rows("factor_grad_pass", "g", *g_opt, K, n, dyn);
  if (has_pi) {
    TORCH_CHECK(gpi_opt->dim() == 2 && gpi_opt->size(0) == B && gpi_opt->size(1) == K &&
                    gpi_opt->scalar_type() == dyn.scalar_type() && gpi_opt->device().is_cpu(),
                "factor_grad_pass: gpi must be a [B, K] CPU tensor of the factors' dtype");
  }
  if (has_gs) {
    TORCH_CHECK(g_sta_opt->dim() == 1 && g_sta_opt->size(0) == n && g_sta_opt->is_contiguous() &&
                    g_sta_opt->scalar_type() == dyn.scalar_type() && g_sta_opt->device().is_cpu(),
                "factor_grad_pass: g_sta must be a contiguous [n] CPU tensor of the factors' dtype");
  }
  const int64_t blocks = (n + GBG - 1) / GBG;
  auto part_pi = torch::empty({has_pi ? blocks : 0, B * K}, dyn.options());
  auto part_scales = torch::zeros({finish ? blocks : 0, 2}, dyn.options());
  double g_ls = 0.0, g_ld = 0.0;
  AT_DISPATCH_FLOATING_TYPES(dyn.scalar_type(), "factor_grad_pass", [&] {
    using T = scalar_t;
    grad_pass_impl<T>(gw.data_ptr<T>(), gw.stride(0), pi.data_ptr<T>(), B, K, dyn.data_ptr<T>(), dyn.stride(0),
                      element ? sta->data_ptr<T>() : nullptr, element ? mask->data_ptr<T>() : nullptr,
                      static_cast<T>(ls), static_cast<T>(ld), has_g ? g_opt->data_ptr<T>() : nullptr,
                      has_g ? g_opt->stride(0) : 0, accumulate, finish, need_d,
                      has_gs ? g_sta_opt->data_ptr<T>() : nullptr, has_pi ? part_pi.data_ptr<T>() : nullptr,
                      finish ? part_scales.data_ptr<T>() : nullptr, n);
    if (has_pi) {  // the blocks' sums in block order, in double
      std::vector<double> sums(B * K, 0.0);
      const T* pp = part_pi.data_ptr<T>();
      for (int64_t blk = 0; blk < blocks; ++blk)
        for (int64_t j = 0; j < B * K; ++j) sums[j] += static_cast<double>(pp[blk * B * K + j]);
      auto total = torch::from_blob(sums.data(), {B, K}, torch::kDouble);
      gpi_opt->add_(total.to(dyn.scalar_type()));
    }
    if (finish) {
      const T* ps = part_scales.data_ptr<T>();
      for (int64_t blk = 0; blk < blocks; ++blk) {
        g_ls += static_cast<double>(ps[2 * blk]);
        g_ld += static_cast<double>(ps[2 * blk + 1]);
      }
    }
  });
  if (has_g) g_opt->unsafeGetTensorImpl()->bump_version();
  if (has_gs) g_sta_opt->unsafeGetTensorImpl()->bump_version();
  return std::make_tuple(g_ls, g_ld);
}


// ---- im2col for the fused kernel and the GEMM backends (inference and training: no autograd here) ----
//
// x [B, C, H, W] -> cols [B, C*kh*kw, Ho*Wo], rows in (c, i, j) order as in conv weights. Per channel the
// zero-padded plane is built once in a thread-local buffer; then narrow outputs (Wo < 8) are a gather through
// one index table made per call, wider ones a copy per (tap, output row), with no bounds checks in either.

namespace {

template <typename T>
void im2col_impl(const T* x, T* cols, int64_t B, int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw,
                 int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw,
                 int64_t Ho, int64_t Wo) {
  const int64_t L = Ho * Wo, Hp = H + pt + pb, Wp = W + pl + pr, R = kh * kw * L;
  const bool padded = pt || pb || pl || pr;
  const bool gather = Wo < 8;
  std::vector<int64_t> index(gather ? R : 0);
  for (int64_t i = 0, r = 0; gather && i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j)
      for (int64_t oh = 0; oh < Ho; ++oh)
        for (int64_t ow = 0; ow < Wo; ++ow, ++r) index[r] = (oh * sh + i * dh) * Wp + ow * sw + j * dw;
  const int64_t* idx = index.data();
  at::parallel_for(0, B * C, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> plane(padded ? Hp * Wp : 0, T(0));  // the borders stay zero
    for (int64_t bc = begin; bc < end; ++bc) {
      const T* src = x + bc * H * W;
      if (padded) {
        T* p = plane.data() + pt * Wp + pl;
        for (int64_t h = 0; h < H; ++h, p += Wp, src += W)
          for (int64_t w = 0; w < W; ++w) p[w] = src[w];
        src = plane.data();
      }
      T* out = cols + bc * R;
      if (gather) {
        for (int64_t r = 0; r < R; ++r) out[r] = src[idx[r]];
        continue;
      }
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j, out += L) {
          const T* base = src + i * dh * Wp + j * dw;
          for (int64_t oh = 0; oh < Ho; ++oh) {
            const T* row = base + oh * sh * Wp;
            T* o = out + oh * Wo;
            if (sw == 1) {
              for (int64_t ow = 0; ow < Wo; ++ow) o[ow] = row[ow];
            } else {
              for (int64_t ow = 0; ow < Wo; ++ow) o[ow] = row[ow * sw];
            }
          }
        }
    }
  });
}

}  // namespace

// x [B, C, H, W]; padding (top, bottom, left, right) >= 0 -> out [B, C*kh*kw, Ho*Wo] (written, returned)
torch::Tensor im2col(torch::Tensor x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                     int64_t pl, int64_t pr, int64_t dh, int64_t dw, torch::Tensor out) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), "im2col: expected a CPU tensor [B, C, H, W]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble, "im2col: float32 or float64 only");
  TORCH_CHECK(kh > 0 && kw > 0 && sh > 0 && sw > 0 && dh > 0 && dw > 0 && pt >= 0 && pb >= 0 && pl >= 0 && pr >= 0,
              "im2col: bad geometry");
  x = x.contiguous();
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = (H + pt + pb - dh * (kh - 1) - 1) / sh + 1, Wo = (W + pl + pr - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(H + pt + pb >= dh * (kh - 1) + 1 && W + pl + pr >= dw * (kw - 1) + 1, "im2col: input smaller than the kernel");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous() && out.device().is_cpu() &&
                  out.numel() == B * C * kh * kw * Ho * Wo, "im2col: out must be a contiguous CPU tensor of B*C*kh*kw*Ho*Wo elements");
  if (x.scalar_type() == torch::kFloat) {
    im2col_impl<float>(x.data_ptr<float>(), out.data_ptr<float>(), B, C, H, W, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw, Ho, Wo);
  } else {
    im2col_impl<double>(x.data_ptr<double>(), out.data_ptr<double>(), B, C, H, W, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw,
                        Ho, Wo);
  }
  out.unsafeGetTensorImpl()->bump_version();
  return out;
}

namespace {

// ---- the default router for one sample, hand-written ----
//
// pooled[c] = mean_{h,w} x[0, c, h, w]; hidden = relu(norm(fc1 pooled)); logits = fc2 hidden; pi = softmax or
// sigmoid of logits / temperature. At batch 1 these are a handful of tiny ops: as ATen calls (a reduction,
// two linears, relu, softmax, each allocating its output and setting up its iterator) they cost tens of
// microseconds a layer, more than the arithmetic, and more still with the caches cold after the conv before
// them (docs/benchmarks.md). Here they are a few loops over the input and the router's weights, with no
// tensor allocated but the result. The sums run in another order than ATen's, so pi agrees with the Python
// router's to float rounding, not to the bit.

// sums[c] = sum over the H*W positions of channel c of x [1, C, H, W] (NCHW or channels_last), accumulated in
// vector lanes of T and combined in double
template <typename T>
void pool_sums(const torch::Tensor& x, double* sums) {
  using V = typename Vec<T>::type;
  constexpr int N = Vec<T>::N;
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  const T* p = x.data_ptr<T>();
  if (x.is_contiguous()) {
    for (int64_t c = 0; c < C; ++c) {
      const T* row = p + c * HW;
      V a0 = vzero<T>(), a1 = vzero<T>(), a2 = vzero<T>(), a3 = vzero<T>();
      int64_t i = 0;
      for (; i + 4 * N <= HW; i += 4 * N) {
        a0 += vload<T>(row + i);
        a1 += vload<T>(row + i + N);
        a2 += vload<T>(row + i + 2 * N);
        a3 += vload<T>(row + i + 3 * N);
      }
      for (; i + N <= HW; i += N) a0 += vload<T>(row + i);
      const V a = (a0 + a1) + (a2 + a3);
      double s = 0.0;
      for (int j = 0; j < N; ++j) s += static_cast<double>(a[j]);
      for (; i < HW; ++i) s += static_cast<double>(row[i]);
      sums[c] = s;
    }
  } else {  // channels_last: position-major rows of C channels, summed in blocks of 64 positions in T
    std::vector<T> acc(C);
    for (int64_t c = 0; c < C; ++c) sums[c] = 0.0;
    for (int64_t i0 = 0; i0 < HW; i0 += 64) {
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t i = i0; i < std::min(HW, i0 + 64); ++i) {
        const T* row = p + i * C;
        int64_t c = 0;
        for (; c + N <= C; c += N) vstore<T>(acc.data() + c, vload<T>(acc.data() + c) + vload<T>(row + c));
        for (; c < C; ++c) acc[c] += row[c];
      }
      for (int64_t c = 0; c < C; ++c) sums[c] += static_cast<double>(acc[c]);
    }
  }
}

// out[r] = bias[r] + sum_c w[r, c] in[c] for r < R (w [R, C] contiguous; bias optional), in double
template <typename T>
void small_linear(const T* w, const T* bias, const double* in, double* out, int64_t R, int64_t C) {
  for (int64_t r = 0; r < R; ++r) {
    const T* wr = w + r * C;
    double s0 = 0.0, s1 = 0.0;
    int64_t c = 0;
    for (; c + 2 <= C; c += 2) {
      s0 += static_cast<double>(wr[c]) * in[c];
      s1 += static_cast<double>(wr[c + 1]) * in[c + 1];
    }
    if (c < C) s0 += static_cast<double>(wr[c]) * in[c];
    out[r] = s0 + s1 + (bias ? static_cast<double>(bias[r]) : 0.0);
  }
}

bool plain_router_part(const c10::optional<torch::Tensor>& t, const torch::Tensor& x, int64_t numel) {
  return !t.has_value() || (t->scalar_type() == x.scalar_type() && t->device().is_cpu() && t->is_contiguous() &&
                            t->dim() == 1 && t->numel() == numel);
}

// Whether route_fast computes this router: no autograd, CPU float32/float64 throughout, contiguous parts of the shapes the
// Linear / BatchNorm modules would accept (anything else runs the ATen ops, which raise their own errors)
bool route_fast_applies(const torch::Tensor& x, const torch::Tensor& fc1_weight,
                        const c10::optional<torch::Tensor>& fc1_bias, const c10::optional<torch::Tensor>& norm_weight,
                        const c10::optional<torch::Tensor>& norm_bias, const c10::optional<torch::Tensor>& norm_mean,
                        const c10::optional<torch::Tensor>& norm_var, const torch::Tensor& fc2_weight,
                        const c10::optional<torch::Tensor>& fc2_bias) {
  if (at::GradMode::is_enabled()) return false;  // (no autograd graph here: with grad on, the ATen ops run)
  if (!x.device().is_cpu() || (x.scalar_type() != torch::kFloat && x.scalar_type() != torch::kDouble)) return false;
  if (!x.is_contiguous() && !x.is_contiguous(at::MemoryFormat::ChannelsLast)) return false;
  if (x.size(2) * x.size(3) == 0) return false;  // (the mean of nothing: ATen's NaN)
  for (const auto* w : {&fc1_weight, &fc2_weight})
    if (w->dim() != 2 || w->scalar_type() != x.scalar_type() || !w->device().is_cpu() || !w->is_contiguous())
      return false;
  const int64_t R = fc1_weight.size(0);
  if (fc1_weight.size(1) != x.size(1) || fc2_weight.size(1) != R || fc2_weight.size(0) == 0) return false;
  if (norm_mean.has_value() != norm_var.has_value()) return false;
  if (!norm_mean.has_value() && (norm_weight.has_value() || norm_bias.has_value())) return false;
  return plain_router_part(fc1_bias, x, R) && plain_router_part(norm_weight, x, R) &&
         plain_router_part(norm_bias, x, R) && plain_router_part(norm_mean, x, R) &&
         plain_router_part(norm_var, x, R) && plain_router_part(fc2_bias, x, fc2_weight.size(0));
}

template <typename T>
torch::Tensor route_fast(const torch::Tensor& x, const torch::Tensor& fc1_weight,
                         const c10::optional<torch::Tensor>& fc1_bias, const c10::optional<torch::Tensor>& norm_weight,
                         const c10::optional<torch::Tensor>& norm_bias, const c10::optional<torch::Tensor>& norm_mean,
                         const c10::optional<torch::Tensor>& norm_var, double norm_eps,
                         const torch::Tensor& fc2_weight, const c10::optional<torch::Tensor>& fc2_bias,
                         double temperature, bool sigmoid) {
  const int64_t C = x.size(1), R = fc1_weight.size(0), K = fc2_weight.size(0);
  auto ptr = [](const c10::optional<torch::Tensor>& t) -> const T* { return t.has_value() ? t->data_ptr<T>() : nullptr; };
  std::vector<double> work(C + R + K);
  double* pooled = work.data();
  double* hidden = pooled + C;
  double* logits = hidden + R;
  pool_sums<T>(x, pooled);
  const double inv = 1.0 / static_cast<double>(x.size(2) * x.size(3));
  for (int64_t c = 0; c < C; ++c) pooled[c] = static_cast<double>(static_cast<T>(pooled[c] * inv));
  small_linear<T>(fc1_weight.data_ptr<T>(), ptr(fc1_bias), pooled, hidden, R, C);
  if (norm_mean.has_value()) {
    const T *mean = ptr(norm_mean), *var = ptr(norm_var), *g = ptr(norm_weight), *b = ptr(norm_bias);
    for (int64_t r = 0; r < R; ++r) {
      double h = (hidden[r] - mean[r]) / std::sqrt(static_cast<double>(var[r]) + norm_eps);
      hidden[r] = h * (g ? static_cast<double>(g[r]) : 1.0) + (b ? static_cast<double>(b[r]) : 0.0);
    }
  }
  for (int64_t r = 0; r < R; ++r) hidden[r] = std::max(hidden[r], 0.0);
  small_linear<T>(fc2_weight.data_ptr<T>(), ptr(fc2_bias), hidden, logits, K, R);
  auto pi = torch::empty({1, K}, x.options());
  T* out = pi.data_ptr<T>();
  for (int64_t k = 0; k < K; ++k) logits[k] /= temperature;
  if (sigmoid) {
    for (int64_t k = 0; k < K; ++k) out[k] = static_cast<T>(1.0 / (1.0 + std::exp(-logits[k])));
  } else {
    const double top = *std::max_element(logits, logits + K);
    double total = 0.0;
    for (int64_t k = 0; k < K; ++k) total += (logits[k] = std::exp(logits[k] - top));
    for (int64_t k = 0; k < K; ++k) out[k] = static_cast<T>(logits[k] / total);
  }
  return pi;
}

// pi [1, K] of the default router for x [1, C, H, W] (see routed_single_sample_conv): route_fast where it
// applies, else the Python router's ATen ops in its order
torch::Tensor route_one(const torch::Tensor& x, const torch::Tensor& fc1_weight,
                        const c10::optional<torch::Tensor>& fc1_bias, const c10::optional<torch::Tensor>& norm_weight,
                        const c10::optional<torch::Tensor>& norm_bias, const c10::optional<torch::Tensor>& norm_mean,
                        const c10::optional<torch::Tensor>& norm_var, double norm_eps, const torch::Tensor& fc2_weight,
                        const c10::optional<torch::Tensor>& fc2_bias, double temperature, bool sigmoid) {
  TORCH_CHECK(x.dim() == 4 && x.size(0) == 1, "routed single-sample conv: expected one sample [1, C, H, W]");
  TORCH_CHECK(temperature > 0.0, "routed single-sample conv: temperature must be > 0, got ", temperature);
  if (route_fast_applies(x, fc1_weight, fc1_bias, norm_weight, norm_bias, norm_mean, norm_var, fc2_weight, fc2_bias)) {
    if (x.scalar_type() == torch::kFloat)
      return route_fast<float>(x, fc1_weight, fc1_bias, norm_weight, norm_bias, norm_mean, norm_var, norm_eps,
                               fc2_weight, fc2_bias, temperature, sigmoid);
    return route_fast<double>(x, fc1_weight, fc1_bias, norm_weight, norm_bias, norm_mean, norm_var, norm_eps,
                              fc2_weight, fc2_bias, temperature, sigmoid);
  }
  auto hidden = at::linear(x.mean({2, 3}), fc1_weight, fc1_bias);
  if (norm_mean.has_value()) {
    TORCH_CHECK(norm_var.has_value(), "routed single-sample conv: the norm needs running mean and variance");
    hidden = at::batch_norm(hidden, norm_weight, norm_bias, norm_mean, norm_var, false, 0.0, norm_eps, false);
  }
  auto logits = at::linear(at::relu(hidden), fc2_weight, fc2_bias);
  auto z = temperature == 1.0 ? logits : logits / temperature;
  if (sigmoid) return at::sigmoid(z);
  if (z.scalar_type() == torch::kHalf || z.scalar_type() == torch::kBFloat16)
    return at::softmax(z.to(torch::kFloat), -1).to(logits.scalar_type());
  return at::softmax(z, -1);
}

// n elements of a per-thread buffer per (slot, dtype) kept between calls (a fresh one this size could be
// page-faulted in on every call), up to max_buffer_bytes (padnet.ops.workspace's limit; larger: a fresh
// tensor). A buffer made under torch.inference_mode is an inference tensor, which may not be written outside
// it: then it is replaced (as padnet.ops.workspace does)
torch::Tensor thread_buffer(int slot, int64_t n, const torch::Tensor& like, int64_t max_buffer_bytes) {
  thread_local torch::Tensor buffers[2][2];
  if (n * static_cast<int64_t>(like.element_size()) > max_buffer_bytes) return torch::empty({n}, like.options());
  torch::Tensor& buffer = buffers[slot][like.scalar_type() == torch::kDouble ? 1 : 0];
  if (!buffer.defined() || buffer.numel() < n || (buffer.is_inference() && !c10::InferenceMode::is_enabled()))
    buffer = torch::empty({n}, like.options());
  return buffer.narrow(0, 0, n);
}

// im2col of one sample x [1, C, H, W] -> [1, C*kh*kw, Ho*Wo] (a view of x for a pointwise stride-1 conv, else
// written into buffer slot 0), as padnet.ops.im2col.im2col_workspace
torch::Tensor one_sample_cols(const torch::Tensor& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt,
                              int64_t pb, int64_t pl, int64_t pr, int64_t dh, int64_t dw, int64_t Ho, int64_t Wo,
                              bool pointwise, int64_t max_buffer_bytes) {
  const int64_t C = x.size(1);
  if (pointwise) return x.reshape({1, C, -1});
  auto cols = thread_buffer(0, C * kh * kw * Ho * Wo, x, max_buffer_bytes);
  im2col(x, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw, cols);
  return cols.view({1, C * kh * kw, Ho * Wo});
}

// the sample's bias [O] = pi @ bias_dyn (+ bias_sta), bias_sta alone, or none (as ops.dynamic_conv.mix_bias)
c10::optional<torch::Tensor> mix_one_bias(const torch::Tensor& pi, const c10::optional<torch::Tensor>& bias_dyn,
                                          const c10::optional<torch::Tensor>& bias_sta) {
  if (bias_dyn.has_value())
    return (bias_sta.has_value() ? at::addmm(*bias_sta, pi, *bias_dyn) : at::matmul(pi, *bias_dyn)).select(0, 0);
  return bias_sta;
}

// The checks of the routed im2col calls (one sample; dyn [K, O, C, kh, kw] for groups 1; an input at least the
// dilated kernel) -> the output size (Ho, Wo)
std::pair<int64_t, int64_t> one_sample_out_hw(const char* what, const torch::Tensor& x, const torch::Tensor& dyn,
                                              int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                                              int64_t pl, int64_t pr, int64_t dh, int64_t dw) {
  TORCH_CHECK(x.dim() == 4 && x.size(0) == 1, "routed single-sample conv: expected one sample [1, C, H, W]");
  TORCH_CHECK(dyn.dim() == 5 && dyn.size(2) == x.size(1) && dyn.size(3) == kh && dyn.size(4) == kw, what,
              ": dyn must be [K, O, C, kh, kw] (groups 1)");
  const int64_t H = x.size(2), W = x.size(3);
  TORCH_CHECK(H + pt + pb >= dh * (kh - 1) + 1 && W + pl + pr >= dw * (kw - 1) + 1, what,
              ": input smaller than the kernel");
  return {(H + pt + pb - dh * (kh - 1) - 1) / sh + 1, (W + pl + pr - dw * (kw - 1) - 1) / sw + 1};
}

// y [1, O, Ho, Wo] plus the sample's bias, channels_last for a channels_last input (as F.conv2d returns it)
torch::Tensor finish_one_sample(torch::Tensor y, const torch::Tensor& x, const torch::Tensor& pi,
                                const c10::optional<torch::Tensor>& bias_dyn,
                                const c10::optional<torch::Tensor>& bias_sta) {
  auto bias = mix_one_bias(pi, bias_dyn, bias_sta);
  if (bias.has_value()) y = y + bias->view({-1, 1, 1});
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous())
    y = y.contiguous(at::MemoryFormat::ChannelsLast);
  return y;
}

}  // namespace

// The whole batch-1 inference call of a dynamic conv layer in one call from Python (padnet.ops.fused.
// routed_call): the default router (global average pool -> Linear [-> BatchNorm with running statistics]
// -> ReLU -> Linear), routing weights (softmax or sigmoid of logits / temperature), the sample's kernel
// (pi @ dyn [+ sta]) and bias, and one plain conv. The router is hand-written (route_one: its routing weights
// agree with the Python router's to float rounding); the rest are the same ATen ops in the same order as the
// Python path, so given the same routing weights the result is the same to the bit. Only the interpreter's
// work per op is gone (at batch 1 it is a measurable part of the call: docs/benchmarks.md).
torch::Tensor routed_single_sample_conv(
    torch::Tensor x, torch::Tensor fc1_weight, c10::optional<torch::Tensor> fc1_bias,
    c10::optional<torch::Tensor> norm_weight, c10::optional<torch::Tensor> norm_bias,
    c10::optional<torch::Tensor> norm_mean, c10::optional<torch::Tensor> norm_var, double norm_eps,
    torch::Tensor fc2_weight, c10::optional<torch::Tensor> fc2_bias, double temperature, bool sigmoid,
    torch::Tensor dyn, c10::optional<torch::Tensor> sta, c10::optional<torch::Tensor> bias_dyn,
    c10::optional<torch::Tensor> bias_sta, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, int64_t groups) {
  TORCH_CHECK(dyn.dim() >= 3, "routed_single_sample_conv: dyn must be [K, O, C/groups, kh, kw]");
  auto pi = route_one(x, fc1_weight, fc1_bias, norm_weight, norm_bias, norm_mean, norm_var, norm_eps, fc2_weight,
                      fc2_bias, temperature, sigmoid);
  const int64_t K = dyn.size(0);
  auto flat = dyn.reshape({K, -1});
  auto weight = sta.has_value() ? at::addmm(sta->reshape({-1}), pi, flat) : at::mm(pi, flat);
  return at::conv2d(x, weight.view(dyn.sizes().slice(1)), mix_one_bias(pi, bias_dyn, bias_sta), stride, padding,
                    dilation, groups);
}

// The same call where the batch-1 choice is the fused kernel (groups 1, float32/float64, CPU): the router,
// im2col (a view for a pointwise stride-1 conv), fused_dynamic_conv with the given tiles, the bias, and
// channels_last output for a channels_last input -- the ops of padnet.ops.dynamic_conv.single_sample_conv's
// "fused" branch, in its order. With `packed` (pack_fused_factors(dyn, OT, CC), which the caller keeps), the
// kernel reads the factors in that layout: the same numbers to the bit, one stream instead of K * OT rows.
torch::Tensor routed_fused_single_sample_conv(
    torch::Tensor x, torch::Tensor fc1_weight, c10::optional<torch::Tensor> fc1_bias,
    c10::optional<torch::Tensor> norm_weight, c10::optional<torch::Tensor> norm_bias,
    c10::optional<torch::Tensor> norm_mean, c10::optional<torch::Tensor> norm_var, double norm_eps,
    torch::Tensor fc2_weight, c10::optional<torch::Tensor> fc2_bias, double temperature, bool sigmoid,
    torch::Tensor dyn, c10::optional<torch::Tensor> sta, c10::optional<torch::Tensor> bias_dyn,
    c10::optional<torch::Tensor> bias_sta, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
    int64_t pl, int64_t pr, int64_t dh, int64_t dw, bool pointwise, int64_t OT, int64_t SB, int64_t CC,
    int64_t max_buffer_bytes, c10::optional<torch::Tensor> packed) {
  const auto [Ho, Wo] = one_sample_out_hw("routed_fused_single_sample_conv", x, dyn, kh, kw, sh, sw, pt, pb, pl, pr,
                                          dh, dw);
  auto pi = route_one(x, fc1_weight, fc1_bias, norm_weight, norm_bias, norm_mean, norm_var, norm_eps, fc2_weight,
                      fc2_bias, temperature, sigmoid);
  torch::Tensor cols = one_sample_cols(x, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw, Ho, Wo, pointwise, max_buffer_bytes);
  const int64_t K = dyn.size(0), O = dyn.size(1);
  c10::optional<torch::Tensor> sta_rows;
  if (sta.has_value()) sta_rows = sta->reshape({O, -1});
  auto y = (packed.has_value() ? fused_dynamic_conv_packed(cols, pi.contiguous(), *packed, K, O, sta_rows, OT, SB, CC)
                               : fused_dynamic_conv(cols, pi.contiguous(), dyn.reshape({K, O, -1}), sta_rows, OT, SB, CC))
               .view({1, O, Ho, Wo});
  return finish_one_sample(y, x, pi, bias_dyn, bias_sta);
}

// The same call where the batch-1 choice is the per-sample GEMM ("bmm"; groups 1, float32/float64, CPU): the
// router, im2col, the sample's kernel mixed into a per-thread buffer (mix_factors where compiled_mix, the
// Python path's choice for K <= 64 factors and no static part; else one mm / addmm), one bmm into a fresh
// output, the bias, and channels_last output for a channels_last input -- the ops of
// padnet.ops.bmm_kernels.bmm_tiled_forward at batch 1 (one tile: the caller checks that the kernel fits the
// tile budget) and of padnet.ops.dynamic_conv.single_sample_conv's "bmm" branch, in their order.
torch::Tensor routed_bmm_single_sample_conv(
    torch::Tensor x, torch::Tensor fc1_weight, c10::optional<torch::Tensor> fc1_bias,
    c10::optional<torch::Tensor> norm_weight, c10::optional<torch::Tensor> norm_bias,
    c10::optional<torch::Tensor> norm_mean, c10::optional<torch::Tensor> norm_var, double norm_eps,
    torch::Tensor fc2_weight, c10::optional<torch::Tensor> fc2_bias, double temperature, bool sigmoid,
    torch::Tensor dyn, c10::optional<torch::Tensor> sta, c10::optional<torch::Tensor> bias_dyn,
    c10::optional<torch::Tensor> bias_sta, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
    int64_t pl, int64_t pr, int64_t dh, int64_t dw, bool pointwise, bool compiled_mix, int64_t max_buffer_bytes) {
  const auto [Ho, Wo] = one_sample_out_hw("routed_bmm_single_sample_conv", x, dyn, kh, kw, sh, sw, pt, pb, pl, pr,
                                          dh, dw);
  TORCH_CHECK(!sta.has_value() || sta->numel() == dyn[0].numel(),
              "routed_bmm_single_sample_conv: sta must be [O, C, kh, kw]");
  auto pi = route_one(x, fc1_weight, fc1_bias, norm_weight, norm_bias, norm_mean, norm_var, norm_eps, fc2_weight,
                      fc2_bias, temperature, sigmoid);
  const int64_t K = dyn.size(0), O = dyn.size(1), CK = x.size(1) * kh * kw;
  auto cols = one_sample_cols(x, kh, kw, sh, sw, pt, pb, pl, pr, dh, dw, Ho, Wo, pointwise, max_buffer_bytes);
  auto flat = dyn.reshape({K, O * CK});
  auto mix_pi = pi.to(dyn.scalar_type());
  auto w = thread_buffer(1, O * CK, x, max_buffer_bytes).view({1, O * CK});
  if (sta.has_value()) {
    at::addmm_out(w, sta->reshape({O * CK}), mix_pi, flat);
  } else if (compiled_mix) {
    mix_factors(mix_pi, flat, c10::nullopt, c10::nullopt, 0.0, 0.0, w);
  } else {
    at::mm_out(w, mix_pi, flat);
  }
  auto out = torch::empty({1, O, Ho, Wo}, x.options());
  auto out_rows = out.view({1, O, Ho * Wo});
  at::bmm_out(out_rows, w.view({1, O, CK}), cols);
  return finish_one_sample(out, x, pi, bias_dyn, bias_sta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_dynamic_conv", &fused_dynamic_conv, "fused per-sample dynamic conv (inference, CPU)");
  m.def("pack_fused_factors", &pack_fused_factors, "factors [K, O, CK] in the fused kernel's packed layout",
        py::arg("dyn"), py::arg("rows"), py::arg("chunk"));
  m.def("fused_dynamic_conv_packed", &fused_dynamic_conv_packed, "fused_dynamic_conv on packed factors",
        py::arg("cols"), py::arg("pi"), py::arg("packed"), py::arg("num_kernels"), py::arg("out_channels"),
        py::arg("sta"), py::arg("rows"), py::arg("samples"), py::arg("chunk"));
  m.def("im2col", &im2col, "im2col into a given buffer (CPU, float32/float64)");
  m.def("register_block_rows", &block_rows_for,
        "rows of the fused kernel's GEMM register block for this many output pixels and item size",
        py::arg("pixels"), py::arg("itemsize"));
  m.def("fold_factors", &fold_factors, "element-PAD folded factors in one pass (training, CPU)");
  m.def("fold_factor_grads", &fold_factor_grads, "gradients of the folded factors in one pass (training, CPU)",
        py::arg("g"), py::arg("dyn"), py::arg("sta"), py::arg("mask"), py::arg("ls"), py::arg("ld"),
        py::arg("need_d"), py::arg("need_s"), py::arg("g_sta_out") = py::none());
  m.def("mix_factors", &mix_factors, "per-sample kernels of one tile, pi @ F, F stored or folded (training, CPU)",
        py::arg("pi"), py::arg("dyn"), py::arg("sta"), py::arg("mask"), py::arg("ls"), py::arg("ld"),
        py::arg("out"));
  m.def("factor_grad_pass", &factor_grad_pass,
        "dL/dF and dL/dpi of one tile in one pass over the kernels' gradient (training, CPU)",
        py::arg("gw"), py::arg("pi"), py::arg("dyn"), py::arg("sta"), py::arg("mask"), py::arg("ls"), py::arg("ld"),
        py::arg("g"), py::arg("accumulate"), py::arg("finish"), py::arg("need_d"), py::arg("gpi"),
        py::arg("g_sta"));
  m.def("route_one_hand_written",
        [](const torch::Tensor& x, const torch::Tensor& fc1_weight, const c10::optional<torch::Tensor>& fc1_bias,
           const c10::optional<torch::Tensor>& norm_weight, const c10::optional<torch::Tensor>& norm_bias,
           const c10::optional<torch::Tensor>& norm_mean, const c10::optional<torch::Tensor>& norm_var,
           double /*norm_eps*/, const torch::Tensor& fc2_weight, const c10::optional<torch::Tensor>& fc2_bias) {
          return x.dim() == 4 && x.size(0) == 1 &&
                 route_fast_applies(x, fc1_weight, fc1_bias, norm_weight, norm_bias, norm_mean, norm_var, fc2_weight,
                                    fc2_bias);
        },
        "whether route_one computes this router by its hand-written loops (else the ATen ops)");
  m.def("route_one", &route_one, "routing weights [1, K] of the default router for one sample (CPU)",
        py::arg("x"), py::arg("fc1_weight"), py::arg("fc1_bias"), py::arg("norm_weight"), py::arg("norm_bias"),
        py::arg("norm_mean"), py::arg("norm_var"), py::arg("norm_eps"), py::arg("fc2_weight"), py::arg("fc2_bias"),
        py::arg("temperature"), py::arg("sigmoid"));
  m.def("routed_single_sample_conv", &routed_single_sample_conv,
        "routing + kernel mixing + plain conv of one sample in one call (inference)");
  m.def("routed_fused_single_sample_conv", &routed_fused_single_sample_conv,
        "routing + im2col + fused per-sample conv of one sample in one call (inference, CPU)");
  m.def("routed_bmm_single_sample_conv", &routed_bmm_single_sample_conv,
        "routing + im2col + kernel mixing + one GEMM of one sample in one call (inference, CPU)");
}
