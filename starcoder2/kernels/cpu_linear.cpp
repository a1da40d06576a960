// Skinny matrix products for decode on AVX-512 CPUs: y (M, N) = x (M, K) @ W (N, K)^T + b, M small.
//
// Decode reads every weight once per step, so its speed is memory bandwidth. torch's batch-1 bf16
// GEMV reaches ~14 GB/s of the ~34 GB/s these machines have; these loops stream the weights row
// block by row block, keep x in L1, and reach most of the bandwidth.
//
//   bf16:  W bf16, AVX512_BF16 dot products (vdpbf16ps), fp32 accumulation.
//   int8:  W int8 with one fp32 scale per output row; weights widened to fp32 in registers.
//   int4:  W 4-bit, asymmetric per group of G input columns (w = q * scale + lo); within each block
//          of 32 columns, byte j holds column j (low nibble) and column j + 16 (high nibble).
//
// Work is split over output rows with at::parallel_for (torch's thread pool and thread count).
// Requires K % 32 == 0 (and G % 32 == 0); the Python side checks and falls back to torch otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace {

constexpr int R = 4;  // output rows per block

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// x (M, K) bf16 -> fp32 copy, so the int kernels can FMA against it.
torch::Tensor to_f32(const torch::Tensor& x) { return x.to(torch::kFloat).contiguous(); }

template <int MB>
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

template <int MB>
void int8_block(const float* x, const int8_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t m0) {
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[R];
    for (int r = 0; r < R; ++r)
      wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + (n0 + r) * K + k))));
    for (int m = 0; m < MB; ++m) {
      __m512 xv = _mm512_loadu_ps(x + (m0 + m) * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[(m0 + m) * N + n0 + r] = hsum(acc[m][r]);
}

// One output row block of int4: per group, accumulate q * x, then scale; the `lo` term is added
// by the caller from per-group sums of x.
template <int MB>
void int4_block(const float* x, const uint8_t* w, const float* scale, float* y, int64_t K, int64_t N,
                int64_t G, int64_t n0, int64_t m0) {
  const int64_t ng = K / G;
  const __m512i mask = _mm512_set1_epi32(0xF);
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m512 gacc[MB][R];
    for (int m = 0; m < MB; ++m)
      for (int r = 0; r < R; ++r) gacc[m][r] = _mm512_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
      for (int r = 0; r < R; ++r) {
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + (n0 + r) * (K / 2) + k / 2)));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, mask));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
        for (int m = 0; m < MB; ++m) {
          const float* xm = x + (m0 + m) * K + k;
          gacc[m][r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xm), gacc[m][r]);
          gacc[m][r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xm + 16), gacc[m][r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      __m512 s = _mm512_set1_ps(scale[(n0 + r) * ng + g]);
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm512_fmadd_ps(gacc[m][r], s, acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) y[(m0 + m) * N + n0 + r] = hsum(acc[m][r]);
}

// Run `block<MB>` over all row blocks and M in chunks of 4 (or fewer at the end).
template <typename F>
void for_blocks(int64_t M, int64_t N, F&& f) {
  at::parallel_for(0, N / R, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m0 = 0; m0 < M; m0 += 4) f(b * R, m0, std::min<int64_t>(4, M - m0));
  });
}

void check(const torch::Tensor& x, const torch::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.is_contiguous(), "x must be (M, K) contiguous");
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  TORCH_CHECK(w.size(0) % R == 0, "N must be a multiple of 4");
}

torch::Tensor finish(torch::Tensor y, const c10::optional<torch::Tensor>& bias, c10::ScalarType dtype) {
  if (bias.has_value()) y.add_(bias->to(torch::kFloat));
  return y.to(dtype);
}

}  // namespace

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check(x, w, K);
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16, "bf16 only");
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  auto xp = (const uint16_t*)x.data_ptr(), wp = (const uint16_t*)w.data_ptr();
  float* yp = y.data_ptr<float>();
  for_blocks(M, N, [&](int64_t n0, int64_t m0, int64_t mb) {
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
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == torch::kChar, "int8 weights");
  auto xf = to_f32(x);
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  for_blocks(M, N, [&](int64_t n0, int64_t m0, int64_t mb) {
    switch (mb) {
      case 4: int8_block<4>(xp, wp, yp, K, N, n0, m0); break;
      case 3: int8_block<3>(xp, wp, yp, K, N, n0, m0); break;
      case 2: int8_block<2>(xp, wp, yp, K, N, n0, m0); break;
      default: int8_block<1>(xp, wp, yp, K, N, n0, m0);
    }
  });
  y.mul_(scale.to(torch::kFloat));
  return finish(y, bias, x.scalar_type());
}

torch::Tensor linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor lo,
                          int64_t G, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check(x, w, K);
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.size(1) * 2 == K, "packed uint8 weights (N, K/2)");
  TORCH_CHECK(G % 32 == 0 && K % G == 0, "group size must be a multiple of 32 dividing K");
  auto xf = to_f32(x);
  auto sf = scale.to(torch::kFloat).contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(torch::kFloat));
  const float* xp = xf.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = sf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_blocks(M, N, [&](int64_t n0, int64_t m0, int64_t mb) {
    switch (mb) {
      case 4: int4_block<4>(xp, wp, sp, yp, K, N, G, n0, m0); break;
      case 3: int4_block<3>(xp, wp, sp, yp, K, N, G, n0, m0); break;
      case 2: int4_block<2>(xp, wp, sp, yp, K, N, G, n0, m0); break;
      default: int4_block<1>(xp, wp, sp, yp, K, N, G, n0, m0);
    }
  });
  // + sum_g lo[n, g] * sum_{k in g} x[m, k]: a small (M, K/G) @ (K/G, N) product.
  auto xsum = xf.view({M, K / G, G}).sum(-1);
  y.addmm_(xsum, lo.to(torch::kFloat).t());
  return finish(y, bias, x.scalar_type());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "y = x @ w.T + b, bf16 weights (AVX512_BF16)");
  m.def("linear_int8", &linear_int8, "y = (x @ q.T) * scale + b, int8 weights");
  m.def("linear_int4", &linear_int4, "y = x @ (q * scale + lo).T + b, 4-bit group-wise weights");
}
