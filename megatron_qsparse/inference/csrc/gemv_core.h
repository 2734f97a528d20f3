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
#include <thread>
#include <unistd.h>
#include <cstdint>
#include <cstring>
#include <vector>

#include "topk_select.h"

namespace qsparse_gemv {

constexpr int64_t kChunk = 2048;  // outputs accumulated per block: 8 KB of fp32, stays in L1
constexpr int64_t kAlign = 16;    // thread slices start on 64-byte boundaries of fp32 outputs

// The kept inputs of one token: their indices (ascending) and values (fp32).
// Buffers grow to the widest input seen and are reused; n entries are valid.
struct Kept {
  std::vector<int64_t> idx;
  std::vector<float> val;
  int64_t n = 0;
  void reserve(int64_t d) {
    if (static_cast<int64_t>(idx.size()) < d) {
      idx.resize(d);
      val.resize(d);
    }
  }
};

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename WT> inline float wload(const WT* p, int64_t c);
template <> inline float wload<float>(const float* p, int64_t c) { return p[c]; }
template <> inline float wload<uint16_t>(const uint16_t* p, int64_t c) {
  return bf16_to_float(p[c]);
}

// acc[0:len) = sum_r val[r] * w[idx[r]·ld + c0 + (0:len)]. Rows go four at a time; while one
// group is summed, the next group's segments are prefetched line by line (into L2), so the
// memory system always has the next rows in flight when the current ones are done.
template <typename WT>
inline __attribute__((always_inline)) void dense_block(const float* __restrict val,
                                                       const int64_t* __restrict idx, int64_t nk,
                                                       const WT* __restrict w, int64_t ld,
                                                       int64_t c0, int64_t len,
                                                       float* __restrict acc) {
  constexpr int64_t kLine = 64 / sizeof(WT);  // weights per cache line
  for (int64_t c = 0; c < len; ++c) acc[c] = 0.f;
  int64_t r = 0;
  for (; r + 4 <= nk; r += 4) {
    const WT* __restrict p0 = w + idx[r] * ld + c0;
    const WT* __restrict p1 = w + idx[r + 1] * ld + c0;
    const WT* __restrict p2 = w + idx[r + 2] * ld + c0;
    const WT* __restrict p3 = w + idx[r + 3] * ld + c0;
    const int64_t nx = r + 8 <= nk ? r + 4 : r;  // the next group (itself at the end: harmless)
    const WT* q0 = w + idx[nx] * ld + c0;
    const WT* q1 = w + idx[nx + 1] * ld + c0;
    const WT* q2 = w + idx[nx + 2] * ld + c0;
    const WT* q3 = w + idx[nx + 3] * ld + c0;
    const float v0 = val[r], v1 = val[r + 1], v2 = val[r + 2], v3 = val[r + 3];
    int64_t c = 0;
    for (; c + kLine <= len; c += kLine) {
      __builtin_prefetch(q0 + c, 0, 1);
      __builtin_prefetch(q1 + c, 0, 1);
      __builtin_prefetch(q2 + c, 0, 1);
      __builtin_prefetch(q3 + c, 0, 1);
      for (int64_t j = c; j < c + kLine; ++j)
        acc[j] += (v0 * wload(p0, j) + v1 * wload(p1, j)) + (v2 * wload(p2, j) + v3 * wload(p3, j));
    }
    for (; c < len; ++c)
      acc[c] += (v0 * wload(p0, c) + v1 * wload(p1, c)) + (v2 * wload(p2, c) + v3 * wload(p3, c));
  }
  for (; r < nk; ++r) {
    const WT* __restrict p0 = w + idx[r] * ld + c0;
    const float v0 = val[r];
    for (int64_t c = 0; c < len; ++c) acc[c] += v0 * wload(p0, c);
  }
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

// The same loops compiled for three instruction sets; picked once by the CPU's features.
#define QS_CLONES(NAME, TARGET)                                                                  \
  template <typename WT>                                                                         \
  TARGET void NAME##_dense(const float* val, const int64_t* idx, int64_t nk, const WT* w,       \
                           int64_t ld, int64_t c0, int64_t len, float* acc) {                   \
    dense_block<WT>(val, idx, nk, w, ld, c0, len, acc);                                          \
  }                                                                                              \
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
      __builtin_cpu_supports("avx512vl"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

const Isa kIsa = detect_isa();

template <typename WT>
void run_dense(const float* val, const int64_t* idx, int64_t nk, const WT* w, int64_t ld,
               int64_t c0, int64_t len, float* acc) {
  switch (kIsa) {
    case Isa::kAvx512: return avx512_dense<WT>(val, idx, nk, w, ld, c0, len, acc);
    case Isa::kAvx2: return avx2_dense<WT>(val, idx, nk, w, ld, c0, len, acc);
    default: return base_dense<WT>(val, idx, nk, w, ld, c0, len, acc);
  }
}

void run_ternary(const float* val, const int64_t* idx, int64_t nk, const uint8_t* w, int64_t ld,
                 int64_t b0, int64_t len, float* acc) {
  switch (kIsa) {
    case Isa::kAvx512: return avx512_ternary(val, idx, nk, w, ld, b0, len, acc);
    case Isa::kAvx2: return avx2_ternary(val, idx, nk, w, ld, b0, len, acc);
    default: return base_ternary(val, idx, nk, w, ld, b0, len, acc);
  }
}

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

// y[0:n) = W_kept^T val (+ bias), W input-major [d, n] of type WT.
template <typename WT>
void product(const Kept& kept, const WT* w, int64_t n, const float* bias, float* y) {
  const int64_t nk = kept.n;
  const int64_t units = (n + kAlign - 1) / kAlign;
  for_blocks(units, nk * kAlign, [&](int64_t ub, int64_t ue) {
    float acc[kChunk];
    const int64_t end = std::min(n, ue * kAlign);
    for (int64_t c = ub * kAlign; c < end; c += kChunk) {
      const int64_t len = std::min(kChunk, end - c);
      run_dense<WT>(kept.val.data(), kept.idx.data(), nk, w, n, c, len, acc);
      for (int64_t j = 0; j < len; ++j) y[c + j] = acc[j] + (bias ? bias[c + j] : 0.f);
    }
  });
}

// product() on a weight tensor of either storage type (fp32, or bf16 read as its raw bits).
inline void product_tensor(const Kept& kept, const at::Tensor& w, int64_t n, const float* bias,
                           float* y) {
  if (w.scalar_type() == at::kFloat) {
    product<float>(kept, w.data_ptr<float>(), n, bias, y);
  } else if (w.scalar_type() == at::kBFloat16) {
    product<uint16_t>(kept, static_cast<const uint16_t*>(w.const_data_ptr()), n, bias, y);
  } else {
    TORCH_CHECK(false, "sparse gemv: weight dtype must be float32 or bfloat16, got ",
                w.scalar_type());
  }
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

// Kept set = the nonzero entries of x (any sparsifier's output). NaN counts as nonzero.
// Gathers are branch-free (each entry is written, the count advances by whether it is kept):
// which inputs survive is data-dependent, and a mispredicted branch per input cost more than the
// selection itself on decode-sized rows.
void gather_nonzero(const float* x, int64_t d, Kept& kept) {
  kept.reserve(d);
  int64_t* idx = kept.idx.data();
  float* val = kept.val.data();
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
  int64_t* idx = kept.idx.data();
  float* val = kept.val.data();
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
  for (int64_t i = 0; i < d; ++i) {
    kept.idx[i] = i;
    kept.val[i] = x[i];
  }
  kept.n = d;
}

}  // namespace qsparse_gemv
