// Fused decode on AVX2 CPUs: all decoder blocks of one decode step in one call, fp32 activations.
//
// A 3B decode step spent 18-25 ms outside the matrix products when each block ran as ~40 small
// torch ops from Python (dispatch, allocation, SDPA's flash kernel set up for one query, an
// unvectorised tanh): 20-25 % of an int4 step. Here a block is the six products of
// cpu_linear_avx2.cpp plus plain loops for the rest:
//
//   h = LN1(x); q, k, v = h Wq, h Wk, h Wv (+ biases); RoPE(q, k)
//   per token m in order: write k[m], v[m] to the cache at (rows[m], slots[m]), then attend over
//       that cache row's slots [0, n_keys[m]) where mask[m] is true (softmax in fp32)
//   x += attn Wo; x += gelu_tanh(LN2(x) Wfc) Wproj
//
// Tokens are independent rows (decode: one token per cache row) or consecutive tokens of one row
// (a speculative verify pass): writing token m before attending for m and never reading later
// tokens' keys gives each token exactly what one-token decode computes at its position. Every
// per-token result is computed in an order that does not depend on the other tokens or on how many
// masked keys follow (masked keys add exact zeros), so outputs are batch-invariant and a verify
// pass gives the logits of plain decoding bit for bit.
#include "cpu_avx2.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// e^x for 8 floats (Cephes expf: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n from the
// exponent bits); relative error ~1e-7 over [-87, 88].
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// One Linear as the decode step multiplies it: float (fp32/bf16), int8 or 4-bit weights, the
// layouts of starcoder2.infer.quantize; in_scale is AWQ's 1/s applied to x first.
struct Linear {
  int64_t mode;  // 0 float, 1 int8, 2 int4
  torch::Tensor w;
  c10::optional<torch::Tensor> scale, lo, in_scale, bias;
  int64_t group_size;

  torch::Tensor operator()(torch::Tensor x) const {
    if (in_scale) x = x * *in_scale;
    if (mode == 0) return linear_float(x, w, bias);
    if (mode == 1) return linear_int8(x, w, *scale, bias);
    return linear_int4(x, w, *scale, *lo, group_size, bias);
  }
};

struct Block {
  torch::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
  Linear q, k, v, o, fc, proj;
};

// y (M, C) = LayerNorm(x) rows: mean and variance in float over 8 lanes, then (x - mean) * rstd * w + b.
torch::Tensor layer_norm(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b, float eps) {
  const int64_t M = x.size(0), C = x.size(1);
  auto y = torch::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * C;
    __m256 s = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; c += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(r + c));
    const float mean = hsum(s) / C;
    const __m256 mv = _mm256_set1_ps(mean);
    __m256 s2 = _mm256_setzero_ps();
    for (int64_t c = 0; c < C; c += 8) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(r + c), mv);
      s2 = _mm256_fmadd_ps(d, d, s2);
    }
    const __m256 rstd = _mm256_set1_ps(1.0f / std::sqrt(hsum(s2) / C + eps));
    for (int64_t c = 0; c < C; c += 8) {
      const __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(r + c), mv), rstd);
      _mm256_storeu_ps(yp + m * C + c, _mm256_fmadd_ps(d, _mm256_loadu_ps(wp + c), _mm256_loadu_ps(bp + c)));
    }
  }
  return y;
}

// x (M, n * hd) in place, half-split RoPE per head: x * cos + cat(-x2, x1) * sin; cos, sin (M, hd).
void rope(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, int64_t n, int64_t hd) {
  const int64_t M = x.size(0), h2 = hd / 2;
  float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float *c = cos.data_ptr<float>() + m * hd, *s = sin.data_ptr<float>() + m * hd;
    for (int64_t h = 0; h < n; ++h) {
      float* r = xp + (m * n + h) * hd;
      for (int64_t i = 0; i < h2; ++i) {
        const float x1 = r[i], x2 = r[i + h2];
        r[i] = x1 * c[i] - x2 * s[i];
        r[i + h2] = x2 * c[i + h2] + x1 * s[i + h2];
      }
    }
  }
}

// gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh(u) = 1 - 2 / (e^2u + 1); in place.
void gelu_tanh(torch::Tensor& x) {
  float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  const __m256 k0 = _mm256_set1_ps(0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f);
  const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(p + i);
    const __m256 u = _mm256_mul_ps(k0, _mm256_fmadd_ps(_mm256_mul_ps(k1, v), _mm256_mul_ps(v, v), v));
    const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_add_ps(u, u)), one)));
    _mm256_storeu_ps(p + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t)));
  }
  for (; i < n; ++i) p[i] = 0.5f * p[i] * (1.0f + std::tanh(0.7978845608028654f * (p[i] + 0.044715f * p[i] * p[i] * p[i])));
}

// Dot products of q with 8 key rows k[0..7] (hd floats each), in one vector: each over d ascending
// in 8 lanes (d mod 8), the lanes then summed by one fixed hadd tree. 8 independent FMA chains: a
// dot at a time was latency-bound and made attention over 4k keys cost 1 ms per layer.
inline __m256 dot8(const float* q, const float* k, int64_t hd) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i * hd + d), a[i]);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// out (C * 8 floats) += sum_{j in [j0, j1)} p[j] v[j] (rows of hd floats), j ascending; the
// accumulators stay in registers over a block of keys.
template <int C>
inline void pv_block(const float* p, const float* vc, int64_t j0, int64_t j1, int64_t hd, float* out) {
  __m256 acc[C];
  for (int c = 0; c < C; ++c) acc[c] = _mm256_loadu_ps(out + 8 * c);
  for (int64_t j = j0; j < j1; ++j) {
    if (p[j] == 0.0f) continue;  // masked: adds an exact zero
    const __m256 pj = _mm256_set1_ps(p[j]);
    for (int c = 0; c < C; ++c) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vc + j * hd + 8 * c), acc[c]);
  }
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
}

constexpr int64_t KB = 64;  // keys per block of P @ V: 64 value rows (32 KB at hd 128) stay in L1/L2

// The rep query heads of one KV head over keys [0, n) of one cache row: out (rep, hd) =
// softmax(q . k_j * scale, masked) @ v. Each key and value row is read once for all rep queries
// (at 4k keys a KV head's K and V are 4 MB: reading them per query head made attention cost more
// than SDPA). scores: scratch (rep, n rounded up to 8). Every key's score is computed the same way
// wherever it falls (the last partial block of 8 keys goes through a zero-padded copy), and every
// sum runs j ascending (the softmax denominator in 8 lanes by j mod 8) with masked keys as exact
// zeros, so keys past the last unmasked one never change the result.
void attend_group(const float* q, const float* kc, const float* vc, const bool* mask, int64_t n, int64_t hd,
                  int64_t rep, float scale, float* scores, float* out) {
  const int64_t n8 = (n + 7) / 8 * 8;
  std::vector<float> tail;
  // blocks of 8 keys that are all masked (slots that another row's longer sequence used, or that
  // left the window) get no dot products and no exps: their probabilities are exact zeros
  std::vector<char> live(n8 / 8, 0);
  for (int64_t j0 = 0; j0 < n8; j0 += 8) {
    for (int64_t j = j0; j < std::min(n, j0 + 8); ++j) live[j0 / 8] |= mask[j];
    if (!live[j0 / 8]) continue;
    const float* k = kc + j0 * hd;
    if (j0 + 8 > n) {  // rows past n may lie outside the cache: copy the live ones, zero the rest
      tail.assign(8 * hd, 0.0f);
      std::copy_n(k, (n - j0) * hd, tail.data());
      k = tail.data();
    }
    for (int64_t r = 0; r < rep; ++r) {
      float* sr = scores + r * n8 + j0;
      _mm256_storeu_ps(sr, _mm256_mul_ps(dot8(q + r * hd, k, hd), _mm256_set1_ps(scale)));
      for (int64_t j = j0; j < j0 + 8; ++j)
        if (j >= n || !mask[j]) sr[j - j0] = -INFINITY;
    }
  }
  for (int64_t r = 0; r < rep; ++r) {
    float* sr = scores + r * n8;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n8; ++j)
      if (live[j / 8]) mx = std::max(mx, sr[j]);
    const __m256 mxv = _mm256_set1_ps(mx);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < n8; j += 8) {
      if (!live[j / 8]) {
        _mm256_storeu_ps(sr + j, _mm256_setzero_ps());
        continue;
      }
      const __m256 s = _mm256_loadu_ps(sr + j);
      const __m256 on = _mm256_cmp_ps(s, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ);
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(s, mxv)), on);
      _mm256_storeu_ps(sr + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum(sum));
    for (int64_t j = 0; j < n8; j += 8)
      if (live[j / 8]) _mm256_storeu_ps(sr + j, _mm256_mul_ps(_mm256_loadu_ps(sr + j), inv));
  }
  // out_r = sum_j p_rj v_j, j ascending for every (r, d), a block of KB value rows at a time
  std::fill_n(out, rep * hd, 0.0f);
  for (int64_t j0 = 0; j0 < n; j0 += KB) {
    const int64_t j1 = std::min(n, j0 + KB);
    for (int64_t r = 0; r < rep; ++r)
      for (int64_t d = 0; d < hd; d += (hd % 64 == 0 ? 64 : 16)) {
        if (hd % 64 == 0) pv_block<8>(scores + r * n8, vc + d, j0, j1, hd, out + r * hd + d);
        else pv_block<2>(scores + r * n8, vc + d, j0, j1, hd, out + r * hd + d);
      }
  }
}

void add_(torch::Tensor& x, const torch::Tensor& y) {
  float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) xp[i] += yp[i];
}

class Decoder {
 public:
  Decoder(int64_t n_head, int64_t n_kv_head, int64_t head_dim, double eps)
      : nh_(n_head), nkv_(n_kv_head), hd_(head_dim), eps_((float)eps) {
    TORCH_CHECK(head_dim % 16 == 0 && n_head % n_kv_head == 0, "head_dim must be a multiple of 16");
  }

  void add_block(torch::Tensor ln1_w, torch::Tensor ln1_b, torch::Tensor ln2_w, torch::Tensor ln2_b,
                 Linear q, Linear k, Linear v, Linear o, Linear fc, Linear proj) {
    for (auto* t : {&ln1_w, &ln1_b, &ln2_w, &ln2_b})
      TORCH_CHECK(t->scalar_type() == torch::kFloat && t->is_contiguous() && t->size(0) % 8 == 0,
                  "layer norm parameters must be contiguous fp32, a multiple of 8 long");
    blocks_.push_back({ln1_w, ln1_b, ln2_w, ln2_b, q, k, v, o, fc, proj});
  }

  // x (M, C) fp32: embedded tokens; kc, vc (L, B_all, nkv, S, hd) fp32 caches; rows, slots, n_keys
  // (M,) int64: the cache row and slot each token writes, and how many slots it attends over;
  // mask (M, >= max n_keys) bool; cos, sin (M, hd). Returns the last block's output (M, C).
  torch::Tensor forward(torch::Tensor x, torch::Tensor kc, torch::Tensor vc, torch::Tensor rows, torch::Tensor slots,
                        torch::Tensor n_keys, torch::Tensor mask, torch::Tensor cos, torch::Tensor sin) const {
    const int64_t M = x.size(0);
    TORCH_CHECK(x.scalar_type() == torch::kFloat && kc.scalar_type() == torch::kFloat &&
                    vc.scalar_type() == torch::kFloat && kc.is_contiguous() && vc.is_contiguous(),
                "fused decode runs on fp32 activations and caches");
    TORCH_CHECK(kc.size(0) == (int64_t)blocks_.size() && kc.size(2) == nkv_ && kc.size(4) == hd_, "cache shape");
    TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.is_contiguous() && mask.size(0) == M, "mask (M, n)");
    const int64_t S = kc.size(3), nmax = mask.size(1);
    rows = rows.to(torch::kLong).contiguous(), slots = slots.to(torch::kLong).contiguous();
    n_keys = n_keys.to(torch::kLong).contiguous();
    TORCH_CHECK(rows.numel() == M && slots.numel() == M && n_keys.numel() == M, "rows, slots, n_keys (M,)");
    const int64_t *rp = rows.data_ptr<int64_t>(), *sp = slots.data_ptr<int64_t>(), *np = n_keys.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m)
      TORCH_CHECK(rp[m] >= 0 && rp[m] < kc.size(1) && sp[m] >= 0 && sp[m] < S && np[m] > 0 && np[m] <= nmax &&
                      np[m] <= S, "token ", m, ": cache row, slot or key count out of range");
    x = x.contiguous().clone();
    cos = cos.to(torch::kFloat).contiguous(), sin = sin.to(torch::kFloat).contiguous();
    const int64_t row_stride = nkv_ * S * hd_, layer_stride = kc.size(1) * row_stride;
    const int64_t rep = nh_ / nkv_;
    const float scale = 1.0f / std::sqrt((float)hd_);
    auto attn = torch::empty({M, nh_ * hd_}, x.options());
    auto scratch = torch::empty({at::get_num_threads(), rep * ((nmax + 7) / 8 * 8)}, x.options());
    for (size_t l = 0; l < blocks_.size(); ++l) {
      const Block& b = blocks_[l];
      auto h = layer_norm(x, b.ln1_w, b.ln1_b, eps_);
      auto q = b.q(h), k = b.k(h), v = b.v(h);  // (M, nh*hd), (M, nkv*hd) x2
      rope(q, cos, sin, nh_, hd_);
      rope(k, cos, sin, nkv_, hd_);
      float* kl = kc.data_ptr<float>() + l * layer_stride;
      float* vl = vc.data_ptr<float>() + l * layer_stride;
      for (int64_t m = 0; m < M; ++m) {
        float *kr = kl + rp[m] * row_stride, *vr = vl + rp[m] * row_stride;
        for (int64_t g = 0; g < nkv_; ++g) {
          std::copy_n(k.data_ptr<float>() + (m * nkv_ + g) * hd_, hd_, kr + (g * S + sp[m]) * hd_);
          std::copy_n(v.data_ptr<float>() + (m * nkv_ + g) * hd_, hd_, vr + (g * S + sp[m]) * hd_);
        }
        const float* qm = q.data_ptr<float>() + m * nh_ * hd_;
        float* om = attn.data_ptr<float>() + m * nh_ * hd_;
        const bool* mk = mask.data_ptr<bool>() + m * nmax;
        at::parallel_for(0, nkv_, 1, [&](int64_t g0, int64_t g1) {
          float* sc = scratch.data_ptr<float>() + at::get_thread_num() * scratch.size(1);
          for (int64_t g = g0; g < g1; ++g)  // query heads g*rep .. (g+1)*rep-1 share KV head g
            attend_group(qm + g * rep * hd_, kr + g * S * hd_, vr + g * S * hd_, mk, np[m], hd_, rep, scale, sc,
                         om + g * rep * hd_);
        });
      }
      add_(x, b.o(attn));
      auto f = b.fc(layer_norm(x, b.ln2_w, b.ln2_b, eps_));
      gelu_tanh(f);
      add_(x, b.proj(f));
    }
    return x;
  }

 private:
  int64_t nh_, nkv_, hd_;
  float eps_;
  std::vector<Block> blocks_;
};

}  // namespace

void register_decode(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Linear>(m, "DecodeLinear")
      .def(py::init([](int64_t mode, torch::Tensor w, c10::optional<torch::Tensor> scale,
                       c10::optional<torch::Tensor> lo, c10::optional<torch::Tensor> in_scale,
                       c10::optional<torch::Tensor> bias, int64_t group_size) {
             TORCH_CHECK(mode >= 0 && mode <= 2 && (mode == 0 || scale) && (mode != 2 || lo), "bad linear spec");
             return Linear{mode, w, scale, lo, in_scale, bias, group_size};
           }),
           py::arg("mode"), py::arg("w"), py::arg("scale"), py::arg("lo"), py::arg("in_scale"), py::arg("bias"),
           py::arg("group_size"));
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, int64_t, int64_t, double>())
      .def("add_block", &Decoder::add_block)
      .def("forward", &Decoder::forward, py::call_guard<py::gil_scoped_release>());
}
