// Fused per-sample dynamic convolution (inference, CPU): padnet.ops.fused.
//
// y[b, o, l] = sum_c (sum_k pi[b, k] * dyn[k, o, c] + sta[o, c]) * cols[b, c, l]
//
// cols is the unfolded input [B, CK, L] (im2col, made by the caller). Work is split over
// tiles of OT output channels (OpenMP); for each sample the tile's kernel rows
// w[OT, CK] are formed in a thread-local buffer that stays in L1/L2 and consumed at once
// by a register-blocked GEMM, so the B per-sample kernels are never written to memory.

#include <torch/extension.h>

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

constexpr int64_t OT = 16;  // output channels per tile
constexpr int64_t OB = 4;   // output channels per register block
constexpr int64_t LB = 16;  // output pixels per register block

template <typename T>
void fused_tile(const T* pi_b, const T* dyn, const T* sta, const T* cols_b, T* y_b, T* w, int64_t K,
                int64_t O, int64_t CK, int64_t L, int64_t o0, int64_t ot) {
  // w[o, c] = sum_k pi_b[k] dyn[k, o0 + o, c] (+ sta[o0 + o, c])
  for (int64_t o = 0; o < ot; ++o) {
    T* wr = w + o * CK;
    const T* s = sta ? sta + (o0 + o) * CK : nullptr;
    const T* d0 = dyn + (o0 + o) * CK;
    const T p0 = pi_b[0];
    if (s) {
      for (int64_t c = 0; c < CK; ++c) wr[c] = s[c] + p0 * d0[c];
    } else {
      for (int64_t c = 0; c < CK; ++c) wr[c] = p0 * d0[c];
    }
    for (int64_t k = 1; k < K; ++k) {
      const T pk = pi_b[k];
      const T* dk = dyn + (k * O + o0 + o) * CK;
      for (int64_t c = 0; c < CK; ++c) wr[c] += pk * dk[c];
    }
  }
  // y_b[o0 + o, l] = sum_c w[o, c] cols_b[c, l], blocks of OB channels x LB pixels held in registers
  for (int64_t ob = 0; ob < ot; ob += OB) {
    const int64_t nb = std::min(OB, ot - ob);
    for (int64_t l0 = 0; l0 < L; l0 += LB) {
      const int64_t nl = std::min(LB, L - l0);
      T acc[OB][LB] = {};
      if (nb == OB && nl == LB) {
        for (int64_t c = 0; c < CK; ++c) {
          const T* col = cols_b + c * L + l0;
          for (int64_t i = 0; i < OB; ++i) {
            const T wv = w[(ob + i) * CK + c];
            for (int64_t j = 0; j < LB; ++j) acc[i][j] += wv * col[j];
          }
        }
      } else {
        for (int64_t c = 0; c < CK; ++c) {
          const T* col = cols_b + c * L + l0;
          for (int64_t i = 0; i < nb; ++i) {
            const T wv = w[(ob + i) * CK + c];
            for (int64_t j = 0; j < nl; ++j) acc[i][j] += wv * col[j];
          }
        }
      }
      for (int64_t i = 0; i < nb; ++i)
        for (int64_t j = 0; j < nl; ++j) y_b[(o0 + ob + i) * L + l0 + j] = acc[i][j];
    }
  }
}

template <typename T>
void fused_impl(const torch::Tensor& cols, const torch::Tensor& pi, const torch::Tensor& dyn,
                const torch::Tensor& sta, torch::Tensor& y) {
  const int64_t B = cols.size(0), CK = cols.size(1), L = cols.size(2);
  const int64_t K = dyn.size(0), O = dyn.size(1);
  const T* colsp = cols.data_ptr<T>();
  const T* pip = pi.data_ptr<T>();
  const T* dynp = dyn.data_ptr<T>();
  const T* stap = sta.defined() ? sta.data_ptr<T>() : nullptr;
  T* yp = y.data_ptr<T>();
  const int64_t tiles = (O + OT - 1) / OT;
#pragma omp parallel
  {
    std::vector<T> w(OT * CK);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t o0 = t * OT;
      const int64_t ot = std::min(OT, O - o0);
      for (int64_t b = 0; b < B; ++b) {
        fused_tile<T>(pip + b * K, dynp, stap, colsp + b * CK * L, yp + b * O * L, w.data(), K, O, CK, L, o0, ot);
      }
    }
  }
}

}  // namespace

// cols [B, CK, L], pi [B, K], dyn [K, O, CK], sta [O, CK] or undefined -> y [B, O, L]
torch::Tensor fused_dynamic_conv(torch::Tensor cols, torch::Tensor pi, torch::Tensor dyn,
                                 c10::optional<torch::Tensor> sta_opt, int64_t threads) {
  TORCH_CHECK(cols.dim() == 3 && pi.dim() == 2 && dyn.dim() == 3, "fused_dynamic_conv: bad ranks");
  TORCH_CHECK(cols.device().is_cpu(), "fused_dynamic_conv: CPU tensors only");
  TORCH_CHECK(pi.size(0) == cols.size(0) && pi.size(1) == dyn.size(0) && dyn.size(2) == cols.size(1),
              "fused_dynamic_conv: shape mismatch");
  TORCH_CHECK(cols.scalar_type() == pi.scalar_type() && pi.scalar_type() == dyn.scalar_type(),
              "fused_dynamic_conv: one dtype expected");
  cols = cols.contiguous();
  pi = pi.contiguous();
  dyn = dyn.contiguous();
  torch::Tensor sta;
  if (sta_opt.has_value() && sta_opt->defined()) {
    sta = sta_opt->contiguous();
    TORCH_CHECK(sta.dim() == 2 && sta.size(0) == dyn.size(1) && sta.size(1) == dyn.size(2) &&
                    sta.scalar_type() == dyn.scalar_type(),
                "fused_dynamic_conv: bad static part");
  }
  auto y = torch::empty({cols.size(0), dyn.size(1), cols.size(2)}, cols.options());
#ifdef _OPENMP
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
#endif
  if (cols.scalar_type() == torch::kFloat) {
    fused_impl<float>(cols, pi, dyn, sta, y);
  } else if (cols.scalar_type() == torch::kDouble) {
    fused_impl<double>(cols, pi, dyn, sta, y);
  } else {
    TORCH_CHECK(false, "fused_dynamic_conv: float32 or float64 only");
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fused_dynamic_conv", &fused_dynamic_conv, "fused per-sample dynamic conv (inference, CPU)");
}
