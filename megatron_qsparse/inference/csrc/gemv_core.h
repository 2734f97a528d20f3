// The sparse GEMV machinery shared by the per-projection kernels (sparse_gemv_cpu.cpp) and the
// compiled decode step (decode_step.h): kept-set gathering (Top-K / nonzero / all), the product
// over the kept rows of an input-major weight (fp32, bf16, 2-bit ternary) with run-time ISA
// dispatch, and the thread pool. Included by exactly one translation unit (sparse_gemv_cpu.cpp).
// See sparse_gemv_cpu.cpp for the design notes.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>  // at::get_num_threads

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <type_traits>
#include <unistd.h>
#include <cstdint>
#include <cstring>
#include <vector>

#include "topk_select.h"

namespace qsparse_gemv {

constexpr int64_t kChunk = 2048;  // outputs accumulated per block: 8 KB of fp32, stays in L1
constexpr int64_t kAlign = 16;    // thread slices start on 64-byte boundaries of fp32 outputs

// Where the compiled decode step's time goes, per phase, when switched on (set_profile): the
// counters add up nanoseconds over steps until read. Off, a phase costs one flag test.
enum Phase : int {
  kSelect, kQkv, kO, kGateUp, kDown, kRouter,  // selection; the products by projection
  kReduce, kHead, kAttention, kActivation, kStep, kWait, kPhases
};

struct Profile {
  bool on = false;
  int64_t steps = 0;
  int64_t ns[kPhases] = {};
};

inline Profile& profile() {
  static Profile p;
  return p;
}

// Adds the time from construction to destruction to one phase, when profiling.
class PhaseTimer {
 public:
  explicit PhaseTimer(Phase ph) : ph_(ph), on_(profile().on) {
    if (on_) t0_ = std::chrono::steady_clock::now();
  }
  ~PhaseTimer() {
    if (on_)
      profile().ns[ph_] += std::chrono::duration_cast<std::chrono::nanoseconds>(
                               std::chrono::steady_clock::now() - t0_).count();
  }
  PhaseTimer(const PhaseTimer&) = delete;
  PhaseTimer& operator=(const PhaseTimer&) = delete;

 private:
  Phase ph_;
  bool on_;
  std::chrono::steady_clock::time_point t0_;
};

// The kept inputs of one token: their indices (ascending) and values (fp32).
// Buffers grow to the widest input seen and are reused; n entries are valid.
struct Kept {
  std::vector<int64_t> idx;
  std::vector<float> val;
  int64_t n = 0;
  int64_t iota = 0;  // idx[0:iota) is known to hold 0, 1, ..., iota - 1 (see keep_all)
  void reserve(int64_t d) {  // room for d entries plus one vector store past them
    if (static_cast<int64_t>(idx.size()) < d + 16) {
      idx.resize(d + 16);
      val.resize(d + 16);
    }
  }
};

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// IEEE half -> float (scalar tails and the baseline path; the vector paths use F16C).
inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);  // inf / NaN
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: normalize
    int e = -1;
    do {
      man <<= 1;
      ++e;
    } while (!(man & 0x400u));
    u = sign | ((112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Weight storage types. fp16 is a distinct type from bf16 (both are 16-bit words).
struct Half16 { uint16_t bits; };
static_assert(sizeof(Half16) == 2, "Half16 must be a 16-bit word");

template <typename WT> inline float wload(const WT* p, int64_t c);
template <> inline float wload<float>(const float* p, int64_t c) { return p[c]; }
template <> inline float wload<uint16_t>(const uint16_t* p, int64_t c) {
  return bf16_to_float(p[c]);
}
template <> inline float wload<Half16>(const Half16* p, int64_t c) {
  return fp16_to_float(p[c].bits);
}
template <> inline float wload<int8_t>(const int8_t* p, int64_t c) {
  return static_cast<float>(p[c]);
}

// ---------------------------------------------------------------------------------------------
// The inner loop: acc[0:len) = sum_r val[r] * w[idx[r]·ld + c0 + (0:len)] over nk kept rows.
//
// Rows go eight at a time: one pass over the accumulator per eight weight streams (for int8 weights
// the accumulator would otherwise cost more traffic than the weights). Each step covers 4 vectors
// of outputs (64 with AVX-512) with four independent accumulators in registers, so a step is
// 8 rows x 4 wide loads (one cache line of fp32 per row and vector). Every row segment is a long
// sequential run that the hardware prefetchers follow; consecutive rows (dense) get no software
// prefetch (measured: it cost bandwidth), scattered kept rows get the start of the next pass's
// rows prefetched, and int8 rows are prefetched ahead all along (prefetch_step below). The last
// nk mod 8 rows go in one pass. Written with intrinsics per ISA.

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define QS_AVX2 __attribute__((target("avx2,fma,f16c")))

// Vector traits: load 16 (AVX-512) / 8 (AVX2) weights of type WT as fp32.
struct V512 {
  using vec = __m512;
  static constexpr int kW = 16;
  QS_AVX512 static inline vec zero() { return _mm512_setzero_ps(); }
  QS_AVX512 static inline vec set1(float v) { return _mm512_set1_ps(v); }
  QS_AVX512 static inline vec ld(const float* p) { return _mm512_loadu_ps(p); }
  QS_AVX512 static inline void st(float* p, vec v) { _mm512_storeu_ps(p, v); }
  QS_AVX512 static inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  QS_AVX512 static inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  QS_AVX512 static inline float hsum(vec a) { return _mm512_reduce_add_ps(a); }
  QS_AVX512 static inline vec w(const float* p) { return _mm512_loadu_ps(p); }
  QS_AVX512 static inline vec w(const uint16_t* p) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
  }
  QS_AVX512 static inline vec w(const Half16* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  QS_AVX512 static inline vec w(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
};

struct V256 {
  using vec = __m256;
  static constexpr int kW = 8;
  QS_AVX2 static inline vec zero() { return _mm256_setzero_ps(); }
  QS_AVX2 static inline vec set1(float v) { return _mm256_set1_ps(v); }
  QS_AVX2 static inline vec ld(const float* p) { return _mm256_loadu_ps(p); }
  QS_AVX2 static inline void st(float* p, vec v) { _mm256_storeu_ps(p, v); }
  QS_AVX2 static inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  QS_AVX2 static inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  QS_AVX2 static inline float hsum(vec a) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
  QS_AVX2 static inline vec w(const float* p) { return _mm256_loadu_ps(p); }
  QS_AVX2 static inline vec w(const uint16_t* p) {
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
  QS_AVX2 static inline vec w(const Half16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  QS_AVX2 static inline vec w(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

// Software prefetch of the next pass's rows, for scattered (sparse) kept rows only: the hardware
// prefetchers restart at each row, so while the last kPrefetchBytes of the current eight rows are
// read, the first kPrefetchBytes of the next eight are requested (all of them when the rows are
// shorter). Rows that follow each other in memory (the dense product) are left to the hardware.
// Measured end to end (S = 0.6, 8-layer 2048-wide model, 2 threads): int8 +9%, fp16 +4%, fp32
// +1%; bf16 within noise at 1 KB and -2% at 2 KB, hence 1 KB for 16-bit weights.
//
// int8 weights also prefetch kPrefetchBytes ahead inside the current rows (kPrefetchInRow), in
// dense and sparse passes alike, so every row is one software-prefetched stream that runs on into
// the next pass's row. Their loops spend the most instructions per cache line of weights (12 per
// line on the fp32 path), so the out-of-order window holds the fewest weight loads in flight and
// the hardware prefetchers, which restart at each short row, leave the rest of the latency
// exposed. Measured end to end (same model, 12-15 alternations): S = 0.6 +8-11%, dense +7-10%,
// with 1 KB (512 B: 4% less; 2 KB: only the first 2 KB of each 2 KB row, i.e. none in-row). The
// wider types gain nothing from it (bf16, fp16 within noise; fp32 dense -7%).
template <typename WT>
constexpr int64_t kPrefetchBytes = sizeof(WT) == 4 ? 2048 : 1024;
template <typename WT>
constexpr bool kPrefetchInRow = sizeof(WT) == 1;

// First output of a row segment of len weights from which the next rows are prefetched.
template <typename WT>
inline int64_t prefetch_from(int64_t len) {
  return std::max<int64_t>(0, len - kPrefetchBytes<WT> / static_cast<int64_t>(sizeof(WT)));
}

// How far ahead (in weights) the current rows are prefetched before that point: 0 for no
// in-row prefetch.
template <typename WT>
inline int64_t prefetch_ahead(int64_t len) {
  return kPrefetchInRow<WT> ? len - prefetch_from<WT>(len) : 0;
}

// The row pointers of the pass after the one at r (of eight rows; past the last kept row the last
// one again), false when there is none or the rows are consecutive in memory.
template <typename WT>
inline bool next_rows(const int64_t* idx, int64_t r, int64_t nk, const WT* w, int64_t ld,
                      int64_t c0, const WT** nx) {
  if (r + 8 >= nk) return false;
  const int64_t last = std::min(nk - 1, r + 15);
  if (idx[last] - idx[r] == last - r) return false;
  for (int i = 0; i < 8; ++i) nx[i] = w + idx[std::min(nk - 1, r + 8 + i)] * ld + c0;
  return true;
}

// Prefetch (to L1) the cache lines of R rows holding elements [off, off + kElems).
template <int R, int kElems, typename WT>
inline __attribute__((always_inline)) void prefetch_rows(const WT* const* nx, int64_t off) {
  constexpr int kBytes = kElems * static_cast<int>(sizeof(WT));
  for (int i = 0; i < R; ++i) {
    const char* q = reinterpret_cast<const char*>(nx[i] + off);
    for (int b = 0; b < kBytes; b += 64) _mm_prefetch(q + b, _MM_HINT_T0);
  }
}

// The prefetches of one loop step at output j of rows p: the current rows `ahead` weights on
// (kPrefetchInRow types) until pf_from, from there the next pass's rows nx (when there are any).
template <int R, int kElems, typename WT>
inline __attribute__((always_inline)) void prefetch_step(const WT* const* p, const WT* const* nx,
                                                         int64_t j, int64_t pf_from,
                                                         int64_t ahead) {
  if (j >= pf_from) {
    if (nx) prefetch_rows<R, kElems>(nx, j - pf_from);
  } else if (ahead) {
    prefetch_rows<R, kElems>(p, j + ahead);
  }
}

// f(std::integral_constant<int, R>{}) for a run-time row count R in [1, 8] (nothing for 0): the
// one dispatch from a pass's row count to the row kernels, which take R as a template argument.
template <typename F>
inline __attribute__((always_inline)) void with_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 8: return f(std::integral_constant<int, 8>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 1: return f(std::integral_constant<int, 1>{});
    default: return;
  }
}

// R rows (R <= 8) into acc over [0, len): vector steps of 4·kW, then kW, then scalar.
#define QS_ROWS_KERNEL(TARGET, V)                                                                \
  template <int R, typename WT>                                                                  \
  TARGET inline void rows_##V(const WT* const* p, const float* v, int64_t len, float* acc,      \
                              const WT* const* nx = nullptr, int64_t pf_from = 0,               \
                              int64_t ahead = 0) {                                               \
    constexpr int kW = V::kW;                                                                    \
    typename V::vec vv[R];                                                                       \
    for (int i = 0; i < R; ++i) vv[i] = V::set1(v[i]);                                           \
    int64_t j = 0;                                                                               \
    for (; j + 4 * kW <= len; j += 4 * kW) {                                                     \
      prefetch_step<R, 4 * kW>(p, nx, j, pf_from, ahead);                                        \
      typename V::vec a0 = V::ld(acc + j), a1 = V::ld(acc + j + kW);                             \
      typename V::vec a2 = V::ld(acc + j + 2 * kW), a3 = V::ld(acc + j + 3 * kW);                \
      for (int i = 0; i < R; ++i) {                                                              \
        a0 = V::fma(vv[i], V::w(p[i] + j), a0);                                                  \
        a1 = V::fma(vv[i], V::w(p[i] + j + kW), a1);                                             \
        a2 = V::fma(vv[i], V::w(p[i] + j + 2 * kW), a2);                                         \
        a3 = V::fma(vv[i], V::w(p[i] + j + 3 * kW), a3);                                         \
      }                                                                                          \
      V::st(acc + j, a0);                                                                        \
      V::st(acc + j + kW, a1);                                                                   \
      V::st(acc + j + 2 * kW, a2);                                                               \
      V::st(acc + j + 3 * kW, a3);                                                               \
    }                                                                                            \
    for (; j + kW <= len; j += kW) {                                                             \
      typename V::vec a0 = V::ld(acc + j);                                                       \
      for (int i = 0; i < R; ++i) a0 = V::fma(vv[i], V::w(p[i] + j), a0);                        \
      V::st(acc + j, a0);                                                                        \
    }                                                                                            \
    for (; j < len; ++j) {                                                                       \
      float a = acc[j];                                                                          \
      for (int i = 0; i < R; ++i) a += v[i] * wload(p[i], j);                                    \
      acc[j] = a;                                                                                \
    }                                                                                            \
  }                                                                                              \
  template <typename WT>                                                                         \
  TARGET void block_##V(const float* val, const int64_t* idx, int64_t nk, const WT* w,         \
                        int64_t ld, int64_t c0, int64_t len, float* acc) {                      \
    for (int64_t c = 0; c < len; ++c) acc[c] = 0.f;                                              \
    const WT* p[8];                                                                              \
    const WT* nx[8];                                                                             \
    const int64_t pf_from = prefetch_from<WT>(len), ahead = prefetch_ahead<WT>(len);             \
    int64_t r = 0;                                                                               \
    for (; r + 8 <= nk; r += 8) {                                                                \
      for (int i = 0; i < 8; ++i) p[i] = w + idx[r + i] * ld + c0;                               \
      const bool pf = next_rows(idx, r, nk, w, ld, c0, nx);                                      \
      rows_##V<8, WT>(p, val + r, len, acc, pf ? nx : nullptr, pf_from, ahead);                  \
    }                                                                                            \
    /* the last nk - r < 8 rows in one pass (the same FMAs in the same order per output) */     \
    for (int64_t i = r; i < nk; ++i) p[i - r] = w + idx[i] * ld + c0;                            \
    with_rows(nk - r, [&](auto R) {                                                              \
      rows_##V<decltype(R)::value, WT>(p, val + r, len, acc, nullptr, pf_from, ahead);           \
    });                                                                                          \
  }                                                                                              \
  TARGET inline float sum_##V(const float* a, int64_t n) {                                       \
    typename V::vec s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();              \
    int64_t i = 0;                                                                               \
    for (; i + 4 * V::kW <= n; i += 4 * V::kW) {                                                 \
      s0 = V::add(s0, V::ld(a + i));                                                             \
      s1 = V::add(s1, V::ld(a + i + V::kW));                                                     \
      s2 = V::add(s2, V::ld(a + i + 2 * V::kW));                                                 \
      s3 = V::add(s3, V::ld(a + i + 3 * V::kW));                                                 \
    }                                                                                            \
    float s = V::hsum(V::add(V::add(s0, s1), V::add(s2, s3)));                                   \
    for (; i < n; ++i) s += a[i];                                                                \
    return s;                                                                                    \
  }
QS_ROWS_KERNEL(QS_AVX512, V512)
QS_ROWS_KERNEL(QS_AVX2, V256)
#undef QS_ROWS_KERNEL

// bf16 with AVX-512, fewer uops per weight: one 64-byte load holds 32 weights, and each 32-bit
// lane of it is two bf16 words, so a shift (the low word, output 2i) and a mask (the high word,
// output 2i + 1) make two fp32 vectors with no widening shuffle. The accumulator of each run of
// 32 outputs is then held as [16 even, 16 odd] and put back in order once the unit's rows are
// summed. Every output still takes the same FMAs in the same row order as block_V512 (the
// results are identical); runs past the last full 64 outputs use block_V512's loops.
template <int R>
QS_AVX512 inline void rows_bf16_split(const uint16_t* const* p, const float* v, int64_t main,
                                      float* acc, const uint16_t* const* nx, int64_t pf_from) {
  __m512 vv[R];
  for (int i = 0; i < R; ++i) vv[i] = _mm512_set1_ps(v[i]);
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t j = 0; j < main; j += 64) {
    prefetch_step<R, 64>(p, nx, j, pf_from, 0);  // no in-row prefetch for bf16
    __m512 a0 = _mm512_loadu_ps(acc + j), a1 = _mm512_loadu_ps(acc + j + 16);
    __m512 a2 = _mm512_loadu_ps(acc + j + 32), a3 = _mm512_loadu_ps(acc + j + 48);
    for (int i = 0; i < R; ++i) {
      const __m512i w0 = _mm512_loadu_si512(p[i] + j), w1 = _mm512_loadu_si512(p[i] + j + 32);
      a0 = _mm512_fmadd_ps(vv[i], _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), a0);
      a1 = _mm512_fmadd_ps(vv[i], _mm512_castsi512_ps(_mm512_and_si512(w0, hi)), a1);
      a2 = _mm512_fmadd_ps(vv[i], _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), a2);
      a3 = _mm512_fmadd_ps(vv[i], _mm512_castsi512_ps(_mm512_and_si512(w1, hi)), a3);
    }
    _mm512_storeu_ps(acc + j, a0);
    _mm512_storeu_ps(acc + j + 16, a1);
    _mm512_storeu_ps(acc + j + 32, a2);
    _mm512_storeu_ps(acc + j + 48, a3);
  }
}

template <int R>
QS_AVX512 inline void rows_bf16_512(const uint16_t* const* p, const float* v, int64_t main,
                                    int64_t len, float* acc, const uint16_t* const* nx = nullptr,
                                    int64_t pf_from = 0) {
  rows_bf16_split<R>(p, v, main, acc, nx, pf_from);
  if (main < len) {
    const uint16_t* q[8];
    for (int i = 0; i < R; ++i) q[i] = p[i] + main;
    rows_V512<R, uint16_t>(q, v, len - main, acc + main);
  }
}

QS_AVX512 void block_bf16_512(const float* val, const int64_t* idx, int64_t nk,
                              const uint16_t* w, int64_t ld, int64_t c0, int64_t len,
                              float* acc) {
  const int64_t main = len / 64 * 64;
  for (int64_t c = 0; c < len; ++c) acc[c] = 0.f;
  const uint16_t* p[8];
  const uint16_t* nx[8];
  const int64_t pf_from = prefetch_from<uint16_t>(len);
  int64_t r = 0;
  for (; r + 8 <= nk; r += 8) {
    for (int i = 0; i < 8; ++i) p[i] = w + idx[r + i] * ld + c0;
    const bool pf = next_rows(idx, r, nk, w, ld, c0, nx);
    rows_bf16_512<8>(p, val + r, main, len, acc, pf ? nx : nullptr, pf_from);
  }
  for (int64_t i = r; i < nk; ++i) p[i - r] = w + idx[i] * ld + c0;  // the last < 8 in one pass
  with_rows(nk - r, [&](auto R) { rows_bf16_512<decltype(R)::value>(p, val + r, main, len, acc); });
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t j = 0; j < main; j += 32) {  // [even, odd] -> outputs in order
    const __m512 e = _mm512_loadu_ps(acc + j), o = _mm512_loadu_ps(acc + j + 16);
    _mm512_storeu_ps(acc + j, _mm512_permutex2var_ps(e, lo_idx, o));
    _mm512_storeu_ps(acc + j + 16, _mm512_permutex2var_ps(e, hi_idx, o));
  }
}

// int8 weights with AVX-512 VNNI: the activations of each pass of eight kept rows are quantized
// to int16 (one scale per pass, s = max|v| / 32767, so |error| <= s / 2: 2^-16 of the pass's
// largest |v|, far below the int8 weights' own 2^-8), two rows are interleaved word by word and
// vpdpwssd multiplies and sums each pair into int32, which is converted and scaled into the fp32
// accumulator once per pass. Per 8 rows x 64 outputs that is 16 widening loads, 16 unpacks,
// 16 dot products and 4 conversions instead of 32 widening loads, 32 conversions and 32 FMAs
// (block_V512<int8_t>). Within each 128-bit lane, unpacklo/hi of 16-bit words give the outputs
// 8L + 0..3 and 8L + 4..7, so each run of 32 outputs accumulates as [lo lanes, hi lanes] and is
// put back in order once the unit's rows are summed. Outputs past the last full 64 take
// block_V512's fp32 path (exact activations); rows past the last full pass are padded with the
// last kept row at activation 0. A unit with an inf or NaN activation takes the fp32 path.
#define QS_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

QS_VNNI inline void rows_i8_vnni(const int8_t* const* p, const int32_t* xp, float s,
                                 int64_t main, float* acc, const int8_t* const* nx,
                                 int64_t pf_from, int64_t ahead) {
  const __m512i x0 = _mm512_set1_epi32(xp[0]), x1 = _mm512_set1_epi32(xp[1]);
  const __m512i x2 = _mm512_set1_epi32(xp[2]), x3 = _mm512_set1_epi32(xp[3]);
  const __m512 vs = _mm512_set1_ps(s);
  for (int64_t j = 0; j < main; j += 64) {
    prefetch_step<8, 64>(p, nx, j, pf_from, ahead);
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();
    __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
#define QS_PAIR(T, X)                                                                            \
    {                                                                                            \
      const __m512i u0 = _mm512_cvtepi8_epi16(                                                   \
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[2 * T] + j)));                  \
      const __m512i v0 = _mm512_cvtepi8_epi16(                                                   \
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[2 * T + 1] + j)));              \
      const __m512i u1 = _mm512_cvtepi8_epi16(                                                   \
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[2 * T] + j + 32)));             \
      const __m512i v1 = _mm512_cvtepi8_epi16(                                                   \
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p[2 * T + 1] + j + 32)));         \
      a0 = _mm512_dpwssd_epi32(a0, _mm512_unpacklo_epi16(u0, v0), X);                            \
      a1 = _mm512_dpwssd_epi32(a1, _mm512_unpackhi_epi16(u0, v0), X);                            \
      a2 = _mm512_dpwssd_epi32(a2, _mm512_unpacklo_epi16(u1, v1), X);                            \
      a3 = _mm512_dpwssd_epi32(a3, _mm512_unpackhi_epi16(u1, v1), X);                            \
    }
    QS_PAIR(0, x0)
    QS_PAIR(1, x1)
    QS_PAIR(2, x2)
    QS_PAIR(3, x3)
#undef QS_PAIR
    _mm512_storeu_ps(acc + j, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), vs, _mm512_loadu_ps(acc + j)));
    _mm512_storeu_ps(acc + j + 16,
                     _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), vs, _mm512_loadu_ps(acc + j + 16)));
    _mm512_storeu_ps(acc + j + 32,
                     _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2), vs, _mm512_loadu_ps(acc + j + 32)));
    _mm512_storeu_ps(acc + j + 48,
                     _mm512_fmadd_ps(_mm512_cvtepi32_ps(a3), vs, _mm512_loadu_ps(acc + j + 48)));
  }
}

QS_VNNI void block_i8_vnni(const float* val, const int64_t* idx, int64_t nk, const int8_t* w,
                           int64_t ld, int64_t c0, int64_t len, float* acc) {
  for (int64_t i = 0; i < nk; ++i)  // inf / NaN: the fp32 path propagates them as the reference
    if (!std::isfinite(val[i])) return block_V512<int8_t>(val, idx, nk, w, ld, c0, len, acc);
  const int64_t main = len / 64 * 64;
  for (int64_t c = 0; c < len; ++c) acc[c] = 0.f;
  const int8_t* p[8];
  const int8_t* nx[8];
  const int64_t pf_from = prefetch_from<int8_t>(len), ahead = prefetch_ahead<int8_t>(len);
  for (int64_t r = 0; r < nk; r += 8) {
    const int64_t R = std::min<int64_t>(8, nk - r);
    for (int i = 0; i < 8; ++i) p[i] = w + idx[r + std::min<int64_t>(i, R - 1)] * ld + c0;
    float mx = 0.f;
    for (int64_t i = 0; i < R; ++i) mx = std::max(mx, std::fabs(val[r + i]));
    if (mx == 0.f) continue;  // eight zero activations add nothing
    const float scale = mx / 32767.f, inv = 32767.f / mx;
    int32_t q16[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < R; ++i) {
      const float qv = std::nearbyint(val[r + i] * inv);
      q16[i] = static_cast<int32_t>(std::min(32767.f, std::max(-32767.f, qv)));
    }
    int32_t xp[4];
    for (int t = 0; t < 4; ++t)
      xp[t] = static_cast<int32_t>((static_cast<uint32_t>(q16[2 * t]) & 0xffffu) |
                                   (static_cast<uint32_t>(q16[2 * t + 1]) << 16));
    const bool pf = R == 8 && next_rows(idx, r, nk, w, ld, c0, nx);
    rows_i8_vnni(p, xp, scale, main, acc, pf ? nx : nullptr, pf_from, ahead);
    if (main < len) {  // the outputs past the last full 64: fp32 activations, natural order
      const int8_t* q[8];
      for (int64_t i = 0; i < R; ++i) q[i] = p[i] + main;
      with_rows(R, [&](auto K) {
        rows_V512<decltype(K)::value, int8_t>(q, val + r, len - main, acc + main);
      });
    }
  }
  // [lo lanes, hi lanes] -> outputs in order, per 32
  const __m512i lo_idx = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i hi_idx =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t j = 0; j < main; j += 32) {
    const __m512 e = _mm512_loadu_ps(acc + j), o = _mm512_loadu_ps(acc + j + 16);
    _mm512_storeu_ps(acc + j, _mm512_permutex2var_ps(e, lo_idx, o));
    _mm512_storeu_ps(acc + j + 16, _mm512_permutex2var_ps(e, hi_idx, o));
  }
}
#endif

// Baseline x86-64 / other architectures: the same order of work in plain loops.
template <typename WT>
void block_base(const float* val, const int64_t* idx, int64_t nk, const WT* w, int64_t ld,
                int64_t c0, int64_t len, float* acc) {
  for (int64_t c = 0; c < len; ++c) acc[c] = 0.f;
  int64_t r = 0;
  for (; r + 4 <= nk; r += 4) {
    const WT* p0 = w + idx[r] * ld + c0;
    const WT* p1 = w + idx[r + 1] * ld + c0;
    const WT* p2 = w + idx[r + 2] * ld + c0;
    const WT* p3 = w + idx[r + 3] * ld + c0;
    const float v0 = val[r], v1 = val[r + 1], v2 = val[r + 2], v3 = val[r + 3];
    for (int64_t c = 0; c < len; ++c)
      acc[c] += (v0 * wload(p0, c) + v1 * wload(p1, c)) + (v2 * wload(p2, c) + v3 * wload(p3, c));
  }
  for (; r < nk; ++r) {
    const WT* p0 = w + idx[r] * ld + c0;
    for (int64_t c = 0; c < len; ++c) acc[c] += val[r] * wload(p0, c);
  }
}

inline float sum_base(const float* a, int64_t n) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i];
    s1 += a[i + 1];
    s2 += a[i + 2];
    s3 += a[i + 3];
  }
  for (; i < n; ++i) s0 += a[i];
  return (s0 + s1) + (s2 + s3);
}

// Ternary rows packed 4 per byte: byte b of a row holds the codes (t + 1, t in {-1, 0, 1}) of
// outputs b, b + P, b + 2P, b + 3P in bits 0-1, 2-3, 4-5, 6-7 (P = bytes per row). One byte range
// [b0, b0 + len) thus feeds four contiguous output ranges: acc[q·len + j] is output q·P + b0 + j.
inline __attribute__((always_inline)) void ternary_block(const float* __restrict val,
                                                         const int64_t* __restrict idx, int64_t nk,
                                                         const uint8_t* __restrict w, int64_t ld,
                                                         int64_t b0, int64_t len,
                                                         float* __restrict acc) {
  for (int64_t c = 0; c < 4 * len; ++c) acc[c] = 0.f;
  float* __restrict a0 = acc;
  float* __restrict a1 = acc + len;
  float* __restrict a2 = acc + 2 * len;
  float* __restrict a3 = acc + 3 * len;
  int64_t r = 0;
  for (; r + 2 <= nk; r += 2) {
    const uint8_t* __restrict p = w + idx[r] * ld + b0;
    const uint8_t* __restrict q = w + idx[r + 1] * ld + b0;
    const float u = val[r], v = val[r + 1];
    for (int64_t j = 0; j < len; ++j) {
      const int32_t x = p[j], y = q[j];
      a0[j] += u * static_cast<float>((x & 3) - 1) + v * static_cast<float>((y & 3) - 1);
      a1[j] += u * static_cast<float>(((x >> 2) & 3) - 1) + v * static_cast<float>(((y >> 2) & 3) - 1);
      a2[j] += u * static_cast<float>(((x >> 4) & 3) - 1) + v * static_cast<float>(((y >> 4) & 3) - 1);
      a3[j] += u * static_cast<float>((x >> 6) - 1) + v * static_cast<float>((y >> 6) - 1);
    }
  }
  for (; r < nk; ++r) {
    const uint8_t* __restrict p = w + idx[r] * ld + b0;
    const float u = val[r];
    for (int64_t j = 0; j < len; ++j) {
      const int32_t x = p[j];
      a0[j] += u * static_cast<float>((x & 3) - 1);
      a1[j] += u * static_cast<float>(((x >> 2) & 3) - 1);
      a2[j] += u * static_cast<float>(((x >> 4) & 3) - 1);
      a3[j] += u * static_cast<float>((x >> 6) - 1);
    }
  }
}

// The ternary loops compiled for three instruction sets; picked once by the CPU's features.
#define QS_CLONES(NAME, TARGET)                                                                  \
  TARGET void NAME##_ternary(const float* val, const int64_t* idx, int64_t nk, const uint8_t* w, \
                             int64_t ld, int64_t b0, int64_t len, float* acc) {                 \
    ternary_block(val, idx, nk, w, ld, b0, len, acc);                                            \
  }
QS_CLONES(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))))
QS_CLONES(avx2, __attribute__((target("avx2,fma"))))
QS_CLONES(base, )
#undef QS_CLONES

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return Isa::kAvx2;
#endif
  return Isa::kBase;
}

// The widest instruction set of this CPU, and the one the products run with: that one unless
// set_isa chose a narrower one (tests run every path a CPU can; benchmarks compare them). Set it
// between products only.
const Isa kCpuIsa = detect_isa();
Isa g_isa = kCpuIsa;

// int8 weights through AVX-512 VNNI (block_i8_vnni) where the CPU has it; set_int8_vnni picks
// the products that take it (tests of both paths, A/B benchmarks: bench/bench_int8_path.py).
#if defined(__x86_64__) || defined(__i386__)
const bool kCpuVnni = kCpuIsa == Isa::kAvx512 && __builtin_cpu_supports("avx512vnni");
#endif
inline bool int8_vnni_supported() {
#if defined(__x86_64__) || defined(__i386__)
  return g_isa == Isa::kAvx512 && kCpuVnni;
#else
  return false;
#endif
}

// 0: off, 1: dense products (consecutive rows) only (the default), 2: every product (for
// benchmarks: scattered rows measured slower on it); the setting, and the mode in effect (0 where
// the instruction set in use has no VNNI).
inline int& int8_vnni_setting() {
  static int mode = 1;
  return mode;
}
inline int int8_vnni_mode() { return int8_vnni_supported() ? int8_vnni_setting() : 0; }

template <typename WT>
void run_dense(const float* val, const int64_t* idx, int64_t nk, const WT* w, int64_t ld,
               int64_t c0, int64_t len, float* acc) {
  switch (g_isa) {
#if defined(__x86_64__) || defined(__i386__)
    case Isa::kAvx512:
      if constexpr (std::is_same<WT, uint16_t>::value)
        return block_bf16_512(val, idx, nk, w, ld, c0, len, acc);
      else if constexpr (std::is_same<WT, int8_t>::value) {
        // VNNI for consecutive rows (the dense product) only: measured on the 8-layer
        // 2048-wide model's shapes (2 threads, 4 runs each), dense tokens 2-6% faster, S = 0.6
        // 1-4% slower (scattered short int8 rows are bound by their access pattern, not by
        // the widening instructions VNNI saves)
        const int mode = int8_vnni_mode();
        if (mode == 2 || (mode == 1 && nk > 0 && idx[nk - 1] - idx[0] == nk - 1))
          return block_i8_vnni(val, idx, nk, w, ld, c0, len, acc);
      }
      return block_V512<WT>(val, idx, nk, w, ld, c0, len, acc);
    case Isa::kAvx2: return block_V256<WT>(val, idx, nk, w, ld, c0, len, acc);
#endif
    default: return block_base<WT>(val, idx, nk, w, ld, c0, len, acc);
  }
}

inline float run_sum(const float* a, int64_t n) {
  switch (g_isa) {
#if defined(__x86_64__) || defined(__i386__)
    case Isa::kAvx512: return sum_V512(a, n);
    case Isa::kAvx2: return sum_V256(a, n);
#endif
    default: return sum_base(a, n);
  }
}

void run_ternary(const float* val, const int64_t* idx, int64_t nk, const uint8_t* w, int64_t ld,
                 int64_t b0, int64_t len, float* acc) {
  switch (g_isa) {
    case Isa::kAvx512: return avx512_ternary(val, idx, nk, w, ld, b0, len, acc);
    case Isa::kAvx2: return avx2_ternary(val, idx, nk, w, ld, b0, len, acc);
    default: return base_ternary(val, idx, nk, w, ld, b0, len, acc);
  }
}

// Column-tiled weights: an input-major [d, n] weight stored as [n/64][d][64], n/64 row-layout
// matrices [d, 64] one after the other (tile_dense in cpu_kernels.py). A product over them works
// tile by tile, each tile one work unit accumulated in registers over all the kept rows: a unit
// reads one contiguous region (a dense product: one sequential stream, where a dense pass over the
// row layout reads eight streams a row apart), there are no row groups and no partial sums to
// add, no accumulator traffic, and the units are small enough (48-176 per product of a 2048-wide
// model) that the threads finish together. Each output is one FMA chain over the kept rows in
// order, as in a row-layout product run in one row group (the VNNI int8 path: the same passes of
// eight rows and scales as block_i8_vnni). Measured end to end on the dense 8-layer 2048-wide
// model (same-run A/B, 2 threads): bf16 and fp16 +17-21% and int8 +11% over an [in/8][out/64][8]
// [64] tiling that kept the row kernels, which itself gained 7-34% over the row layout; fp32
// -7 to -12% against both (four vector loads per row and step), so fp32 weights stay in rows.
constexpr int64_t kTileCols = 64;

// A column tile is read with a software prefetch 2 KB ahead (kTileAhead rows of 64 weights): one
// stream per thread leaves too few loads in flight for the hardware prefetcher on some CPUs while
// the FMA chains hold the window. Measured (bench/bench_dense_layout.py, dense tokens, 2 threads,
// an AVX-512 Xeon with AMX): bf16 tiles 0.64 -> 0.88 of STREAM, fp16 0.80 -> 0.88, int8 0.60 ->
// 0.67 (1 KB: bf16 0.90, fp16 0.83; 4 KB: 0.79-0.86).
template <typename WT>
constexpr int64_t kTileAhead = 2048 / (kTileCols * static_cast<int64_t>(sizeof(WT)));

#if defined(__x86_64__) || defined(__i386__)
// Prefetch the 64 weights of the kept row kTileAhead rows after r (the last one past the end).
template <typename WT>
inline __attribute__((always_inline)) void prefetch_tile_row(const WT* tile, const int64_t* idx,
                                                             int64_t r, int64_t nk) {
  const char* q = reinterpret_cast<const char*>(
      tile + idx[std::min(r + kTileAhead<WT>, nk - 1)] * kTileCols);
  for (int64_t b = 0; b < kTileCols * static_cast<int64_t>(sizeof(WT)); b += 64)
    _mm_prefetch(q + b, _MM_HINT_T0);
}
#endif

// A decode weight tensor's shape: [in, out] (rows) or [out/64, in, 64] (column tiles).
inline bool is_tiled(const at::Tensor& w) { return w.dim() == 3; }
inline int64_t weight_in(const at::Tensor& w) { return is_tiled(w) ? w.size(1) : w.size(0); }
inline int64_t weight_out(const at::Tensor& w) {
  return is_tiled(w) ? w.size(0) * kTileCols : w.size(1);
}
inline bool layout_ok(const at::Tensor& w) {
  return w.is_contiguous() && w.device().is_cpu() &&
         (w.dim() == 2 || (w.dim() == 3 && w.size(2) == kTileCols));
}

#if defined(__x86_64__) || defined(__i386__)
// Stores 64 outputs held as two runs of 32, each run split over two vectors (a, b) in a lane
// order that the permutex2var indices lo (its first 16) and hi (its last 16) put back in order.
QS_AVX512 inline void store_runs(float* out, __m512 a0, __m512 b0, __m512 a1, __m512 b1,
                                 __m512i lo, __m512i hi) {
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(a0, lo, b0));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(a0, hi, b0));
  _mm512_storeu_ps(out + 32, _mm512_permutex2var_ps(a1, lo, b1));
  _mm512_storeu_ps(out + 48, _mm512_permutex2var_ps(a1, hi, b1));
}

// One column tile [d][64] over the kept rows, accumulated in registers: out[0:64) =
// sum_r val[r] · tile[idx[r]][0:64), one FMA chain per output in row order.
template <typename WT>
QS_AVX512 void coltile_512(const float* val, const int64_t* idx, int64_t nk, const WT* tile,
                           float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t r = 0; r < nk; ++r) {
    const __m512 v = _mm512_set1_ps(val[r]);
    const WT* p = tile + idx[r] * kTileCols;
    prefetch_tile_row(tile, idx, r, nk);
    a0 = _mm512_fmadd_ps(v, V512::w(p), a0);
    a1 = _mm512_fmadd_ps(v, V512::w(p + 16), a1);
    a2 = _mm512_fmadd_ps(v, V512::w(p + 32), a2);
    a3 = _mm512_fmadd_ps(v, V512::w(p + 48), a3);
  }
  _mm512_storeu_ps(out, a0);
  _mm512_storeu_ps(out + 16, a1);
  _mm512_storeu_ps(out + 32, a2);
  _mm512_storeu_ps(out + 48, a3);
}

// bf16: one 64-byte load per 32 weights split by a shift (even outputs) and a mask (odd ones),
// put back in order once (as block_bf16_512).
QS_AVX512 void coltile_bf16_512(const float* val, const int64_t* idx, int64_t nk,
                                const uint16_t* tile, float* out) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t r = 0; r < nk; ++r) {
    const __m512 v = _mm512_set1_ps(val[r]);
    const uint16_t* p = tile + idx[r] * kTileCols;
    prefetch_tile_row(tile, idx, r, nk);
    const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 32);
    a0 = _mm512_fmadd_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), a0);
    a1 = _mm512_fmadd_ps(v, _mm512_castsi512_ps(_mm512_and_si512(w0, hi)), a1);
    a2 = _mm512_fmadd_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), a2);
    a3 = _mm512_fmadd_ps(v, _mm512_castsi512_ps(_mm512_and_si512(w1, hi)), a3);
  }
  store_runs(out, a0, a1, a2, a3,  // [16 even, 16 odd] per run of 32
             _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
             _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
}

// int8 with VNNI: the kept activations quantized to int16 once per product, per pass of eight
// rows (one scale each, as block_i8_vnni: s = max|v| / 32767), as word pairs xp; rows padded
// to a multiple of eight with activation 0. Each pass sums into int32 (vpdpwssd on two rows'
// interleaved words) and is scaled into the fp32 accumulators.
QS_VNNI void coltile_i8_vnni(const int32_t* xp, const float* ps, const int64_t* idx,
                             int64_t passes, const int8_t* tile, float* out) {
  __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
  for (int64_t g = 0; g < passes; ++g) {
    if (ps[g] == 0.f) continue;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 8 * g; i < 8 * g + 8; ++i) prefetch_tile_row(tile, idx, i, 8 * passes);
    for (int t = 0; t < 4; ++t) {
      const __m512i x = _mm512_set1_epi32(xp[4 * g + t]);
      const int8_t* pu = tile + idx[8 * g + 2 * t] * kTileCols;
      const int8_t* pv = tile + idx[8 * g + 2 * t + 1] * kTileCols;
      const __m512i u0 =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pu)));
      const __m512i v0 =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pv)));
      const __m512i u1 =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pu + 32)));
      const __m512i v1 =
          _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pv + 32)));
      a0 = _mm512_dpwssd_epi32(a0, _mm512_unpacklo_epi16(u0, v0), x);
      a1 = _mm512_dpwssd_epi32(a1, _mm512_unpackhi_epi16(u0, v0), x);
      a2 = _mm512_dpwssd_epi32(a2, _mm512_unpacklo_epi16(u1, v1), x);
      a3 = _mm512_dpwssd_epi32(a3, _mm512_unpackhi_epi16(u1, v1), x);
    }
    const __m512 s = _mm512_set1_ps(ps[g]);
    f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a0), s, f0);
    f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a1), s, f1);
    f2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a2), s, f2);
    f3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a3), s, f3);
  }
  store_runs(out, f0, f1, f2, f3,  // [lo lanes, hi lanes] per run of 32
             _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
             _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31));
}

// The same with AVX2: 64 outputs in eight 8-wide accumulators (of the 16 registers), one FMA
// chain per output in row order, the weights widened to fp32 by V256::w (fp16: vcvtph2ps, int8:
// vpmovsxbd + vcvtdq2ps).
template <typename WT>
QS_AVX2 void coltile_256(const float* val, const int64_t* idx, int64_t nk, const WT* tile,
                         float* out) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t r = 0; r < nk; ++r) {
    const __m256 v = _mm256_set1_ps(val[r]);
    const WT* p = tile + idx[r] * kTileCols;
    prefetch_tile_row(tile, idx, r, nk);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(v, V256::w(p + 8 * i), a[i]);
  }
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(out + 8 * i, a[i]);
}

// bf16 with AVX2: one 32-byte load per 16 weights split by a shift (outputs 2i) and a mask
// (outputs 2i + 1), as coltile_bf16_512, put back in order once at the end: per 128-bit lane
// unpacklo/unpackhi interleave the two halves, and a lane permute joins them.
QS_AVX2 void coltile_bf16_256(const float* val, const int64_t* idx, int64_t nk,
                              const uint16_t* tile, float* out) {
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 e[4], o[4];
  for (int i = 0; i < 4; ++i) e[i] = o[i] = _mm256_setzero_ps();
  for (int64_t r = 0; r < nk; ++r) {
    const __m256 v = _mm256_set1_ps(val[r]);
    const uint16_t* p = tile + idx[r] * kTileCols;
    prefetch_tile_row(tile, idx, r, nk);
    for (int i = 0; i < 4; ++i) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * i));
      e[i] = _mm256_fmadd_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), e[i]);
      o[i] = _mm256_fmadd_ps(v, _mm256_castsi256_ps(_mm256_and_si256(w, hi)), o[i]);
    }
  }
  for (int i = 0; i < 4; ++i) {  // e: outputs 0 2 4 6 | 8 10 12 14, o: 1 3 5 7 | 9 11 13 15
    const __m256 lo = _mm256_unpacklo_ps(e[i], o[i]);  // 0 1 2 3 | 8 9 10 11
    const __m256 up = _mm256_unpackhi_ps(e[i], o[i]);  // 4 5 6 7 | 12 13 14 15
    _mm256_storeu_ps(out + 16 * i, _mm256_permute2f128_ps(lo, up, 0x20));
    _mm256_storeu_ps(out + 16 * i + 8, _mm256_permute2f128_ps(lo, up, 0x31));
  }
}
#endif

// Threads. A decode GEMV takes 0.01-20 ms, so a fork-join region (OpenMP) that waits for every
// thread is fragile: on a machine where other processes hold the cores, one descheduled thread
// stalls the whole product for a scheduler time slice (4-12 ms measured). Instead, output blocks
// are handed out from a shared counter; the calling thread works too, and returns as soon as every
// block is *done*: a helper that wakes late finds no block left and goes back to sleep without
// being waited for. Worst case: the caller alone, i.e. single-threaded speed. The helpers are
// persistent, their number follows torch.get_num_threads().
//
// Waking a sleeping thread (futex) takes 5-50 us, as long as a whole small product. Inside the
// compiled decode step (Pool::Hot scope) products start microseconds apart, so after such a job a
// helper spins for kSpinMicros watching for the next one (also across consecutive tokens) before it
// sleeps. After a job of the per-projection kernels it sleeps at once: there, PyTorch's own OpenMP
// threads run between our calls, and a spinning helper would take their core (measured: the
// sparse GEMV table lost 10-25%).
class Pool {
 public:
  static Pool& get() {
    // Never destroyed: helpers are detached and sleep at exit. A forked child (e.g. a DataLoader
    // worker) has none of the parent's helpers and maybe a mutex locked at fork time: it starts
    // its own pool.
    static Pool* pool = nullptr;
    static pid_t owner = 0;
    if (pool == nullptr || owner != getpid()) {
      pool = new Pool();
      owner = getpid();
    }
    return *pool;
  }

  // While one exists on the calling thread, jobs it issues leave their helpers spinning.
  struct Hot {
    bool prev;
    Hot() : prev(hot_flag()) { hot_flag() = true; }
    ~Hot() { hot_flag() = prev; }
  };

  // fn(begin, end) over [0, units) in blocks of `block` units, on up to `threads` threads.
  template <typename Fn>
  void run(int64_t units, int64_t block, int64_t threads, Fn& fn) {
    if (threads <= 1 || units <= block) {
      fn(int64_t(0), units);
      return;
    }
    auto job = std::make_shared<Job>();
    job->units = units;
    job->block = block;
    job->spin = hot_flag();
    job->fn = [&fn](int64_t b, int64_t e) { fn(b, e); };
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ensure_helpers(threads - 1);
      job_ = job;
      wanted_ = threads - 1;
      generation_.fetch_add(1, std::memory_order_release);
    }
    // A helper goes to sleep only after re-checking generation_ under the mutex, so one that is
    // not counted in sleeping_ here will see this job without a notification.
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_.notify_all();
    job->work();
    PhaseTimer timer(kWait);
    for (int spin = 0; job->done.load(std::memory_order_acquire) < units; ++spin) {
      if (spin > 256) std::this_thread::yield();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    wanted_ = 0;  // a helper that has not joined yet stays out
    if (job_ == job) job_.reset();
  }

 private:
  static constexpr int64_t kSpinMicros = 200;

  static bool& hot_flag() {
    static thread_local bool hot = false;
    return hot;
  }

  struct Job {
    std::atomic<int64_t> next{0}, done{0};
    int64_t units = 0, block = 1;
    bool spin = false;  // issued inside a Hot scope
    std::function<void(int64_t, int64_t)> fn;  // only called while the caller waits (see run)
    void work() {
      for (int64_t b = next.fetch_add(block); b < units; b = next.fetch_add(block)) {
        const int64_t e = std::min(units, b + block);
        fn(b, e);
        done.fetch_add(e - b, std::memory_order_release);
      }
    }
  };

  void ensure_helpers(int64_t n) {
    while (static_cast<int64_t>(helpers_) < std::min<int64_t>(n, 63)) {
      std::thread([this] { loop(); }).detach();
      ++helpers_;
    }
  }

  // Wait until generation_ moves past `seen`: spin first (if `spin`), then sleep on the condition
  // variable.
  void wait_for_job(uint64_t seen, bool spin) {
    const auto until = std::chrono::steady_clock::now() +
                       std::chrono::microseconds(spin ? kSpinMicros : 0);
    for (int64_t i = 1; generation_.load(std::memory_order_acquire) == seen; ++i) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      if ((!spin || (i & 1023) == 0) && std::chrono::steady_clock::now() > until) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
        return;
      }
    }
  }

  void loop() {
    uint64_t seen = 0;
    bool spin = false;
    for (;;) {
      wait_for_job(seen, spin);
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_acquire);
        if (wanted_ > 0 && job_) {
          --wanted_;
          job = job_;
        }
      }
      if (job) {
        job->work();  // a finished job has no block left: returns at once
        spin = job->spin;
      }
    }
  }

  std::mutex mutex_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> sleeping_{0};
  int64_t wanted_ = 0;
  size_t helpers_ = 0;
};

// Split `units` output units over torch's thread count: ~8 blocks per thread, each of at least
// 64K multiply-adds; tiny products run on the calling thread.
template <typename Fn>
void for_blocks(int64_t units, int64_t macs_per_unit, Fn fn) {
  constexpr int kShift = 16;  // 64K multiply-adds (smaller splits measured slower, even spinning)
  const int64_t total = units * macs_per_unit;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(),
                                            std::max<int64_t>(1, total >> kShift));
  const int64_t block = std::max<int64_t>(
      std::max<int64_t>(1, (int64_t(1) << kShift) / std::max<int64_t>(1, macs_per_unit)),
      units / (8 * threads));
  Pool::get().run(units, block, threads, fn);
}

// The work split of one product, a pure function of its shape (never of the thread count, so
// every output is summed in the same order however many threads run and however they interleave):
//
// * column blocks of up to kMaxCols outputs (the whole row of every projection of a small model:
//   one long sequential weight run per kept row), each summed over its rows in an L1/L2-resident
//   accumulator;
// * when there are fewer column blocks than work units (units_per_product), the kept rows are
//   also cut into `groups` contiguous ranges, each summed into its own row of a partial buffer,
//   and the partials added in group order as the groups finish (Merge: no pass of their own)
//   (G·n floats: 1-4% of the weight bytes at 2 threads, the most for int8 at S = 0.6). The
//   groups shrink along the rows (group_start): the threads take them in order, so the last ones
//   to be handed out, which decide when the product ends, are the smallest.
//
// Work units (group, block) are handed out by the pool's shared counter (see Pool): a thread that
// another process holds off its core leaves its units to the others; the product waits for units,
// not threads. Products under kParallelMacs run on the calling thread in one group.
//
// Eight tapered groups, measured against 16 equal ones (the previous split) on the 8-layer
// 2048-wide model, 2 threads, one token of each in turn over 150 rounds: S = 0.6 bf16 +3-8%,
// fp16 +3%, int8 +4%, fp32 +2%, dense fp32 +0-2% (4 groups: about the same at 2 threads). A
// machine with more cores gets two units per core, so that every core can take part and the
// tapered groups still pair up; the count is fixed per machine, never set by the thread count.
inline int64_t units_per_product() {
  static const int64_t units =
      std::max<int64_t>(8, 2 * std::min<int64_t>(64, std::thread::hardware_concurrency()));
  return units;
}
constexpr int64_t kParallelMacs = 1 << 16;  // below: calling thread only
constexpr int64_t kMinGroupRows = 16;       // rows per group at least
constexpr int64_t kMaxCols = 16384;         // outputs per column block at most (64 KB of fp32)

struct Split {
  int64_t cols = 0, blocks = 0, groups = 1;
};

// Row groups of a product over nk kept rows in `blocks` column blocks: enough for
// units_per_product() work units, each group at least kMinGroupRows rows.
inline int64_t row_groups(int64_t nk, int64_t blocks) {
  const int64_t per_block = (units_per_product() + blocks - 1) / blocks;
  return std::max<int64_t>(1, std::min(per_block, nk / kMinGroupRows));
}

// First kept row of group g of G over nk rows (g = G: nk): the split at fraction t = g / G of
// the rows is nk·(3t − t²)/2, so group sizes fall linearly from 1.5× the mean at the first row to
// 0.5× at the last (taken in order by two threads: groups 0 and 3, 1 and 2, 4 and 7, ... add up
// alike).
inline int64_t group_start(int64_t nk, int64_t g, int64_t G) {
  return nk * g * (3 * G - g) / (2 * G * G);
}

template <typename WT>
inline Split split_for(int64_t nk, int64_t n) {
  Split sp;
  // Column blocks as wide as the accumulator allows (kMaxCols fp32, in L1/L2), in equal parts:
  // each kept row is then read as one long sequential run (the whole row for every projection of
  // a small model), which the hardware prefetchers follow better than 8 KB segments of many rows
  // (measured: +7% tokens/s end to end on an fp32 8-layer 2048-wide model).
  const int64_t parts = std::max<int64_t>(1, (n + kMaxCols - 1) / kMaxCols);
  sp.cols = std::min<int64_t>(kMaxCols, (n / parts + kAlign - 1) / kAlign * kAlign);
  sp.cols = std::max<int64_t>(sp.cols, std::min<int64_t>(n, kAlign));
  sp.blocks = std::max<int64_t>(1, (n + sp.cols - 1) / sp.cols);
  if (nk * n >= kParallelMacs && sp.blocks < units_per_product())
    sp.groups = row_groups(nk, sp.blocks);
  return sp;
}

inline std::vector<float>& partial_buffer() {
  static thread_local std::vector<float> buf;
  return buf;
}

// Adds row groups' partials into group 0's, in group order, as the groups finish (Merge::done):
// whichever thread finishes a group adds every finished group that is next in line, so the sums
// overlap the other threads' streaming and need no pass of their own. Per output that is
// part_0 + part_1 + ... + part_{G-1} left to right, the same on any thread count. Measured
// against a pass of its own after the product (one token of each in turn, 150 rounds, S = 0.6
// bf16, int8 and fp32, dense fp32): +0.7-1.4%.
struct Merge {
  // groups · blocks < units_per_product() + blocks <= 2 · 128 (row_groups, split_for)
  static constexpr int64_t kMaxUnits = 256, kMaxBlocks = 128;
  std::atomic<bool> lock{false};
  uint8_t finished[kMaxUnits];  // [groups][blocks]
  int64_t next[kMaxBlocks];     // per block: the next group to add
  uint8_t active[kMaxBlocks];   // per block: a thread is adding
  void reset(int64_t units, int64_t blocks) {
    TORCH_CHECK(units <= kMaxUnits && blocks <= kMaxBlocks, "sparse gemv: ", units,
                " work units in ", blocks, " column blocks exceed the merge's room");
    std::fill(finished, finished + units, uint8_t(0));
    std::fill(next, next + blocks, int64_t(0));
    std::fill(active, active + blocks, uint8_t(0));
  }
  void acquire() {
    while (lock.exchange(true, std::memory_order_acquire)) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    }
  }
  void release() { lock.store(false, std::memory_order_release); }
  // Group g of block b (of `blocks`) is summed; add(gg) adds group gg's partial into group 0's
  // and done() is called once all are added.
  template <typename Add, typename Done>
  void done(int64_t g, int64_t b, int64_t blocks, int64_t groups, Add add, Done finish) {
    acquire();
    finished[g * blocks + b] = 1;
    if (active[b]) return release();  // that thread will add this one too
    active[b] = 1;
    for (;;) {
      const int64_t gg = next[b];
      if (gg == groups || !finished[gg * blocks + b]) break;
      release();
      if (gg > 0) add(gg);
      if (gg == groups - 1) finish();
      acquire();
      next[b] = gg + 1;
    }
    active[b] = 0;
    release();
  }
};

// y[0:n) = scale ⊙ (W_kept^T val) (+ bias), W input-major [d, n] of type WT; scale may be null
// (int8 weights: one fp32 scale per output, applied to the finished sum).
template <typename WT>
void product(const Kept& kept, const WT* w, int64_t n, const float* scale, const float* bias,
             float* y) {
  const int64_t nk = kept.n;
  const Split sp = split_for<WT>(nk, n);
  const int64_t units = sp.groups * sp.blocks;
  float* part = nullptr;
  Merge merge;
  if (sp.groups > 1) {
    auto& buf = partial_buffer();
    if (static_cast<int64_t>(buf.size()) < sp.groups * n) buf.resize(sp.groups * n);
    part = buf.data();
    merge.reset(units, sp.blocks);
  }
  auto finish = [&](int64_t c, int64_t len, const float* acc) {
    for (int64_t j = 0; j < len; ++j) {
      const float a = scale ? acc[j] * scale[c + j] : acc[j];
      y[c + j] = bias ? a + bias[c + j] : a;
    }
  };
  const std::thread::id caller = std::this_thread::get_id();
  auto fn = [&](int64_t ub, int64_t ue) {
    static thread_local std::vector<float> own;  // accumulator of a unit without partials
    if (!part && static_cast<int64_t>(own.size()) < sp.cols) own.resize(sp.cols);
    for (int64_t u = ub; u < ue; ++u) {
      const int64_t g = u / sp.blocks, b = u % sp.blocks;
      const int64_t r0 = group_start(nk, g, sp.groups), r1 = group_start(nk, g + 1, sp.groups);
      const int64_t c = b * sp.cols, len = std::min(sp.cols, n - c);
      if (len <= 0) continue;
      float* acc = part ? part + g * n + c : own.data();  // partials: summed in place
      run_dense<WT>(kept.val.data() + r0, kept.idx.data() + r0, r1 - r0, w, n, c, len, acc);
      if (!part) {
        finish(c, len, acc);
      } else {
        const bool timed = std::this_thread::get_id() == caller;  // (the profile's kReduce)
        merge.done(g, b, sp.blocks, sp.groups, [&](int64_t gg) {
          std::optional<PhaseTimer> t;
          if (timed) t.emplace(kReduce);
          float* p0 = part + c;
          const float* pg = part + gg * n + c;
          for (int64_t j = 0; j < len; ++j) p0[j] += pg[j];
        }, [&] { finish(c, len, part + c); });
      }
    }
  };
  const int64_t threads =
      nk * n >= kParallelMacs ? std::min<int64_t>(at::get_num_threads(), units) : 1;
  Pool::get().run(units, 1, threads, fn);
}

// Bytes of weights a product over nk kept rows reads (for bandwidth accounting).
inline int64_t weight_bytes(int64_t nk, int64_t n, int64_t elem) { return nk * n * elem; }

// The product over a column-tiled weight [n/64][d][64]: one work unit per tile, accumulated in
// registers over all the kept rows (no row groups, no partials).
template <typename WT>
void product_tiled(const Kept& kept, const WT* w, int64_t d, int64_t n, const float* scale,
                      const float* bias, float* y) {
  const int64_t nk = kept.n, tiles = n / kTileCols;
  const float* val = kept.val.data();
  const int64_t* idx = kept.idx.data();
  bool vnni = false;
  // The VNNI path's padded row indices, int16 activation pairs and pass scales, reused.
  static thread_local std::vector<int64_t> pidx;
  static thread_local std::vector<int32_t> xp;
  static thread_local std::vector<float> ps;
  int64_t passes = 0;
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (std::is_same<WT, int8_t>::value) {
    const int mode = int8_vnni_mode();
    vnni = g_isa == Isa::kAvx512 && nk > 0 &&
           (mode == 2 || (mode == 1 && idx[nk - 1] - idx[0] == nk - 1));
    for (int64_t i = 0; vnni && i < nk; ++i) vnni = std::isfinite(val[i]);
    if (vnni) {
      passes = (nk + 7) / 8;
      if (static_cast<int64_t>(ps.size()) < passes) {
        pidx.resize(8 * passes);
        xp.resize(4 * passes);
        ps.resize(passes);
      }
      for (int64_t g = 0; g < passes; ++g) {
        float mx = 0.f;
        int32_t q16[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t i = 0; i < 8; ++i) {
          const int64_t r = std::min(8 * g + i, nk - 1);
          pidx[8 * g + i] = idx[r];
          if (8 * g + i < nk) mx = std::max(mx, std::fabs(val[r]));
        }
        ps[g] = mx / 32767.f;
        if (mx > 0.f)
          for (int64_t i = 0; i < 8 && 8 * g + i < nk; ++i) {
            const float qv = std::nearbyint(val[8 * g + i] * (32767.f / mx));
            q16[i] = static_cast<int32_t>(std::min(32767.f, std::max(-32767.f, qv)));
          }
        for (int t = 0; t < 4; ++t)
          xp[4 * g + t] = static_cast<int32_t>((static_cast<uint32_t>(q16[2 * t]) & 0xffffu) |
                                               (static_cast<uint32_t>(q16[2 * t + 1]) << 16));
      }
    }
  }
#endif
  // (the helpers read the caller's buffers: a thread_local named in fn would be their own)
  const int32_t* vx = xp.data();
  const float* vs = ps.data();
  const int64_t* vidx = pidx.data();
  auto fn = [&](int64_t ub, int64_t ue) {
    alignas(64) float acc[kTileCols];
    for (int64_t t = ub; t < ue; ++t) {
      const WT* tile = w + t * d * kTileCols;
#if defined(__x86_64__) || defined(__i386__)
      if (g_isa == Isa::kAvx512) {
        if constexpr (std::is_same<WT, uint16_t>::value)
          coltile_bf16_512(val, idx, nk, tile, acc);
        else if constexpr (std::is_same<WT, int8_t>::value) {
          if (vnni) coltile_i8_vnni(vx, vs, vidx, passes, tile, acc);
          else coltile_512<WT>(val, idx, nk, tile, acc);
        } else {
          coltile_512<WT>(val, idx, nk, tile, acc);
        }
      } else if (g_isa == Isa::kAvx2) {
        if constexpr (std::is_same<WT, uint16_t>::value)
          coltile_bf16_256(val, idx, nk, tile, acc);
        else
          coltile_256<WT>(val, idx, nk, tile, acc);
      } else
#endif
        run_dense<WT>(val, idx, nk, tile, kTileCols, 0, kTileCols, acc);
      const int64_t c = t * kTileCols;
      for (int64_t j = 0; j < kTileCols; ++j) {
        const float a = scale ? acc[j] * scale[c + j] : acc[j];
        y[c + j] = bias ? a + bias[c + j] : a;
      }
    }
  };
  const int64_t threads =
      nk * n >= kParallelMacs ? std::min<int64_t>(at::get_num_threads(), tiles) : 1;
  Pool::get().run(tiles, 1, threads, fn);
}

// product() on a weight tensor of any storage type: fp32, bf16 and fp16 (raw 16-bit words),
// int8 (with `scale`, fp32 [n]); rows [d, n] or column tiles [n/64, d, 64] (is_tiled).
inline void product_tensor(const Kept& kept, const at::Tensor& w, int64_t n, const float* scale,
                           const float* bias, float* y) {
  const bool tiled = is_tiled(w);
  const int64_t d = weight_in(w);
  auto run = [&](auto* p) {
    using WT = std::remove_const_t<std::remove_pointer_t<decltype(p)>>;
    if (tiled) return product_tiled<WT>(kept, p, d, n, scale, bias, y);
    product<WT>(kept, p, n, scale, bias, y);
  };
  switch (w.scalar_type()) {
    case at::kFloat:
      return run(w.data_ptr<float>());
    case at::kBFloat16:
      return run(static_cast<const uint16_t*>(w.const_data_ptr()));
    case at::kHalf:
      return run(static_cast<const Half16*>(w.const_data_ptr()));
    case at::kChar:
      TORCH_CHECK(scale != nullptr, "sparse gemv: int8 weights need their per-output scales");
      return run(static_cast<const int8_t*>(w.const_data_ptr()));
    default:
      TORCH_CHECK(false, "sparse gemv: weight dtype must be float32, bfloat16, float16 or int8, "
                  "got ", w.scalar_type());
  }
}

// A STREAM-like read: the sum of a [m] fp32 buffer on the same threads and work split as the
// products (blocks of 256 KB from the shared counter, four vector accumulators each) - the
// memory bandwidth the products are compared with.
inline float stream_read(const float* a, int64_t m) {
  constexpr int64_t kBlock = 1 << 16;  // floats
  const int64_t units = (m + kBlock - 1) / kBlock;
  std::vector<float> part(units);
  auto fn = [&](int64_t ub, int64_t ue) {
    for (int64_t u = ub; u < ue; ++u)
      part[u] = run_sum(a + u * kBlock, std::min(kBlock, m - u * kBlock));
  };
  Pool::get().run(units, 1, std::min<int64_t>(at::get_num_threads(), units), fn);
  float s = 0.f;
  for (float v : part) s += v;
  return s;
}

// The kept-row access pattern alone: the 64-bit words of rows idx[0:nk) of a buffer of rows of
// `row_words` words (a multiple of 8: whole cache lines), read as the products read weights -
// eight rows per pass, each row one sequential run, the rows cut into the products' row groups
// (group_start) taken from the shared counter - with one add per cache line. Returns their
// sum (mod 2^64). The bandwidth this reaches bounds what any loop over those rows can stream.
#if defined(__x86_64__) || defined(__i386__)
QS_AVX512 inline uint64_t rows_read_512(const uint64_t* const* p, int64_t words) {
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (int64_t j = 0; j < words; j += 8) {
    s0 = _mm512_add_epi64(s0, _mm512_add_epi64(_mm512_loadu_si512(p[0] + j),
                                               _mm512_loadu_si512(p[4] + j)));
    s1 = _mm512_add_epi64(s1, _mm512_add_epi64(_mm512_loadu_si512(p[1] + j),
                                               _mm512_loadu_si512(p[5] + j)));
    s2 = _mm512_add_epi64(s2, _mm512_add_epi64(_mm512_loadu_si512(p[2] + j),
                                               _mm512_loadu_si512(p[6] + j)));
    s3 = _mm512_add_epi64(s3, _mm512_add_epi64(_mm512_loadu_si512(p[3] + j),
                                               _mm512_loadu_si512(p[7] + j)));
  }
  return static_cast<uint64_t>(
      _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3))));
}
#endif

inline uint64_t rows_read_base(const uint64_t* const* p, int64_t words) {
  uint64_t s = 0;
  for (int64_t j = 0; j < words; ++j)
    s += ((p[0][j] + p[1][j]) + (p[2][j] + p[3][j])) + ((p[4][j] + p[5][j]) + (p[6][j] + p[7][j]));
  return s;
}

inline uint64_t kept_rows_read(const uint64_t* buf, int64_t row_words, const int64_t* idx,
                               int64_t nk) {
  const int64_t groups = row_groups(nk, 1);  // whole rows: one column block
  std::vector<uint64_t> part(groups, 0);
  auto fn = [&](int64_t ub, int64_t ue) {
    for (int64_t g = ub; g < ue; ++g) {
      const int64_t r0 = group_start(nk, g, groups), r1 = group_start(nk, g + 1, groups);
      uint64_t s = 0;
      const uint64_t* p[8];
      for (int64_t r = r0; r < r1; r += 8) {
        const int64_t rows = std::min<int64_t>(8, r1 - r);
        for (int64_t i = 0; i < 8; ++i) p[i] = buf + idx[r + std::min(i, rows - 1)] * row_words;
        if (rows < 8) {  // the last pass: count each of its rows once
          for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < row_words; ++j) s += p[i][j];
          continue;
        }
#if defined(__x86_64__) || defined(__i386__)
        if (g_isa == Isa::kAvx512) {
          s += rows_read_512(p, row_words);
          continue;
        }
#endif
        s += rows_read_base(p, row_words);
      }
      part[g] = s;
    }
  };
  Pool::get().run(groups, 1, std::min<int64_t>(at::get_num_threads(), groups), fn);
  uint64_t s = 0;
  for (uint64_t v : part) s += v;
  return s;
}

// Ternary: packed [d, P] with P = ceil(n / 4); y = alpha · (T_kept^T val) (+ bias).
void product_ternary(const Kept& kept, const uint8_t* w, int64_t n, int64_t P, float alpha,
                     const float* bias, float* y) {
  const int64_t nk = kept.n;
  const int64_t units = (P + kAlign - 1) / kAlign;
  for_blocks(units, nk * 4 * kAlign, [&](int64_t ub, int64_t ue) {
    constexpr int64_t kBytes = kChunk / 4;
    float acc[4 * kBytes];
    const int64_t end = std::min(P, ue * kAlign);
    for (int64_t b = ub * kAlign; b < end; b += kBytes) {
      const int64_t len = std::min(kBytes, end - b);
      run_ternary(kept.val.data(), kept.idx.data(), nk, w, P, b, len, acc);
      for (int64_t q = 0; q < 4; ++q) {
        for (int64_t j = 0; j < len; ++j) {
          const int64_t c = q * P + b + j;
          if (c < n) y[c] = alpha * acc[q * len + j] + (bias ? bias[c] : 0.f);
        }
      }
    }
  });
}

#if defined(__x86_64__) || defined(__i386__)
// The gathers with AVX-512: 16 entries per step, the kept ones compressed to the front of a
// register and stored whole at the running count (the buffers have a vector of room past d),
// their int64 indices in two halves of 8. `keep(i, v)` is the mask of the 16 entries at i.
template <typename Keep>
QS_AVX512 inline int64_t gather_512(const float* x, int64_t d, int64_t* idx, float* val,
                                    Keep keep) {
  const __m512i step = _mm512_set1_epi64(16);
  __m512i i_lo = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i i_hi = _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 live = d - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (d - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(live, x + i);
    const __mmask16 m = keep(i, v) & live;
    _mm512_storeu_ps(val + n, _mm512_maskz_compress_ps(m, v));
    const __mmask8 m_lo = static_cast<__mmask8>(m), m_hi = static_cast<__mmask8>(m >> 8);
    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi64(m_lo, i_lo));
    const int64_t n_lo = n + __builtin_popcount(m_lo);
    _mm512_storeu_si512(idx + n_lo, _mm512_maskz_compress_epi64(m_hi, i_hi));
    n = n_lo + __builtin_popcount(m_hi);
    i_lo = _mm512_add_epi64(i_lo, step);
    i_hi = _mm512_add_epi64(i_hi, step);
  }
  return n;
}

QS_AVX512 inline int64_t gather_nonzero_512(const float* x, int64_t d, int64_t* idx, float* val) {
  return gather_512(x, d, idx, val, [](int64_t, __m512 v) QS_AVX512 {  // NaN != 0 (unordered)
    return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  });
}

QS_AVX512 inline int64_t gather_topk_512(const float* x, int64_t d, uint32_t t, int64_t limit,
                                         int64_t* idx, float* val) {
  const __m512i abs = _mm512_set1_epi32(0x7fffffff), tv = _mm512_set1_epi32(static_cast<int>(t));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const int64_t lim = std::min<int64_t>(limit, d);
  return gather_512(x, d, idx, val, [&](int64_t i, __m512 v) QS_AVX512 {
    const __m512i a = _mm512_and_si512(_mm512_castps_si512(v), abs);
    const __m512i pos = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(i)));
    const __mmask16 tie = _mm512_cmpeq_epi32_mask(a, tv) &
                          _mm512_cmplt_epi32_mask(pos, _mm512_set1_epi32(static_cast<int>(lim)));
    return _mm512_test_epi32_mask(a, a) & (_mm512_cmpgt_epu32_mask(a, tv) | tie);
  });
}
#endif

// Whether no entry of x is zero (NaN is not); stops at the first 16 entries holding one.
#if defined(__x86_64__) || defined(__i386__)
QS_AVX512 inline bool none_zero_512(const float* x, int64_t d) {
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 live = d - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (d - i)) - 1);
    if (_mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, x + i), _mm512_setzero_ps(),
                                _CMP_EQ_OQ))
      return false;
  }
  return true;
}
#endif

inline bool none_zero(const float* x, int64_t d) {
#if defined(__x86_64__) || defined(__i386__)
  if (g_isa == Isa::kAvx512) return none_zero_512(x, d);
#endif
  for (int64_t i = 0; i < d; i += 64) {  // a branch per 64 entries
    bool zero = false;
    for (int64_t j = i; j < std::min(d, i + 64); ++j) zero |= x[j] == 0.f;
    if (zero) return false;
  }
  return true;
}

// Kept set = every entry of x: the values copied, the indices (0..d-1) written only where they
// are not there already. The products' helper threads read the kept set, so each cache line the
// calling thread writes into it next is first taken back from their caches; a dense projection
// rewrote 24 KB of identical indices per product that way (measured: 20 us of the calling
// thread's time per product, 3% of a dense 16-bit step on two threads).
inline void keep_all(const float* x, int64_t d, Kept& kept) {
  if (kept.iota < d) {
    for (int64_t i = 0; i < d; ++i) kept.idx[i] = i;
    kept.iota = d;
  }
  std::memcpy(kept.val.data(), x, d * sizeof(float));
  kept.n = d;
}

// Kept set = the nonzero entries of x (any sparsifier's output). NaN counts as nonzero.
// Gathers are branch-free (each entry is written, the count advances by whether it is kept):
// which inputs survive is data-dependent, and a mispredicted branch per input cost more than the
// selection itself on decode-sized rows. With AVX-512 they take 16 entries per step (gather_512).
void gather_nonzero(const float* x, int64_t d, Kept& kept) {
  kept.reserve(d);
  if (none_zero(x, d)) return keep_all(x, d, kept);
  kept.iota = 0;
  int64_t* idx = kept.idx.data();
  float* val = kept.val.data();
#if defined(__x86_64__) || defined(__i386__)
  if (g_isa == Isa::kAvx512) {
    kept.n = gather_nonzero_512(x, d, idx, val);
    return;
  }
#endif
  int64_t n = 0;
  for (int64_t i = 0; i < d; ++i) {
    idx[n] = i;
    val[n] = x[i];
    n += x[i] != 0.f;
  }
  kept.n = n;
}

// Kept set = the Top-K of |x| (exactly the training sparsifier's selection), zeros left out since
// they add nothing.
void gather_topk(const float* x, int64_t d, int64_t k, qsparse::TopKSelect<uint32_t>& sel,
                 Kept& kept) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(x);
  const qsparse::Threshold<uint32_t> th = sel.find(bits, d, k);
  kept.reserve(d);
  kept.iota = 0;
  int64_t* idx = kept.idx.data();
  float* val = kept.val.data();
#if defined(__x86_64__) || defined(__i386__)
  if (g_isa == Isa::kAvx512) {
    kept.n = gather_topk_512(x, d, th.t, th.limit, idx, val);
    return;
  }
#endif
  int64_t n = 0;
  for (int64_t i = 0; i < d; ++i) {
    const uint32_t a = bits[i] & 0x7fffffffu;
    idx[n] = i;
    val[n] = x[i];
    n += (a != 0) & ((a > th.t) | ((a == th.t) & (i < th.limit)));
  }
  kept.n = n;
}


// Kept set = every entry (the dense product; zeros included, no data-dependent skipping).
inline void gather_all(const float* x, int64_t d, Kept& kept) {
  kept.reserve(d);
  keep_all(x, d, kept);
}

}  // namespace qsparse_gemv
