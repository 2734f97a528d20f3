// Sparse GEMV for the decode step (one token): y = W x_s + b where x_s is sparse, reading only the
// weight rows of the kept inputs. Built on first use by megatron_qsparse/inference/cpu_kernels.py,
// which documents the Python API and holds the pure-PyTorch reference.
//
// The weight is stored INPUT-MAJOR, wt[d, N] (the transpose of torch's [out, in]), so the row of
// each kept input channel is contiguous (16-bit and int8 weights read whole may be column-tiled
// [N/64, d, 64] instead, see product_tiled in gemv_core.h). For K kept inputs the kernel reads K·N weights instead of
// d·N: the decode step is bound by weight traffic, so the ideal speed-up is d/K = 1/(1-S).
//
//   gemv_topk     fused: exact Top-K of |x| (topk_select.h, the selection of the training
//                 sparsifier, ties to the lower index), then the sparse product;
//   gemv_nonzero  any sparsifier: the kept set is the nonzero entries of an already sparse x;
//   gemv_* take fp32, bf16, fp16 or int8 weights (int8: with a per-output fp32 scale);
//   gemv_ternary  BitNet b1.58: 2-bit packed ternary weights (4 per byte), times alpha;
//   DecodeStep    a whole token of the model in one call (decode_step.h).
//
// The machinery (gathers, products, ISA dispatch, thread pool) is in gemv_core.h; this file holds
// the tensor-level entry points and the Python bindings, and is the one translation unit.
//
// Work split: threads take (row group, column block) units from a shared counter; the split is a
// function of the shape only (see product() in gemv_core.h), never of the thread count, so results
// do not depend on it (see Pool in gemv_core.h for why not OpenMP). Inside a unit, runs of up to 16K
// outputs are accumulated in an L1/L2-resident buffer over the unit's kept rows, eight rows at a time
// (eight long sequential weight streams, an eighth of the accumulator traffic).
// The inner loops are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and picked at
// run time, so the cached binary still runs on any x86-64 CPU; the build flags have no -march.

#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "gemv_core.h"
#include "decode_step.h"

namespace {

using namespace qsparse_gemv;

at::Tensor as_rows(const at::Tensor& x, int64_t d, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": expected a CPU tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == d, what, ": input has ", x.size(-1),
              " features, the weight ", d);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), what, ": expected a floating-point input");
  return x.reshape({-1, d}).to(at::kFloat).contiguous();
}

const float* bias_ptr(const c10::optional<at::Tensor>& bias, int64_t n, at::Tensor& keep) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->numel() == n, "sparse gemv: bias has ", bias->numel(), " entries, expected ", n);
  keep = bias->to(at::kFloat).contiguous();
  return keep.data_ptr<float>();
}

// Per-output scales of int8 weights (fp32 [n]); none for float weights.
const float* scale_ptr(const at::Tensor& w, const c10::optional<at::Tensor>& scale, int64_t n) {
  const bool has = scale.has_value() && scale->defined();
  if (w.scalar_type() != at::kChar) {
    TORCH_CHECK(!has, "sparse gemv: a scale goes with int8 weights only");
    return nullptr;
  }
  TORCH_CHECK(has, "sparse gemv: int8 weights need their per-output scales");
  TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                  scale->device().is_cpu() && scale->numel() == n,
              "sparse gemv: the scale must be a contiguous CPU fp32 tensor of ", n, " entries");
  return scale->data_ptr<float>();
}

// Shared driver: for each row of x, select the kept set with `select`, then the product.
template <typename Select>
at::Tensor run_rows(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& scale, Select select) {
  TORCH_CHECK(layout_ok(w), "sparse gemv: the weight must be a contiguous CPU [in, out] tensor "
              "(or its tiled [out/64, in, 64] form)");
  const int64_t d = weight_in(w), n = weight_out(w);
  at::Tensor xr = as_rows(x, d, "sparse gemv");
  at::Tensor bkeep;
  const float* b = bias_ptr(bias, n, bkeep);
  const float* sc = scale_ptr(w, scale, n);
  at::Tensor y = at::empty({xr.size(0), n}, xr.options());
  Kept kept;
  for (int64_t r = 0; r < xr.size(0); ++r) {
    select(xr.data_ptr<float>() + r * d, d, kept);
    product_tensor(kept, w, n, sc, b, y.data_ptr<float>() + r * n);
  }
  return y;
}

at::Tensor gemv_topk(const at::Tensor& x, const at::Tensor& w, int64_t k,
                     const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& scale) {
  const int64_t d = weight_in(w);
  TORCH_CHECK(k >= 1 && k < d, "gemv_topk: need 1 <= k < d, got k=", k, ", d=", d);
  qsparse::TopKSelect<uint32_t> sel(d);
  return run_rows(x, w, bias, scale, [&](const float* xr, int64_t dd, Kept& kept) {
    gather_topk(xr, dd, k, sel, kept);
  });
}

at::Tensor gemv_nonzero(const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& scale) {
  return run_rows(x, w, bias, scale, [](const float* xr, int64_t d, Kept& kept) {
    gather_nonzero(xr, d, kept);
  });
}

at::Tensor gemv_ternary(const at::Tensor& x, const at::Tensor& packed, int64_t n, double alpha,
                        const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == at::kByte &&
                  packed.device().is_cpu(),
              "gemv_ternary: packed weight must be a contiguous CPU uint8 [in, ceil(out/4)] tensor");
  const int64_t d = packed.size(0), P = packed.size(1);
  TORCH_CHECK(P == (n + 3) / 4, "gemv_ternary: ", P, " bytes per row do not hold ", n, " outputs");
  at::Tensor xr = as_rows(x, d, "gemv_ternary");
  at::Tensor bkeep;
  const float* b = bias_ptr(bias, n, bkeep);
  at::Tensor y = at::empty({xr.size(0), n}, xr.options());
  Kept kept;
  for (int64_t r = 0; r < xr.size(0); ++r) {
    gather_nonzero(xr.data_ptr<float>() + r * d, d, kept);
    product_ternary(kept, packed.data_ptr<uint8_t>(), n, P, static_cast<float>(alpha), b,
                    y.data_ptr<float>() + r * n);
  }
  return y;
}

// STREAM-like read of an fp32 buffer (see gemv_core.h); returns its sum.
double stream_read_tensor(const at::Tensor& a) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && a.is_contiguous() && a.device().is_cpu(),
              "stream_read: expected a contiguous CPU fp32 tensor");
  return stream_read(a.data_ptr<float>(), a.numel());
}

// The kept-row access pattern alone over rows idx of a uint8 [rows, L] buffer (see gemv_core.h);
// returns the sum of their 64-bit words as a signed int64 (two's complement wrap-around).
int64_t kept_rows_read_tensor(const at::Tensor& buf, const at::Tensor& idx) {
  TORCH_CHECK(buf.scalar_type() == at::kByte && buf.dim() == 2 && buf.is_contiguous() &&
                  buf.device().is_cpu() && buf.size(1) % 64 == 0 &&
                  reinterpret_cast<uintptr_t>(buf.data_ptr()) % 8 == 0,
              "kept_rows_read: expected a contiguous CPU uint8 [rows, L] buffer, L a multiple "
              "of 64 bytes");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous() &&
                  idx.device().is_cpu(),
              "kept_rows_read: expected contiguous CPU int64 row indices");
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < buf.size(0), "kept_rows_read: row ", ip[i],
                " outside [0, ", buf.size(0), ")");
  const uint64_t s = kept_rows_read(reinterpret_cast<const uint64_t*>(buf.data_ptr()),
                                    buf.size(1) / 8, ip, idx.numel());
  int64_t out;
  std::memcpy(&out, &s, sizeof out);
  return out;
}

// A copy of a contiguous CPU tensor in memory advised for transparent huge pages (2 MB), or the
// tensor itself where that is not available. A decode token streams every weight once: with 4 KB
// pages that is one TLB miss (page walk) per 4 KB, and the hardware prefetchers stop at each page
// boundary (measured: +3-5% tokens/s end to end, fp32 and bf16). Advised before the first touch,
// so the kernel backs the copy with huge pages as it is written (THP "madvise" or "always").
at::Tensor huge_page_copy(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "huge_page_copy: contiguous CPU tensor");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes < kHuge) return t;
  const size_t len = (bytes + kHuge - 1) / kHuge * kHuge;
  void* p = std::aligned_alloc(kHuge, len);
  if (p == nullptr) return t;
  if (madvise(p, len, MADV_HUGEPAGE) != 0) {  // no THP in this kernel: keep the original
    std::free(p);
    return t;
  }
  std::memcpy(p, t.const_data_ptr(), bytes);
  return torch::from_blob(p, t.sizes(), t.strides(), [](void* q) { std::free(q); }, t.options());
#else
  return t;
#endif
}

std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("gemv_topk", &gemv_topk, "Top-K of |x| (ties to the lower index) then sparse GEMV",
          pybind11::arg("x"), pybind11::arg("w"), pybind11::arg("k"), pybind11::arg("bias"),
          pybind11::arg("scale") = pybind11::none());
  mod.def("gemv_nonzero", &gemv_nonzero, "Sparse GEMV over the nonzero inputs", pybind11::arg("x"),
          pybind11::arg("w"), pybind11::arg("bias"), pybind11::arg("scale") = pybind11::none());
  mod.def("kept_rows_read", &kept_rows_read_tensor,
          "The kept-row access pattern alone: the sum of the 64-bit words of rows idx",
          pybind11::arg("buf"), pybind11::arg("idx"));
  mod.def("stream_read", &stream_read_tensor, "STREAM-like read of an fp32 buffer (its sum)",
          pybind11::arg("a"));
  mod.def("gemv_ternary", &gemv_ternary, "Sparse GEMV over 2-bit packed ternary weights",
          pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("n"), pybind11::arg("alpha"),
          pybind11::arg("bias"));
  mod.def("huge_page_copy", &huge_page_copy,
          "Copy of a contiguous CPU tensor in memory advised for transparent huge pages",
          pybind11::arg("t"));
  mod.def("set_profile", [](bool on) {
            profile() = Profile();
            profile().on = on;
          }, "Reset the decode step's per-phase counters and switch them on or off",
          pybind11::arg("on"));
  mod.def("profile", [] {
            static const char* names[kPhases] = {"select", "qkv", "o", "gate_up", "down",
                                                 "router", "reduce", "head", "attention",
                                                 "activation", "step", "wait"};
            std::map<std::string, int64_t> out;
            for (int i = 0; i < kPhases; ++i) out[names[i]] = profile().ns[i];
            out["steps"] = profile().steps;
            return out;
          }, "Nanoseconds per phase summed over the profiled decode steps, and their count");
  mod.def("isa", [] { return isa_name(g_isa); }, "Instruction set the inner loops run with");
  mod.def("cpu_isa", [] { return isa_name(kCpuIsa); }, "The widest instruction set of this CPU");
  mod.def("set_isa", [](const std::string& name) {
            const std::string prev = isa_name(g_isa);
            for (Isa isa : {Isa::kBase, Isa::kAvx2, Isa::kAvx512})
              if (isa_name(isa) == name) {
                TORCH_CHECK(isa <= kCpuIsa, "set_isa: this CPU runs ", isa_name(kCpuIsa),
                            " at most, not ", name);
                g_isa = isa;
                return prev;
              }
            TORCH_CHECK(false, "set_isa: unknown instruction set ", name,
                        " (baseline, avx2, avx512)");
            return prev;
          }, "Run the inner loops with a narrower instruction set than the CPU's (tests, "
          "benchmarks); returns the previous one", pybind11::arg("name"));
  mod.def("int8_path", [] { return std::string(int8_vnni_mode() ? "vnni" : "fp32"); },
          "How dense int8 products run: vnni (int16 activations, vpdpwssd) or fp32 (FMA)");
  mod.def("set_int8_vnni", [](int mode) {
            const int prev = int8_vnni_setting();
            TORCH_CHECK(mode >= 0 && mode <= 2, "set_int8_vnni: mode 0 (off), 1 (dense), 2 (all)");
            int8_vnni_setting() = mode;
            return prev;
          }, "Which int8 products take the VNNI path: 0 none, 1 dense (consecutive rows), 2 all; "
          "returns the previous mode", pybind11::arg("mode"));
  pybind11::class_<DecodeStep>(mod, "DecodeStep", "One token of the whole model (decode_step.h)")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, int64_t, bool, double, bool,
                          at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, std::vector<int64_t>, std::vector<at::Tensor>,
                          std::vector<at::Tensor>, at::Tensor, std::vector<std::vector<double>>,
                          std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>,
                          std::vector<at::Tensor>, std::vector<std::vector<double>>>(),
           pybind11::arg("hidden"), pybind11::arg("nq"), pybind11::arg("nkv"), pybind11::arg("hd"),
           pybind11::arg("ffn"), pybind11::arg("rmsnorm"), pybind11::arg("eps"),
           pybind11::arg("swiglu"), pybind11::arg("embedding"), pybind11::arg("head_t"),
           pybind11::arg("cos"), pybind11::arg("sin"), pybind11::arg("weights"),
           pybind11::arg("biases"), pybind11::arg("keeps"), pybind11::arg("norms"),
           pybind11::arg("scales"), pybind11::arg("head_scale"),
           pybind11::arg("specs") = std::vector<std::vector<double>>(),
           pybind11::arg("packed") = std::vector<at::Tensor>(),
           pybind11::arg("experts") = std::vector<int64_t>(),
           pybind11::arg("router_topk") = std::vector<int64_t>(),
           pybind11::arg("routers") = std::vector<at::Tensor>(),
           pybind11::arg("router_specs") = std::vector<std::vector<double>>())
      .def("step", &DecodeStep::step, "Logits [V] of one token at one position",
           pybind11::arg("token"), pybind11::arg("pos"), pybind11::arg("k_cache"),
           pybind11::arg("v_cache"))
      .def_property_readonly("vocab", &DecodeStep::vocab);
}
