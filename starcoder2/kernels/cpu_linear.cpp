// Skinny matrix products for decode on AVX-512 CPUs: y (M, N) = x (M, K) @ W (N, K)^T + b, M small.
//
// Decode reads every weight once per step, so its speed is memory bandwidth. torch's batch-1 bf16
// GEMV reaches ~14 GB/s of the ~34 GB/s these machines have; these loops stream the weights row
// block by row block, keep x in L1, and reach most of the bandwidth.
//
//   bf16:  W bf16, AVX512_BF16 dot products (vdpbf16ps), fp32 accumulation.
//   int8:  W int8 with one fp32 scale per output row, stored offset by +128 as uint8.
//   int4:  W 4-bit, asymmetric per group of G input columns (w = q * scale + lo); within each block
//          of 64 columns, byte j holds column j (low nibble) and column j + 32 (high nibble).
//
// The int kernels quantize x on the fly to int8 with one scale per block of XB columns (as
// llama.cpp's Q8 activations do) and use AVX512_VNNI (vpdpbusd: 64 u8 x s8 products per
// instruction), so dequantization costs a few instructions per block, not per weight:
//   int8: sum_k (w+128) xq = sum_k w xq + 128 sum_k xq, the second term removed once per row of x;
//   int4: y = sum_g scale[n,g] xs[g] sum_{k in g} q xq + sum_g lo[n,g] xs[g] sum_{k in g} xq.
//
// Work is split over output rows with at::parallel_for (torch's thread pool and thread count).
// Requires K % 32 == 0 (bf16) or K % 64 == 0 and G % 64 == 0 (int); the Python side checks and falls
// back to torch otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

// Output rows per block. bf16: 8 weight streams per thread keep more loads in flight (21 -> ~27 GB/s
// measured over the 3B layer sizes); int: 4, since 8 would spill the accumulators to the stack.
constexpr int R_BF16 = 8, R_INT = 4;

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

template <int MB, int R = R_BF16>
void bf16_block(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t m0) {
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_loadu_si512(w + (n0 + r) * K + k);
    for (int m = 0; m < MB; ++m) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + m) * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[(m0 + m) * N + n0 + r] = hsum(acc[m][r]);
}

// x (M, K) fp32 -> xq (M, K) int8 and, per block of XB columns, scale xs and xs * sum(xq).
struct QuantX {
  torch::Tensor q, scale, sum;
};

QuantX quantize_x(const torch::Tensor& x, int64_t XB) {
  const int64_t M = x.size(0), K = x.size(1), nb = K / XB;
  auto xf = x.to(torch::kFloat).contiguous();
  QuantX out{torch::empty({M, K}, x.options().dtype(torch::kChar)),
             torch::empty({M, nb}, x.options().dtype(torch::kFloat)),
             torch::empty({M, nb}, x.options().dtype(torch::kFloat))};
  const float* xp = xf.data_ptr<float>();
  int8_t* qp = out.q.data_ptr<int8_t>();
  float *sp = out.scale.data_ptr<float>(), *up = out.sum.data_ptr<float>();
  for (int64_t b = 0; b < M * nb; ++b) {
    const float* v = xp + b * XB;
    float amax = 0.f;
    for (int64_t i = 0; i < XB; ++i) amax = std::max(amax, std::fabs(v[i]));
    const float scale = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / scale;
    int32_t sum = 0;
    for (int64_t i = 0; i < XB; ++i) {
      const int32_t q = (int32_t)std::nearbyint(v[i] * inv);
      qp[b * XB + i] = (int8_t)q;
      sum += q;
    }
    sp[b] = scale;
    up[b] = scale * (float)sum;
  }
  return out;
}

// int8 (stored +128 as uint8), one x block of 64 columns per vpdpbusd.
template <int MB, int R = R_INT>
void int8_block(const int8_t* xq, const float* xs, const uint8_t* w, float* y, int64_t K, int64_t N,
                int64_t n0, int64_t m0) {
  const int64_t nb = K / 64;
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w + (n0 + r) * K + b * 64);
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = _mm512_loadu_si512(xq + (m0 + m) * K + b * 64);
      const __m512 s = _mm512_set1_ps(xs[(m0 + m) * nb + b]);
      for (int r = 0; r < R; ++r) {
        __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[r], xv);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[(m0 + m) * N + n0 + r] = hsum(acc[m][r]);
}

// 64 packed 4-bit weights (32 bytes) -> 64 uint8 in column order.
inline __m512i unpack64(const uint8_t* p) {
  const __m256i b = _mm256_loadu_si256((const __m256i*)p);
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

// int4, one x block per weight group G: the group's int32 dot product is scaled once.
template <int MB, int R = R_INT>
void int4_block(const int8_t* xq, const float* xs, const uint8_t* w, const float* scale, float* y,
                int64_t K, int64_t N, int64_t G, int64_t n0, int64_t m0) {
  const int64_t ng = K / G;
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512i d[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) d[m][r] = _mm512_setzero_si512();
    for (int64_t k = g * G; k < (g + 1) * G; k += 64) {
      __m512i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = unpack64(w + (n0 + r) * (K / 2) + k / 2);
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_loadu_si512(xq + (m0 + m) * K + k);
        for (int r = 0; r < R; ++r) d[m][r] = _mm512_dpbusd_epi32(d[m][r], wv[r], xv);
      }
    }
    for (int m = 0; m < MB; ++m) {
      const float sx = xs[(m0 + m) * ng + g];
      for (int r = 0; r < R; ++r)
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[m][r]), _mm512_set1_ps(sx * scale[(n0 + r) * ng + g]),
                                    acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[(m0 + m) * N + n0 + r] = hsum(acc[m][r]);
}

// Run `block<MB>` over all row blocks and M in chunks of 4 (or fewer at the end).
template <int R, typename F>
void for_blocks(int64_t M, int64_t N, F&& f) {
  at::parallel_for(0, N / R, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m0 = 0; m0 < M; m0 += 4) f(b * R, m0, std::min<int64_t>(4, M - m0));
  });
}

void check(const torch::Tensor& x, const torch::Tensor& w, int64_t K, int R) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "x must be (M, K) contiguous");
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  TORCH_CHECK(w.size(0) % R == 0, "N must be a multiple of ", R);
}

torch::Tensor finish(torch::Tensor y, const c10::optional<torch::Tensor>& bias, c10::ScalarType dtype) {
  if (bias.has_value()) y.add_(bias->to(torch::kFloat));
  return y.to(dtype);
}

}  // namespace

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check(x, w, K, R_BF16);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16, "bf16 only");
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  auto xp = (const uint16_t*)x.data_ptr(), wp = (const uint16_t*)w.data_ptr();
  float* yp = y.data_ptr<float>();
  for_blocks<R_BF16>(M, N, [&](int64_t n0, int64_t m0, int64_t mb) {
    switch (mb) {
      case 4: bf16_block<4>(xp, wp, yp, K, N, n0, m0); break;
      case 3: bf16_block<3>(xp, wp, yp, K, N, n0, m0); break;
      case 2: bf16_block<2>(xp, wp, yp, K, N, n0, m0); break;
      default: bf16_block<1>(xp, wp, yp, K, N, n0, m0);
    }
  });
  return finish(y, bias, x.scalar_type());
}

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check(x, w, K, R_INT);
  TORCH_CHECK(w.scalar_type() == torch::kByte && K % 64 == 0, "uint8 (int8 + 128) weights, K % 64 == 0");
  auto xq = quantize_x(x, 64);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const int8_t* qp = xq.q.data_ptr<int8_t>();
  const float* sp = xq.scale.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  for_blocks<R_INT>(M, N, [&](int64_t n0, int64_t m0, int64_t mb) {
    switch (mb) {
      case 4: int8_block<4>(qp, sp, wp, yp, K, N, n0, m0); break;
      case 3: int8_block<3>(qp, sp, wp, yp, K, N, n0, m0); break;
      case 2: int8_block<2>(qp, sp, wp, yp, K, N, n0, m0); break;
      default: int8_block<1>(qp, sp, wp, yp, K, N, n0, m0);
    }
  });
  // remove the +128 offset: 128 * sum_b xs[b] * sum_{k in b} xq[k], one value per row of x
  y.sub_(xq.sum.sum(1, /*keepdim=*/true) * 128.0);
  y.mul_(scale.to(torch::kFloat));
  return finish(y, bias, x.scalar_type());
}

torch::Tensor linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor lo,
                          int64_t G, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check(x, w, K, R_INT);
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.size(1) * 2 == K, "packed uint8 weights (N, K/2)");
  TORCH_CHECK(G % 64 == 0 && K % G == 0, "group size must be a multiple of 64 dividing K");
  auto xq = quantize_x(x, G);
  auto sf = scale.to(torch::kFloat).contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const int8_t* qp = xq.q.data_ptr<int8_t>();
  const float* xsp = xq.scale.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = sf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_blocks<R_INT>(M, N, [&](int64_t n0, int64_t m0, int64_t mb) {
    switch (mb) {
      case 4: int4_block<4>(qp, xsp, wp, sp, yp, K, N, G, n0, m0); break;
      case 3: int4_block<3>(qp, xsp, wp, sp, yp, K, N, G, n0, m0); break;
      case 2: int4_block<2>(qp, xsp, wp, sp, yp, K, N, G, n0, m0); break;
      default: int4_block<1>(qp, xsp, wp, sp, yp, K, N, G, n0, m0);
    }
  });
  // + sum_g lo[n, g] * (xs[g] * sum_{k in g} xq[k]): a small (M, K/G) @ (K/G, N) product.
  y.addmm_(xq.sum, lo.to(torch::kFloat).t());
  return finish(y, bias, x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "y = x @ w.T + b, bf16 weights (AVX512_BF16)");
  m.def("linear_int8", &linear_int8, "y = (x @ q.T) * scale + b, int8 weights");
  m.def("linear_int4", &linear_int4, "y = x @ (q * scale + lo).T + b, 4-bit group-wise weights");
}
