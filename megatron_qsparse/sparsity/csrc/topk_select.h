// Exact per-row Top-K threshold by |x| on IEEE bit patterns, shared by the compiled sparsify kernel
// (sparsify_cpu.cpp) and the sparse decode GEMV (inference/csrc/sparse_gemv_cpu.cpp), so both select
// exactly the entries of sparsity/masks.py's topk_mask (ties to the LOWER index).
//
// With the sign bit cleared, the order of |x| equals the order of the bits read as unsigned
// integers (NaN sorts above inf). Per row:
//   1. histogram of the top bits of |x| (2048 bins for fp32/fp64, 1024 for 16-bit types);
//   2. walk the bins down from the largest to find the bin holding the k-th largest key;
//   3. gather that bin's keys (typically a few percent of the row) and nth_element them to get
//      the exact k-th largest key T; if more keys equal T than there is room for, find the index
//      of the last one we may keep (the lowest-index ones win).
// Entry i is kept when |x_i| > T, or |x_i| == T and i < limit.
// fp32 rows on CPUs with AVX-512 find the bin range (step 1) and gather the bin's keys (step 3)
// 16 keys at a time; the histogram increments stay scalar, over two interleaved histograms.
// Measured (2 threads, Top-K 0.4 of [2048, 2048] fp32 rows through topk_sparsify): 3.55 -> 1.92 ms.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace qsparse {

#if !defined(__x86_64__) && !defined(__i386__)
inline bool select_avx512() { return false; }
#else
#define QS_SELECT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

// Whether the fp32 passes below run with AVX-512 (checked once).
inline bool select_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return ok;
}

// fp32 keys: the smallest and largest histogram bin of |x| (bits >> shift), 16 keys at a time.
QS_SELECT_AVX512 inline void bin_range_512(const uint32_t* x, int64_t d, int shift, int64_t* lo,
                                           int64_t* hi) {
  const __m512i abs = _mm512_set1_epi32(0x7fffffff);
  __m512i mn = _mm512_set1_epi32(-1), mx = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m512i b = _mm512_srli_epi32(_mm512_and_si512(_mm512_loadu_si512(x + i), abs), shift);
    mn = _mm512_min_epu32(mn, b);
    mx = _mm512_max_epu32(mx, b);
  }
  uint32_t l = _mm512_reduce_min_epu32(mn), h = _mm512_reduce_max_epu32(mx);
  for (; i < d; ++i) {
    const uint32_t b = (x[i] & 0x7fffffffu) >> shift;
    l = std::min(l, b);
    h = std::max(h, b);
  }
  *lo = l;
  *hi = h;
}

// fp32 keys: the |x| bits of every key in bin b0 written to c (room for d + 16), their count.
QS_SELECT_AVX512 inline int64_t bin_keys_512(const uint32_t* x, int64_t d, int shift, uint32_t b0,
                                             uint32_t* c) {
  const __m512i abs = _mm512_set1_epi32(0x7fffffff), bin = _mm512_set1_epi32(b0);
  int64_t n = 0, i = 0;
  for (; i + 16 <= d; i += 16) {
    const __m512i a = _mm512_and_si512(_mm512_loadu_si512(x + i), abs);
    const __mmask16 m = _mm512_cmpeq_epi32_mask(_mm512_srli_epi32(a, shift), bin);
    _mm512_storeu_si512(c + n, _mm512_maskz_compress_epi32(m, a));
    n += __builtin_popcount(m);
  }
  for (; i < d; ++i) {
    const uint32_t a = x[i] & 0x7fffffffu;
    c[n] = a;
    n += (a >> shift) == b0;
  }
  return n;
}
#endif

// Bit-level description of each storage width: the sign bit and how far to shift |x| so that the
// histogram bins keep the exponent plus a few mantissa bits.
template <typename Bits> struct Layout;
template <> struct Layout<uint16_t> {  // fp16, bf16
  static constexpr uint16_t kSign = 0x8000u;
  static constexpr int kShift = 5;  // 15 magnitude bits -> 1024 bins (bf16: exponent + 2 bits)
};
template <> struct Layout<uint32_t> {  // fp32
  static constexpr uint32_t kSign = 0x80000000u;
  static constexpr int kShift = 20;  // 31 magnitude bits -> 2048 bins (exponent + 3 mantissa bits)
};
template <> struct Layout<uint64_t> {  // fp64
  static constexpr uint64_t kSign = uint64_t(1) << 63;
  static constexpr int kShift = 52;  // 63 magnitude bits -> 2048 bins (the exponent)
};

template <typename Bits>
constexpr int64_t kBins = int64_t(1) << (8 * sizeof(Bits) - 1 - Layout<Bits>::kShift);

// The threshold of one row: keep |x| > t, and |x| == t below index `limit`. `greater` counts the
// keys > t; the row keeps exactly k entries, of which `t == 0 ? greater : k` are nonzero.
template <typename Bits> struct Threshold {
  Bits t;
  int64_t limit;
  int64_t greater;
};

// Per-thread scratch: the histogram and the candidates of the threshold bin.
template <typename Bits>
struct TopKSelect {
  std::vector<uint32_t> hist;
  std::vector<Bits> cand;

  // hist: two histograms (the second for the interleaved counting of the AVX-512 path);
  // cand: room for d keys plus one vector store past them.
  explicit TopKSelect(int64_t d) : hist(2 * kBins<Bits>, 0), cand(d + 16) {}

  // Threshold of a row of d entries keeping k (1 <= k < d).
  Threshold<Bits> find(const Bits* x, int64_t d, int64_t k) {
    constexpr int kShift = Layout<Bits>::kShift;
    constexpr Bits kAbs = static_cast<Bits>(~Layout<Bits>::kSign);
    uint32_t* h = hist.data();

    // 1. histogram of the top bits, and the range of bins touched. fp32 rows with AVX-512: the
    // range in a vector pass, so that the scalar loop is the increments alone, counted into two
    // interleaved histograms (neighbouring keys in one bin no longer wait on each other's
    // store), merged over the range touched.
    int64_t lo = kBins<Bits> - 1, hi = 0;
    const bool vec = sizeof(Bits) == 4 && select_avx512();
    if (vec) {
#if defined(__x86_64__) || defined(__i386__)
      bin_range_512(reinterpret_cast<const uint32_t*>(x), d, kShift, &lo, &hi);
      uint32_t* h2 = h + kBins<Bits>;
      int64_t i = 0;
      for (; i + 2 <= d; i += 2) {
        ++h[static_cast<Bits>(x[i] & kAbs) >> kShift];
        ++h2[static_cast<Bits>(x[i + 1] & kAbs) >> kShift];
      }
      if (i < d) ++h[static_cast<Bits>(x[i] & kAbs) >> kShift];
      for (int64_t b = lo; b <= hi; ++b) {
        h[b] += h2[b];
        h2[b] = 0u;
      }
#endif
    } else {
      for (int64_t i = 0; i < d; ++i) {
        const int64_t b = static_cast<Bits>(x[i] & kAbs) >> kShift;
        ++h[b];
        lo = std::min(lo, b);
        hi = std::max(hi, b);
      }
    }
    // 2. from the top bin down, find bin b0 holding the k-th largest key; `above` keys lie above.
    int64_t above = 0, b0 = hi;
    while (above + h[b0] < k) above += h[b0--];
    std::fill(h + lo, h + hi + 1, 0u);  // clean for the next row

    // 3. exact k-th largest key t among the keys of bin b0 (branch-free compaction).
    int64_t n = 0;
    Bits* c = cand.data();
    if (vec) {
#if defined(__x86_64__) || defined(__i386__)
      n = bin_keys_512(reinterpret_cast<const uint32_t*>(x), d, kShift,
                       static_cast<uint32_t>(b0), reinterpret_cast<uint32_t*>(c));
#endif
    } else {
      for (int64_t i = 0; i < d; ++i) {
        const Bits a = static_cast<Bits>(x[i] & kAbs);
        c[n] = a;
        n += (a >> kShift) == b0;
      }
    }
    const int64_t r = k - above;  // rank of the threshold inside the bin, 1 <= r <= n
    std::nth_element(c, c + (r - 1), c + n, std::greater<Bits>());
    const Bits t = c[r - 1];
    int64_t greater = above, equal = 0;
    for (int64_t j = 0; j < n; ++j) {
      greater += c[j] > t;
      equal += c[j] == t;
    }
    // Ties at t: keep the first `room` of them in index order, i.e. |x| == t only below `limit`.
    const int64_t room = k - greater;
    int64_t limit = d;
    if (room < equal) {
      int64_t seen = 0;
      for (int64_t i = 0; i < d; ++i) {
        if (static_cast<Bits>(x[i] & kAbs) == t && ++seen == room) {
          limit = i + 1;
          break;
        }
      }
    }
    return {t, limit, greater};
  }
};

}  // namespace qsparse
