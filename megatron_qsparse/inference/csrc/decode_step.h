// The compiled decode step: one call computes a whole token of a LLaMA-style model (embedding,
// every block, final norm, LM head) for batch size 1, reading the same weights and writing the same
// KV cache as the layer-by-layer path of megatron_qsparse/inference/model.py.
//
// Why: at small widths a token is a few hundred tiny PyTorch calls (norms, views, RoPE, SDPA,
// splits, residual adds, one kernel call per projection), each costing microseconds of dispatch,
// so the projections (where sparsity saves work) are a minority of the time and a sparse model
// decodes barely faster than a dense one. Here everything between the projections is a few
// plain loops, so a token costs about its weight traffic: dense reads every row of every
// projection, Q-Sparse reads the rows of its Top-K inputs (gemv_core.h), and the dense LM head is
// shared by both.
//
// Per block (pre-norm, as model/transformer.py):
//   a = norm(h); [q; k; v] = P_qkv(a); RoPE(q, k) at position pos (rotate_half pairs i, i + hd/2);
//   append k, v to the cache; y_j = softmax(q_j · K_g^T / sqrt(hd)) V_g for query head j, group
//   g = j / (nq / nkv); h += P_o(y); a = norm(h); [gate; up] = P_gate_up(a);
//   h += P_down(act(gate, up)), act = up ⊙ relu(gate)^2 (relu2_glu) or silu(gate) ⊙ up (swiglu).
// A mixture-of-experts block replaces the FFN by DeepSpeed's gating of one token in evaluation:
//   logits = P_router(a) (fp32, [E]; its input sparsified when the router's is), g = softmax(logits),
//   top-1: e1 = argmax g, h += g[e1] · FFN_e1(a); top-2: e1 = argmax g, e2 = argmax of the logits
//   without e1, h += (g[e1] FFN_e1(a) + g[e2] FFN_e2(a)) / max(g[e1] + g[e2], eps) (one token never
//   exceeds an expert's capacity; an all-zero a routes to nothing, as model/moe.py's _Expert).
// P(x) keeps the Top-K of |x| (k > 0: the training selection, ties to the lower index, zeros left
// out) or every nonzero input (k == 0: mode none), then reads only those rows.
// Everything is fp32; projection weights may be stored bf16 (converted as they are read).
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "gemv_core.h"

namespace qsparse_gemv {

// Small vector loops of the step, compiled for AVX-512, AVX2 and baseline x86-64 and picked at
// load time (GCC function multiversioning), like the GEMV's inner loops.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QS_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QS_MULTIVERSION
#endif

// Grouped-query attention of one token over `len` cached positions, query heads [j0, j1): for
// head j (group g = j / (nq / nkv)), y_j = softmax(q_j K_g^T · scale) V_g; K, V are
// [nkv, max_len, hd] rows; head j's scores go to p + j·len.
QS_MULTIVERSION void attention_heads(const float* __restrict q, const float* __restrict K,
                                     const float* __restrict V, int64_t j0, int64_t j1,
                                     int64_t nq, int64_t nkv, int64_t hd, int64_t max_len,
                                     int64_t len, float scale, float* __restrict scores,
                                     float* __restrict y) {
  const int64_t group = nq / nkv;
  for (int64_t j = j0; j < j1; ++j) {
    const float* qj = q + j * hd;
    const float* Kg = K + (j / group) * max_len * hd;
    const float* Vg = V + (j / group) * max_len * hd;
    float* p = scores + j * len;
    float mx = -INFINITY;
    for (int64_t t = 0; t < len; ++t) {
      const float* kt = Kg + t * hd;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < hd; ++i) s += qj[i] * kt[i];
      p[t] = s * scale;
      mx = std::max(mx, p[t]);
    }
    float sum = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      p[t] = std::exp(p[t] - mx);
      sum += p[t];
    }
    const float inv = 1.f / sum;
    float* yj = y + j * hd;
    for (int64_t i = 0; i < hd; ++i) yj[i] = 0.f;
    for (int64_t t = 0; t < len; ++t) {
      const float w = p[t] * inv;
      const float* vt = Vg + t * hd;
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) yj[i] += w * vt[i];
    }
  }
}

// All nq heads (scores: nq·len floats), shared out by head on the product threads once the
// work is worth a hand-off (long contexts); every head is computed the same way on any thread.
inline void attention(const float* q, const float* K, const float* V, int64_t nq, int64_t nkv,
                      int64_t hd, int64_t max_len, int64_t len, float scale, float* scores,
                      float* y) {
  auto fn = [&](int64_t j0, int64_t j1) {
    attention_heads(q, K, V, j0, j1, nq, nkv, hd, max_len, len, scale, scores, y);
  };
  const int64_t threads = 2 * nq * len * hd >= kParallelMacs
                              ? std::min<int64_t>(at::get_num_threads(), nq) : 1;
  Pool::get().run(nq, 1, threads, fn);
}

// e^x for the GLU (vectorizable, no libm call): x = n·ln2 + r with |r| <= ln2 / 2, a degree-6
// polynomial for e^r (Cephes' expf coefficients, relative error ~2 ulp) times 2^n from the
// exponent bits; x is clamped to [-87, 88] (e^-87 ~ 1.6e-38, e^88 ~ 1.7e38), which leaves
// silu(x) = x / (1 + e^-x) at x or ~0 there, as in fp32.
inline float exp_glu(float x) {
  x = std::min(88.f, std::max(-87.f, x));
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float e = 1.9875691500e-4f;
  e = e * r + 1.3981999507e-3f;
  e = e * r + 8.3334519073e-3f;
  e = e * r + 4.1665795894e-2f;
  e = e * r + 1.6666665459e-1f;
  e = e * r + 5.0000001201e-1f;
  e = (e * r) * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// gate = silu(gate) ⊙ up (SwiGLU) or relu(gate)² ⊙ up (relu2_glu), in place.
QS_MULTIVERSION void glu(float* __restrict gate, const float* __restrict up, int64_t n,
                         bool swiglu) {
  if (swiglu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.f + exp_glu(-gate[i])) * up[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float r = gate[i] > 0.f ? gate[i] : 0.f;
      gate[i] = up[i] * (r * r);
    }
  }
}

// y = w ⊙ x / sqrt(mean(x²) + eps)
QS_MULTIVERSION void rms_norm(const float* __restrict x, const float* __restrict w, float eps,
                              float* __restrict y, int64_t n) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

// How a projection chooses its inputs (the training sparsifier's forward, element for element):
// optional per-token int8 fake quantization first, then a selection, then the optional L2
// rescale; BitNet projections quantize the result to int8 again and read 2-bit ternary rows.
enum class Select : int64_t { kNone = 0, kTopK = 1, kBlock = 2, kReLU = 3, kThreshold = 4 };

// Per-token absmax int8 fake quantization, the operations of sparsity/ste.py's _fake_quant_int8 in
// the same fp32 order: g = max|x| + eps; y = clamp(round(x · ((1/g)·127)), -128, 127) · (g/127)
// (PyTorch's `127.0 / g` is reciprocal-then-multiply; round is to nearest even).
QS_MULTIVERSION void fake_quant_int8(const float* x, int64_t n, float eps, float* y) {  // y may be x
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float g = amax + eps;
  const float up = (1.f / g) * 127.f;
  const float down = g / 127.f;
  for (int64_t i = 0; i < n; ++i) {
    float q = std::nearbyint(x[i] * up);
    q = std::min(127.f, std::max(-128.f, q));
    y[i] = q * down;
  }
}

// One projection: its input-major weight [in, out] (fp32, bf16, fp16 or int8 with per-output
// scales; for BitNet the 2-bit packed ternary rows and alpha), bias (or empty), and its selection.
struct Projection {
  at::Tensor wt, bias, scale;  // scale: fp32 [out] for int8 weights, else empty
  at::Tensor packed;           // BitNet: uint8 [in, ceil(out/4)]
  float alpha = 0.f;
  Select select = Select::kNone;
  int64_t keep = 0;            // Top-K: inputs kept (0 < keep < in)
  int64_t bn = 0, bm = 0;      // Block N:M
  float threshold = 0.f;       // |x| >= threshold kept (threshold > 0)
  bool quantize = false, rescale = false, bitnet = false;
  int64_t in = 0, out = 0;
  // plain Top-K or a dense projection: selection fused with the gather, no vector written
  bool simple() const {
    return !quantize && !rescale && !bitnet &&
           (select == Select::kNone || select == Select::kTopK);
  }
};

class DecodeStep {
 public:
  // `layers`: 4 projections per block in the order qkv, o, gate_up, down, as (wt, bias, keep);
  // `norms`: per block the input and post-attention norm (weight, bias) = 4 tensors per block,
  // then the final norm's (weight, bias); a bias is an empty tensor for RMSNorm.
  DecodeStep(int64_t hidden, int64_t nq, int64_t nkv, int64_t hd, int64_t ffn, bool rmsnorm,
             double eps, bool swiglu, at::Tensor embedding, at::Tensor head_t, at::Tensor cos,
             at::Tensor sin, std::vector<at::Tensor> weights, std::vector<at::Tensor> biases,
             std::vector<int64_t> keeps, std::vector<at::Tensor> norms,
             std::vector<at::Tensor> scales, at::Tensor head_scale,
             std::vector<std::vector<double>> specs, std::vector<at::Tensor> packed,
             std::vector<int64_t> experts, std::vector<int64_t> router_topk,
             std::vector<at::Tensor> routers, std::vector<std::vector<double>> router_specs)
      : h_(hidden), nq_(nq), nkv_(nkv), hd_(hd), ffn_(ffn), rms_(rmsnorm),
        eps_(static_cast<float>(eps)), swiglu_(swiglu),
        scale_(1.f / std::sqrt(static_cast<float>(hd))), emb_(embedding), head_(head_t), head_scale_(head_scale),
        cos_(cos), sin_(sin), norms_(std::move(norms)),
        sel_(std::max({hidden, nq * hd, ffn}) + 1) {  // widest projection input
    TORCH_CHECK(nq > 0 && nkv > 0 && nq % nkv == 0 && hd % 2 == 0, "decode step: bad heads");
    TORCH_CHECK(weights.size() == biases.size() && weights.size() == keeps.size() &&
                    weights.size() == scales.size() &&
                    (specs.empty() || specs.size() == weights.size()) &&
                    (packed.empty() || packed.size() == weights.size()),
                "decode step: one bias, keep, scale (and spec, packed) per projection");
    // per block: qkv, o, then gate_up, down of the dense FFN or of each of its E experts
    if (experts.empty()) {
      TORCH_CHECK(weights.size() % 4 == 0, "decode step: 4 projections per dense block");
      experts.assign(weights.size() / 4, 0);
      router_topk.assign(experts.size(), 0);
      routers.assign(experts.size(), at::Tensor());
      router_specs.assign(experts.size(), std::vector<double>());
    }
    layers_ = static_cast<int64_t>(experts.size());
    TORCH_CHECK(router_topk.size() == experts.size() && routers.size() == experts.size() &&
                    router_specs.size() == experts.size(),
                "decode step: one expert count, router top-k, router and router spec per block");
    int64_t expected = 0;
    for (int64_t l = 0; l < layers_; ++l) {
      TORCH_CHECK(experts[l] >= 0, "decode step: negative expert count");
      first_.push_back(expected);
      expected += 2 + 2 * std::max<int64_t>(1, experts[l]);
    }
    TORCH_CHECK(static_cast<int64_t>(weights.size()) == expected, "decode step: expected ",
                expected, " projections for these blocks, got ", weights.size());
    experts_ = experts;
    TORCH_CHECK(norms_.size() == static_cast<size_t>(4 * layers_ + 2),
                "decode step: expected ", 4 * layers_ + 2, " norm tensors, got ", norms_.size());
    check_f32(emb_, "embedding", 2);
    TORCH_CHECK(emb_.size(1) == h_, "decode step: embedding width ", emb_.size(1), " != ", h_);
    vocab_ = emb_.size(0);
    check_weight(head_, head_scale_, "LM head");
    TORCH_CHECK(weight_in(head_) == h_ && weight_out(head_) == vocab_,
                "decode step: the LM head must be input-major [hidden, V]");
    check_f32(cos_, "rotary cos", 2);
    check_f32(sin_, "rotary sin", 2);
    TORCH_CHECK(cos_.size(1) == hd_ && sin_.sizes() == cos_.sizes(), "decode step: rotary tables");
    for (size_t i = 0; i < norms_.size(); ++i) {
      if (norms_[i].numel() == 0) {
        TORCH_CHECK(rms_ && i % 2 == 1, "decode step: LayerNorm needs a bias");
        continue;
      }
      check_f32(norms_[i], "norm", 1);
      TORCH_CHECK(norms_[i].numel() == h_, "decode step: norm of ", norms_[i].numel(), " != ", h_);
    }
    const int64_t q = (nq_ + 2 * nkv_) * hd_;
    std::vector<std::pair<int64_t, int64_t>> shapes;  // [in, out] of each projection
    for (int64_t l = 0; l < layers_; ++l) {
      shapes.push_back({h_, q});
      shapes.push_back({nq_ * hd_, h_});
      for (int64_t e = 0; e < std::max<int64_t>(1, experts[l]); ++e) {
        shapes.push_back({h_, 2 * ffn_});
        shapes.push_back({ffn_, h_});
      }
    }
    for (size_t i = 0; i < weights.size(); ++i) {
      Projection p;
      p.wt = weights[i];
      p.bias = biases[i];
      p.scale = scales[i];
      p.keep = keeps[i];
      p.in = shapes[i].first;
      p.out = shapes[i].second;
      check_weight(p.wt, p.scale, "projection");
      TORCH_CHECK(weight_in(p.wt) == p.in && weight_out(p.wt) == p.out, "decode step: projection ",
                  i, " is ", p.wt.sizes(), ", expected [", p.in, ", ", p.out, "] (input-major)");
      if (p.bias.numel()) {
        check_f32(p.bias, "bias", 1);
        TORCH_CHECK(p.bias.numel() == p.out, "decode step: bias size");
      }
      TORCH_CHECK(p.keep >= 0 && p.keep <= p.in, "decode step: keep ", p.keep, " of ", p.in);
      p.select = p.keep > 0 && p.keep < p.in ? Select::kTopK : Select::kNone;
      if (!specs.empty()) apply_spec(specs[i], p);
      if (p.bitnet) {
        TORCH_CHECK(!packed.empty() && packed[i].scalar_type() == at::kByte &&
                        packed[i].is_contiguous() && packed[i].dim() == 2 &&
                        packed[i].size(0) == p.in && packed[i].size(1) == (p.out + 3) / 4,
                    "decode step: BitNet projection ", i, " needs its packed uint8 [in, ",
                    (p.out + 3) / 4, "] ternary rows");
        p.packed = packed[i];
      }
      proj_.push_back(p);
    }
    // routers: fp32 input-major [hidden, E] (DeepSpeed's gate computes in fp32), no bias
    for (int64_t l = 0; l < layers_; ++l) {
      Projection r;
      if (experts[l] > 0) {
        TORCH_CHECK(router_topk[l] == 1 || router_topk[l] == 2,
                    "decode step: routers take the top 1 or 2 experts, not ", router_topk[l]);
        TORCH_CHECK(experts[l] >= router_topk[l], "decode step: top-", router_topk[l], " of ",
                    experts[l], " experts");
        check_f32(routers[l], "router", 2);
        TORCH_CHECK(routers[l].size(0) == h_ && routers[l].size(1) == experts[l],
                    "decode step: the router of block ", l, " must be input-major [", h_, ", ",
                    experts[l], "]");
        r.wt = routers[l];
        r.scale = at::Tensor();
        r.in = h_;
        r.out = experts[l];
        if (!router_specs[l].empty()) apply_spec(router_specs[l], r);
        TORCH_CHECK(!r.bitnet, "decode step: a router has no ternary weights");
        topk_.push_back(router_topk[l]);
      } else {
        topk_.push_back(0);
      }
      router_.push_back(r);
    }
    const int64_t widest_router = *std::max_element(experts.begin(), experts.end());
    logits_.resize(std::max<int64_t>(1, widest_router));
    moe_.resize(h_);
    x_.resize(h_);
    xs_.resize(std::max({h_, nq_ * hd_, ffn_}));
    a_.resize(std::max<int64_t>(h_, nq_ * hd_));
    qkv_.resize(q);
    gu_.resize(2 * ffn_);
    tmp_.resize(h_);
  }

  // Logits [V] (fp32) of `token` at position `pos`, after writing its keys/values at `pos` of the
  // caches k, v [layers, batch, nkv, max_len, hd] (batch row 0).
  at::Tensor step(int64_t token, int64_t pos, const at::Tensor& kc, const at::Tensor& vc) {
    TORCH_CHECK(token >= 0 && token < vocab_, "decode step: token ", token, " outside [0, ",
                vocab_, ")");
    check_cache(kc, "key");
    check_cache(vc, "value");
    const int64_t max_len = kc.size(3);
    TORCH_CHECK(pos >= 0 && pos < max_len, "decode step: position ", pos, " outside the cache (",
                max_len, ")");
    TORCH_CHECK(pos < cos_.size(0), "decode step: position ", pos, " beyond the rotary table");
    Pool::Hot hot;  // helpers stay awake between this step's products (and into the next token)
    PhaseTimer timer(kStep);
    profile().steps += profile().on;
    const int64_t cache_layer = kc.stride(0);  // one layer's [batch, nkv, max_len, hd]
    float* K = kc.data_ptr<float>();
    float* V = vc.data_ptr<float>();
    float* x = x_.data();
    std::memcpy(x, emb_.data_ptr<float>() + token * h_, h_ * sizeof(float));
    const int64_t hq = nq_ * hd_, hk = nkv_ * hd_;
    for (int64_t l = 0; l < layers_; ++l) {
      const Projection* p = &proj_[first_[l]];
      // attention
      norm(x, norms_[4 * l], norms_[4 * l + 1], a_.data());
      project(p[0], a_.data(), qkv_.data(), kQkv);
      float* q = qkv_.data();
      float* k = q + hq;
      float* v = k + hk;
      rope(q, nq_, pos);
      rope(k, nkv_, pos);
      float* Kl = K + l * cache_layer;
      float* Vl = V + l * cache_layer;
      for (int64_t g = 0; g < nkv_; ++g) {
        std::memcpy(Kl + (g * max_len + pos) * hd_, k + g * hd_, hd_ * sizeof(float));
        std::memcpy(Vl + (g * max_len + pos) * hd_, v + g * hd_, hd_ * sizeof(float));
      }
      scores_.resize(std::max<int64_t>(scores_.size(), nq_ * (pos + 1)));
      {
        PhaseTimer t(kAttention);
        attention(q, Kl, Vl, nq_, nkv_, hd_, max_len, pos + 1, scale_, scores_.data(), a_.data());
      }
      project(p[1], a_.data(), tmp_.data(), kO);
      for (int64_t i = 0; i < h_; ++i) x[i] += tmp_[i];
      // FFN
      norm(x, norms_[4 * l + 2], norms_[4 * l + 3], a_.data());
      if (experts_[l] == 0) {
        ffn(p + 2, a_.data(), tmp_.data());
        for (int64_t i = 0; i < h_; ++i) x[i] += tmp_[i];
      } else {
        mixture(l, p + 2, a_.data(), x);
      }
    }
    norm(x, norms_[4 * layers_], norms_[4 * layers_ + 1], a_.data());
    gather_all(a_.data(), h_, all_);
    at::Tensor logits = at::empty({vocab_}, emb_.options());
    PhaseTimer t(kHead);
    product_tensor(all_, head_, vocab_, scale_ptr(head_scale_), nullptr,
                   logits.data_ptr<float>());
    return logits;
  }

  int64_t vocab() const { return vocab_; }

 private:
  static void check_f32(const at::Tensor& t, const char* what, int64_t dim) {
    TORCH_CHECK(t.dim() == dim && t.is_contiguous() && t.device().is_cpu() &&
                    t.scalar_type() == at::kFloat,
                "decode step: ", what, " must be a contiguous CPU fp32 tensor of ", dim, " dims");
  }

  static const float* scale_ptr(const at::Tensor& s) {
    return s.numel() ? s.data_ptr<float>() : nullptr;
  }

  // A decode weight: contiguous CPU [in, out] (or tiled, see seg in gemv_core.h) fp32 / bf16 /
  // fp16, or int8 with fp32 [out] scales.
  static void check_weight(const at::Tensor& w, const at::Tensor& scale, const char* what) {
    const auto t = w.scalar_type();
    TORCH_CHECK(layout_ok(w) &&
                    (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kChar),
                "decode step: ", what, " weights must be contiguous CPU fp32/bf16/fp16/int8");
    if (t == at::kChar) {
      TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                      scale.numel() == weight_out(w),
                  "decode step: int8 ", what, " weights need fp32 [out] scales");
    } else {
      TORCH_CHECK(scale.numel() == 0, "decode step: a scale goes with int8 weights only");
    }
  }

  void check_cache(const at::Tensor& c, const char* what) const {
    TORCH_CHECK(c.dim() == 5 && c.is_contiguous() && c.device().is_cpu() &&
                    c.scalar_type() == at::kFloat && c.size(0) == layers_ && c.size(2) == nkv_ &&
                    c.size(4) == hd_,
                "decode step: the ", what, " cache must be a contiguous fp32 [", layers_,
                ", batch, ", nkv_, ", max_len, ", hd_, "] tensor");
  }

  // A projection's selection from its spec [select, keep, n, m, threshold, quantize, rescale,
  // bitnet, alpha] (compiled_step.py's _spec).
  static void apply_spec(const std::vector<double>& sp, Projection& p) {
    TORCH_CHECK(sp.size() == 9, "decode step: a projection spec has 9 numbers");
    const int64_t sel = static_cast<int64_t>(sp[0]);
    TORCH_CHECK(sel >= 0 && sel <= 4, "decode step: unknown selection ", sel);
    p.select = static_cast<Select>(sel);
    p.keep = static_cast<int64_t>(sp[1]);
    p.bn = static_cast<int64_t>(sp[2]);
    p.bm = static_cast<int64_t>(sp[3]);
    p.threshold = static_cast<float>(sp[4]);
    p.quantize = sp[5] != 0;
    p.rescale = sp[6] != 0;
    p.bitnet = sp[7] != 0;
    p.alpha = static_cast<float>(sp[8]);
    if (p.select == Select::kTopK && p.keep >= p.in) p.select = Select::kNone;
    TORCH_CHECK(p.select != Select::kTopK || p.keep >= 1, "decode step: Top-K keeps ", p.keep);
    TORCH_CHECK(p.select != Select::kBlock ||
                    (p.bm >= 1 && p.bn >= 1 && p.bn <= p.bm && p.in % p.bm == 0),
                "decode step: Block ", p.bn, ":", p.bm, " on ", p.in, " inputs");
  }

  // y = P_down(act(P_gate_up(a))) for the FFN whose two projections start at p.
  void ffn(const Projection* p, const float* a, float* y) {
    project(p[0], a, gu_.data(), kGateUp);
    float* gate = gu_.data();
    const float* up = gate + ffn_;
    {
      PhaseTimer t(kActivation);
      glu(gate, up, ffn_, swiglu_);
    }
    project(p[1], gate, y, kDown);
  }

  // x += the mixture of experts of block l at its normed input a (experts' projections from p).
  void mixture(int64_t l, const Projection* p, const float* a, float* x) {
    const int64_t E = experts_[l];
    float* logits = logits_.data();
    project(router_[l], a, logits, kRouter);
    float mx = -INFINITY;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[e]);
    std::vector<float>& g = gates_;
    g.resize(E);
    float sum = 0.f;
    for (int64_t e = 0; e < E; ++e) {
      g[e] = std::exp(logits[e] - mx);
      sum += g[e];
    }
    for (int64_t e = 0; e < E; ++e) g[e] /= sum;
    int64_t e1 = 0;  // torch.argmax: the first of equal maxima
    for (int64_t e = 1; e < E; ++e)
      if (g[e] > g[e1]) e1 = e;
    int64_t chosen[2] = {e1, -1};
    float weight[2] = {g[e1], 0.f};
    if (topk_[l] == 2) {  // the second expert by logit (DeepSpeed's top2gating without sampling)
      int64_t e2 = -1;
      for (int64_t e = 0; e < E; ++e)
        if (e != e1 && (e2 < 0 || logits[e] > logits[e2])) e2 = e;
      const float denom = std::max(g[e1] + g[e2], std::numeric_limits<float>::epsilon());
      chosen[1] = e2;
      weight[0] = g[e1] / denom;
      weight[1] = g[e2] / denom;
    }
    bool any = false;  // an all-zero input is an empty capacity slot to model/moe.py's _Expert
    for (int64_t i = 0; i < h_ && !any; ++i) any = a[i] != 0.f;
    if (!any) return;
    std::fill(moe_.begin(), moe_.end(), 0.f);
    for (int c = 0; c < topk_[l]; ++c) {
      ffn(p + 2 * chosen[c], a, tmp_.data());
      for (int64_t i = 0; i < h_; ++i) moe_[i] += weight[c] * tmp_[i];
    }
    for (int64_t i = 0; i < h_; ++i) x[i] += moe_[i];
  }

  // y = w ⊙ normalize(x) (+ b): RMSNorm x / sqrt(mean(x²) + eps), or LayerNorm.
  void norm(const float* x, const at::Tensor& w, const at::Tensor& b, float* y) const {
    const float* wp = w.data_ptr<float>();
    if (rms_) return rms_norm(x, wp, eps_, y, h_);
    float mean = 0.f;
    for (int64_t i = 0; i < h_; ++i) mean += x[i];
    mean /= static_cast<float>(h_);
    float var = 0.f;
    for (int64_t i = 0; i < h_; ++i) var += (x[i] - mean) * (x[i] - mean);
    const float inv = 1.f / std::sqrt(var / static_cast<float>(h_) + eps_);
    const float* bp = b.data_ptr<float>();
    for (int64_t i = 0; i < h_; ++i) y[i] = wp[i] * ((x[i] - mean) * inv) + bp[i];
  }

  // The kept inputs of p, then the product over their rows. Plain Top-K and dense projections
  // select while gathering; every other mode writes the sparse input (xs_) first, as the layer's
  // sparsifier does, then gathers its nonzero entries.
  void project(const Projection& p, const float* x, float* y, Phase kind) {
    {
      PhaseTimer t(kSelect);
      select_inputs(p, x);
    }
    PhaseTimer t(kind);
    const float* b = p.bias.numel() ? p.bias.data_ptr<float>() : nullptr;
    if (p.bitnet)
      return product_ternary(kept_, p.packed.data_ptr<uint8_t>(), p.out, p.packed.size(1),
                             p.alpha, b, y);
    product_tensor(kept_, p.wt, p.out, scale_ptr(p.scale), b, y);
  }

  // kept_ = the inputs of p that its sparsifier keeps, from its input x.
  void select_inputs(const Projection& p, const float* x) {
    if (p.simple()) {
      if (p.select == Select::kTopK)
        gather_topk(x, p.in, p.keep, sel_, kept_);
      else
        gather_nonzero(x, p.in, kept_);
      return;
    }
    float* xs = xs_.data();
    const int64_t d = p.in;
    const float* src = x;
    if (p.quantize) {
      fake_quant_int8(x, d, 1e-5f, xs);
      src = xs;
    }
    double dense_sq = 0.0;
    if (p.rescale)
      for (int64_t i = 0; i < d; ++i) dense_sq += static_cast<double>(src[i]) * src[i];
    switch (p.select) {
      case Select::kNone:
        if (src != xs) std::memcpy(xs, src, d * sizeof(float));
        break;
      case Select::kTopK: {
        const uint32_t* bits = reinterpret_cast<const uint32_t*>(src);
        const qsparse::Threshold<uint32_t> th = sel_.find(bits, d, p.keep);
        for (int64_t i = 0; i < d; ++i) {
          const uint32_t a = bits[i] & 0x7fffffffu;
          const bool keep = (a > th.t) | ((a == th.t) & (i < th.limit));
          xs[i] = keep ? src[i] : 0.f;
        }
        break;
      }
      case Select::kBlock: {  // the n largest |x| of every m, ties to the lower index
        const int64_t m = p.bm;
        blk_.resize(m);
        for (int64_t g = 0; g < d; g += m) {
          for (int64_t i = 0; i < m; ++i) {
            const float ai = std::fabs(src[g + i]);
            int64_t rank = 0;  // entries ahead of i: larger, or equal at a lower index
            for (int64_t j = 0; j < m; ++j) {
              const float aj = std::fabs(src[g + j]);
              rank += (aj > ai) | ((aj == ai) & (j < i));
            }
            blk_[i] = rank < p.bn ? src[g + i] : 0.f;
          }
          std::memcpy(xs + g, blk_.data(), m * sizeof(float));  // src may be xs
        }
        break;
      }
      case Select::kReLU:
        for (int64_t i = 0; i < d; ++i) xs[i] = src[i] > 0.f ? src[i] : 0.f;
        break;
      case Select::kThreshold:
        if (p.threshold > 0.f) {
          for (int64_t i = 0; i < d; ++i) xs[i] = std::fabs(src[i]) >= p.threshold ? src[i] : 0.f;
        } else if (src != xs) {
          std::memcpy(xs, src, d * sizeof(float));
        }
        break;
    }
    if (p.rescale) {  // ||x|| / ||x_kept|| (1 when nothing is kept), as sparsity/ste.py l2_scale
      double kept_sq = 0.0;
      for (int64_t i = 0; i < d; ++i) kept_sq += static_cast<double>(xs[i]) * xs[i];
      const float dense = static_cast<float>(std::sqrt(dense_sq));
      const float kept = static_cast<float>(std::sqrt(kept_sq));
      const float s = kept > 0.f ? dense / std::max(kept, 1e-30f) : 1.f;
      for (int64_t i = 0; i < d; ++i) xs[i] *= s;
    }
    if (p.bitnet) fake_quant_int8(xs, d, 1e-5f, xs);
    gather_nonzero(xs, d, kept_);
  }

  // RoPE in place on `heads` heads of hd features at position pos (rotate_half convention).
  void rope(float* t, int64_t heads, int64_t pos) const {
    const float* c = cos_.data_ptr<float>() + pos * hd_;
    const float* s = sin_.data_ptr<float>() + pos * hd_;
    const int64_t half = hd_ / 2;
    for (int64_t j = 0; j < heads; ++j) {
      float* r = t + j * hd_;
      for (int64_t i = 0; i < half; ++i) {
        const float a = r[i], b = r[i + half];
        r[i] = a * c[i] - b * s[i];
        r[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }

  int64_t h_, nq_, nkv_, hd_, ffn_, layers_ = 0, vocab_ = 0;
  bool rms_;
  float eps_;
  bool swiglu_;
  float scale_;
  at::Tensor emb_, head_, head_scale_, cos_, sin_;
  std::vector<at::Tensor> norms_;
  std::vector<Projection> proj_, router_;
  std::vector<int64_t> first_, experts_, topk_;  // per block: first projection, E (0: dense), k
  qsparse::TopKSelect<uint32_t> sel_;
  Kept kept_, all_;
  std::vector<float> x_, xs_, blk_, a_, qkv_, gu_, tmp_, scores_, logits_, gates_, moe_;
};

}  // namespace qsparse_gemv
