// Exact Q-Sparse sparsifiers on CPU: per-row Top-K by |x| and block N:M, fused with the write of
// the sparse output. Built on first use by megatron_qsparse/sparsity/kernels.py, which documents
// the Python API; sparsity/masks.py holds the pure-PyTorch reference these kernels must match bit
// for bit (tests/unit/test_sparsify_kernel.py).
//
// Semantics (identical to topk_mask / block_mask + x * mask):
//   * keep the k entries of largest |x| per row; ties at the threshold go to the LOWER index;
//   * dropped entries become a zero with the sign of x (what x * 0 gives for finite x; a dropped
//     +-inf also gives a signed zero, where x * 0 is NaN), kept ones are copied;
//   * the count of nonzero outputs is returned, so density statistics need no extra pass.
//
// Top-K selection (topk_select.h) finds each row's exact threshold with a histogram radix select on
// the bits of |x|; one branch-free pass then writes y (and the bool mask when asked).
// Rows are independent: at::parallel_for spreads them over torch's intra-op threads.

#include <torch/extension.h>

#include "topk_select.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <vector>

namespace {

using qsparse::Layout;

// y[i] = keep ? x[i] : copysign(0, x[i]) for i in [begin, end), keep = (|x| + bump > t); bump = 1
// turns the test into |x| >= t. Branch-free so the compiler vectorizes it.
template <typename Bits>
inline void write_kept(const Bits* x, Bits* y, bool* mask, int64_t begin, int64_t end, Bits t,
                       Bits bump) {
  constexpr Bits kSign = Layout<Bits>::kSign;
  constexpr Bits kAbs = static_cast<Bits>(~kSign);
  for (int64_t i = begin; i < end; ++i) {
    const Bits a = static_cast<Bits>(x[i] & kAbs);
    const bool keep = static_cast<Bits>(a + bump) > t;
    y[i] = static_cast<Bits>(x[i] & (keep ? static_cast<Bits>(~Bits(0)) : kSign));
    if (mask) mask[i] = keep;
  }
}

// Per-thread scratch for Top-K: the shared threshold search, then the fused write.
template <typename Bits>
struct TopKRow {
  qsparse::TopKSelect<Bits> select;

  explicit TopKRow(int64_t d) : select(d) {}

  // Sparsify one row of d entries keeping k (1 <= k < d); returns the nonzero count of y.
  int64_t run(const Bits* x, Bits* y, bool* mask, int64_t d, int64_t k) {
    const qsparse::Threshold<Bits> th = select.find(x, d, k);
    // write: |x| >= t before limit, |x| > t after it.
    write_kept(x, y, mask, 0, th.limit, th.t, Bits(1));
    write_kept(x, y, mask, th.limit, d, th.t, Bits(0));
    return th.t == 0 ? th.greater : k;  // kept keys are > 0 unless the threshold itself is zero
  }
};

// Rows per parallel task: enough elements (~32K, ATen's grain) that threading pays off.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

template <typename Bits>
int64_t topk_rows(const Bits* x, Bits* y, bool* mask, int64_t rows, int64_t d, int64_t k) {
  std::atomic<int64_t> nonzero{0};
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    TopKRow<Bits> row(d);
    int64_t nz = 0;
    for (int64_t r = begin; r < end; ++r)
      nz += row.run(x + r * d, y + r * d, mask ? mask + r * d : nullptr, d, k);
    nonzero += nz;
  });
  return nonzero.load();
}

// Block N:M: in every group of m consecutive entries keep the n largest |x|, ties to the lower
// index. An entry is kept when fewer than n entries of its group beat it (larger |x|, or equal
// |x| at a lower index): O(m) compares per entry, fine for the small m this mode is used with.
template <typename Bits>
int64_t block_rows(const Bits* x, Bits* y, bool* mask, int64_t numel, int64_t n, int64_t m) {
  constexpr Bits kSign = Layout<Bits>::kSign;
  constexpr Bits kAbs = static_cast<Bits>(~kSign);
  std::atomic<int64_t> nonzero{0};
  at::parallel_for(0, numel / m, row_grain(m), [&](int64_t begin, int64_t end) {
    int64_t nz = 0;
    for (int64_t g = begin; g < end; ++g) {
      const Bits* xg = x + g * m;
      for (int64_t j = 0; j < m; ++j) {
        const Bits a = static_cast<Bits>(xg[j] & kAbs);
        int64_t beaten_by = 0;
        for (int64_t i = 0; i < m; ++i) {
          const Bits b = static_cast<Bits>(xg[i] & kAbs);
          beaten_by += (b > a) | ((b == a) & (i < j));
        }
        const bool keep = beaten_by < n;
        y[g * m + j] = static_cast<Bits>(xg[j] & (keep ? static_cast<Bits>(~Bits(0)) : kSign));
        if (mask) mask[g * m + j] = keep;
        nz += keep & (a != 0);
      }
    }
    nonzero += nz;
  });
  return nonzero.load();
}

// Common checks and allocation; calls fn(bits_in, bits_out, mask_or_null) with the right width.
template <typename Fn>
std::tuple<at::Tensor, at::Tensor, int64_t> dispatch(const at::Tensor& x, bool want_mask, Fn fn) {
  TORCH_CHECK(x.device().is_cpu(), "qsparse kernel: expected a CPU tensor");
  TORCH_CHECK(x.is_contiguous(), "qsparse kernel: expected a contiguous tensor");
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = want_mask ? at::empty(x.sizes(), x.options().dtype(at::kBool)) : at::Tensor();
  bool* m = want_mask ? mask.data_ptr<bool>() : nullptr;
  int64_t nonzero = 0;
  switch (x.scalar_type()) {
    case at::kHalf:
    case at::kBFloat16:
      nonzero = fn(static_cast<const uint16_t*>(x.const_data_ptr()),
                   static_cast<uint16_t*>(y.data_ptr()), m);
      break;
    case at::kFloat:
      nonzero = fn(static_cast<const uint32_t*>(x.const_data_ptr()),
                   static_cast<uint32_t*>(y.data_ptr()), m);
      break;
    case at::kDouble:
      nonzero = fn(static_cast<const uint64_t*>(x.const_data_ptr()),
                   static_cast<uint64_t*>(y.data_ptr()), m);
      break;
    default:
      TORCH_CHECK(false, "qsparse kernel: unsupported dtype ", x.scalar_type());
  }
  return {y, mask, nonzero};
}

std::tuple<at::Tensor, at::Tensor, int64_t> topk_sparsify(const at::Tensor& x, int64_t k,
                                                          bool want_mask) {
  TORCH_CHECK(x.dim() >= 1, "qsparse kernel: expected at least one dimension");
  const int64_t d = x.size(-1);
  TORCH_CHECK(k >= 1 && k < d, "qsparse kernel: need 1 <= k < d, got k=", k, ", d=", d);
  const int64_t rows = x.numel() / d;
  return dispatch(x, want_mask, [&](const auto* in, auto* out, bool* m) {
    return topk_rows(in, out, m, rows, d, k);
  });
}

std::tuple<at::Tensor, at::Tensor, int64_t> block_sparsify(const at::Tensor& x, int64_t n,
                                                           int64_t m, bool want_mask) {
  TORCH_CHECK(x.dim() >= 1 && m >= 1 && n >= 0 && x.size(-1) % m == 0,
              "qsparse kernel: the last dim must be a multiple of M, got ", x.size(-1), " and ", m);
  return dispatch(x, want_mask, [&](const auto* in, auto* out, bool* mk) {
    return block_rows(in, out, mk, x.numel(), n, m);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("topk_sparsify", &topk_sparsify, "Exact per-row Top-K by |x| (ties to the lower index)",
          pybind11::arg("x"), pybind11::arg("k"), pybind11::arg("want_mask"));
  mod.def("block_sparsify", &block_sparsify, "Block N:M by |x| (ties to the lower index)",
          pybind11::arg("x"), pybind11::arg("n"), pybind11::arg("m"), pybind11::arg("want_mask"));
}
