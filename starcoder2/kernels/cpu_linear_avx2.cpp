// Skinny matrix products for decode on AVX2 CPUs (no AVX-512): y (M, N) = x (M, K) @ W (N, K)^T + b.
//
// The AVX2 twin of cpu_linear.cpp, for the many x86 machines without AVX-512 (e.g. AMD Zen 2/3),
// reading the same weight layouts, so one pre-quantized checkpoint serves both:
//
//   f32:   W fp32, x fp32, FMA.
//   bf16:  W bf16 widened to fp32 in registers (a shift), x fp32: half the bytes of fp32 weights.
//   int8:  W int8 stored +128 as uint8, one fp32 scale per output row.
//   int4:  W 4-bit, w = q * scale + lo per group of G input columns; within each block of 64
//          columns byte j holds column j (low nibble) and column j + 32 (high nibble).
//
// The int kernels quantize x to int8 (|q| <= 127) per block (int8: 32 columns, int4: one group) as
// llama.cpp's Q8 activations do, and multiply bytes with vpmaddubsw (unsigned x signed -> int16 pairs):
//   int8: |x| as the unsigned operand and w carrying x's sign (vpsignb), so pairs stay below
//         2 * 127 * 127 = 32258 and never saturate; the +128 storage offset is removed by a xor.
//   int4: q in [0, 15] is the unsigned operand directly (pairs <= 3810);
//         y = sum_g scale[n,g] xs[g] sum_{k in g} q xq + sum_g lo[n,g] xs[g] sum_{k in g} xq.
//
// Every output y[m, n] accumulates over k in the same order whatever M is, so a row's result does
// not depend on how many rows are multiplied with it: a speculative verify pass (M = k + 1) gives
// bit-for-bit the logits of one-token decode.
//
// The int kernels prefetch the next row block while they work on this one: they spend more
// instructions per byte than the float loop, and without it each core kept too few misses in flight
// (int4 decode products went from ~16 to 21-27 GB/s over 2 cores on an AVX2 EPYC; int8 +5-10 %).
//
// Work is split over blocks of R output rows with at::parallel_for (torch's thread pool).
// Requires K % 32 == 0 (int8: K % 32 == 0, int4: G % 64 == 0 and K % G == 0) and N % R == 0; the
// Python side checks and falls back to torch otherwise.
#include "cpu_avx2.h"

#include <ATen/Parallel.h>

namespace {

constexpr int R = 4;   // output rows per block: 4 weight streams in flight per thread
constexpr int MB = 2;  // int kernels: rows of x per pass over a row block (8 accumulators + 4 weights)
constexpr int XB8 = 32;  // int8: columns per activation scale

// 8 weights as fp32
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 -> fp32: the bf16 bits are the high half of an fp32
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// Float weights (fp32 or bf16), x fp32: all M rows of x against rows n0..n0+R-1, in tiles of KT
// columns: a tile of w (R x KT) and of x (M x KT, <= 16 KB) stay in L1 while x's rows pass over it
// MBF at a time (12 independent FMA chains hide the FMA latency better than 8). At M = 8 a 12288 x
// 3072 fp32 product went from 1.53-1.65x to 1.29-1.5x the M = 1 time (~96 GFLOP/s on 2 cores).
// The accumulators wait in acc[] between tiles: each y[m, n] still sums k in increasing order in
// the same lanes, whatever M is.
constexpr int MMAX = 16;   // rows of x per call chunk (NATIVE_MAX_ROWS on the Python side)
constexpr int64_t KT = 256;
constexpr int MBF = 3;  // rows of x per pass: 12 accumulators + 4 weights fill the 16 ymm registers

template <int MBv, typename W>
inline void float_pass(const float* x, const W* w, __m256* acc, int64_t K, int64_t n0, int64_t m0,
                       int64_t k0, int64_t k1) {
  __m256 a[MBv][R];
  for (int m = 0; m < MBv; ++m)
    for (int r = 0; r < R; ++r) a[m][r] = acc[(m0 + m) * R + r];
  for (int64_t k = k0; k < k1; k += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load8(w + (n0 + r) * K + k);
    for (int m = 0; m < MBv; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + (m0 + m) * K + k);
      for (int r = 0; r < R; ++r) a[m][r] = _mm256_fmadd_ps(wv[r], xv, a[m][r]);
    }
  }
  for (int m = 0; m < MBv; ++m)
    for (int r = 0; r < R; ++r) acc[(m0 + m) * R + r] = a[m][r];
}

template <typename W>
void float_block(const float* x, const W* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t M) {
  __m256 acc[MMAX * R];
  for (int64_t c = 0; c < M; c += MMAX) {  // x's rows in chunks of MMAX (one chunk for decode sizes)
    const int64_t mc = std::min<int64_t>(MMAX, M - c);
    const float* xc = x + c * K;
    for (int64_t i = 0; i < mc * R; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += KT) {
      const int64_t k1 = std::min(K, k0 + KT);
      int64_t m0 = 0;
      for (; m0 + MBF <= mc; m0 += MBF) float_pass<MBF>(xc, w, acc, K, n0, m0, k0, k1);
      if (mc - m0 == 2) float_pass<2>(xc, w, acc, K, n0, m0, k0, k1);
      else if (mc - m0 == 1) float_pass<1>(xc, w, acc, K, n0, m0, k0, k1);
    }
    for (int64_t m = 0; m < mc; ++m)
      for (int r = 0; r < R; ++r) y[(c + m) * N + n0 + r] = hsum(acc[m * R + r]);
  }
}

// x (M, K) fp32 -> xq (M, K) int8, |xq| (M, K) uint8, and per block of XB columns: scale and
// scale * sum(xq).
struct QuantX {
  torch::Tensor q, a, scale, sum;
};

QuantX quantize_x(const torch::Tensor& xf, int64_t XB) {
  const int64_t M = xf.size(0), K = xf.size(1), nb = K / XB;
  auto opt = xf.options();
  QuantX out{torch::empty({M, K}, opt.dtype(torch::kChar)), torch::empty({M, K}, opt.dtype(torch::kByte)),
             torch::empty({M, nb}, opt.dtype(torch::kFloat)), torch::empty({M, nb}, opt.dtype(torch::kFloat))};
  const float* xp = xf.data_ptr<float>();
  int8_t* qp = out.q.data_ptr<int8_t>();
  uint8_t* ap = out.a.data_ptr<uint8_t>();
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
      ap[b * XB + i] = (uint8_t)std::abs(q);
      sum += q;
    }
    sp[b] = scale;
    up[b] = scale * (float)sum;
  }
  return out;
}

// 32 x 32 byte products summed to 8 int32 lanes: a unsigned, b signed.
inline __m256i dot32(__m256i a, __m256i b, __m256i ones16) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones16);
}

void int8_block(const QuantX& xq, const uint8_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t m0, int mb) {
  const int64_t nb = K / XB8;
  const int8_t* qp = xq.q.data_ptr<int8_t>();
  const uint8_t* ap = xq.a.data_ptr<uint8_t>();
  const float* sp = xq.scale.data_ptr<float>();
  const __m256i ones16 = _mm256_set1_epi16(1), offset = _mm256_set1_epi8((char)0x80);
  __m256 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    {  // the next row block (R * K contiguous bytes), two lines per 32 columns of this one
      const char* next = (const char*)(w + (n0 + R) * K) + b * XB8 * R;
      _mm_prefetch(next, _MM_HINT_T0);
      _mm_prefetch(next + 64, _MM_HINT_T0);
    }
    __m256i wv[R];  // signed weights q in [-127, 127]
    for (int r = 0; r < R; ++r)
      wv[r] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + (n0 + r) * K + b * XB8)), offset);
    for (int m = 0; m < MB; ++m) {
      if (m >= mb) break;
      const int64_t off = (m0 + m) * K + b * XB8;
      const __m256i xs = _mm256_loadu_si256((const __m256i*)(qp + off));
      const __m256i xa = _mm256_loadu_si256((const __m256i*)(ap + off));
      const __m256 s = _mm256_set1_ps(sp[(m0 + m) * nb + b]);
      for (int r = 0; r < R; ++r) {
        const __m256i d = dot32(xa, _mm256_sign_epi8(wv[r], xs), ones16);
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), s, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < mb; ++m)
    for (int r = 0; r < R; ++r) y[(m0 + m) * N + n0 + r] = hsum(acc[m][r]);
}

template <int MBv>
void int4_block(const QuantX& xq, const uint8_t* w, const float* scale, const float* lo_, float* y, int64_t K,
                int64_t N, int64_t G, int64_t n0, int64_t m0) {
  const int64_t ng = K / G;
  const int8_t* qp = xq.q.data_ptr<int8_t>();
  const float *sp = xq.scale.data_ptr<float>(), *up = xq.sum.data_ptr<float>();
  const __m256i ones16 = _mm256_set1_epi16(1), mask = _mm256_set1_epi8(0x0F);
  __m256 acc[MBv][R];  // touched once per group: may live in memory
  float lacc[MBv][R] = {};
  for (int m = 0; m < MBv; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    __m256i d[MBv][R];
    for (int m = 0; m < MBv; ++m)
      for (int r = 0; r < R; ++r) d[m][r] = _mm256_setzero_si256();
    // int16 sums over up to 4 blocks of 64 columns (each block's pairs add to <= 2 * 3810, four to
    // <= 30480 < 32768), widened to int32 once per 256 columns instead of once per 64
    for (int64_t k0 = g * G; k0 < (g + 1) * G; k0 += 256) {
      __m256i p16[MBv][R];
      for (int m = 0; m < MBv; ++m)
        for (int r = 0; r < R; ++r) p16[m][r] = _mm256_setzero_si256();
      for (int64_t k = k0; k < std::min<int64_t>(k0 + 256, (g + 1) * G); k += 64) {
        __m256i x0[MBv], x1[MBv];
        for (int m = 0; m < MBv; ++m) {
          x0[m] = _mm256_loadu_si256((const __m256i*)(qp + (m0 + m) * K + k));
          x1[m] = _mm256_loadu_si256((const __m256i*)(qp + (m0 + m) * K + k + 32));
        }
        {  // the next row block (R * K/2 contiguous bytes), two lines per 64 columns of this one
          const char* next = (const char*)(w + (n0 + R) * (K / 2)) + k * R / 2;
          _mm_prefetch(next, _MM_HINT_T0);
          _mm_prefetch(next + 64, _MM_HINT_T0);
        }
        for (int r = 0; r < R; ++r) {
          const __m256i b = _mm256_loadu_si256((const __m256i*)(w + (n0 + r) * (K / 2) + k / 2));
          const __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
          for (int m = 0; m < MBv; ++m)
            p16[m][r] = _mm256_add_epi16(p16[m][r], _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0[m]),
                                                                     _mm256_maddubs_epi16(hi, x1[m])));
        }
      }
      for (int m = 0; m < MBv; ++m)
        for (int r = 0; r < R; ++r) d[m][r] = _mm256_add_epi32(d[m][r], _mm256_madd_epi16(p16[m][r], ones16));
    }
    // y += scale[n,g] xs[g] sum_{k in g} q xq + lo[n,g] xs[g] sum_{k in g} xq, in the same order for every M
    for (int m = 0; m < MBv; ++m) {
      const float sx = sp[(m0 + m) * ng + g], ux = up[(m0 + m) * ng + g];
      for (int r = 0; r < R; ++r) {
        acc[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[m][r]), _mm256_set1_ps(sx * scale[(n0 + r) * ng + g]),
                                    acc[m][r]);
        lacc[m][r] = std::fma(lo_[(n0 + r) * ng + g], ux, lacc[m][r]);  // explicit: the same rounding in every build of the loop
      }
    }
  }
  for (int m = 0; m < MBv; ++m)
    for (int r = 0; r < R; ++r) y[(m0 + m) * N + n0 + r] = hsum(acc[m][r]) + lacc[m][r];
}

// Run f(n0) over all row blocks, in parallel.
template <typename F>
void for_row_blocks(int64_t N, F&& f) {
  at::parallel_for(0, N / R, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b * R);
  });
}

// Run f(n0, m0, mb) over all row blocks, x's rows in chunks of MB; a row block's weights stay in
// cache while every chunk of x passes over them.
template <typename F>
void for_blocks(int64_t M, int64_t N, F&& f) {
  for_row_blocks(N, [&](int64_t n0) {
    for (int64_t m0 = 0; m0 < M; m0 += MB) f(n0, m0, (int)std::min<int64_t>(MB, M - m0));
  });
}

torch::Tensor prepare(const torch::Tensor& x, const torch::Tensor& w, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.is_contiguous(), "x must be (M, K), w contiguous");
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  TORCH_CHECK(w.size(0) % R == 0, "N must be a multiple of ", R);
  return x.to(torch::kFloat).contiguous();
}

torch::Tensor finish(torch::Tensor y, const c10::optional<torch::Tensor>& bias, c10::ScalarType dtype) {
  if (bias.has_value()) y.add_(bias->to(torch::kFloat));
  return y.to(dtype);
}

}  // namespace

// y = x @ w.T + b for fp32 or bf16 w; x in any float dtype, computed in fp32, returned in x's dtype.
torch::Tensor linear_float(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xf = prepare(x, w, K);
  TORCH_CHECK(w.size(1) == K, "shape mismatch");
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (w.scalar_type() == torch::kFloat) {
    const float* wp = w.data_ptr<float>();
    for_row_blocks(N, [&](int64_t n0) { float_block(xp, wp, yp, K, N, n0, M); });
  } else {
    TORCH_CHECK(w.scalar_type() == torch::kBFloat16, "fp32 or bf16 weights");
    const uint16_t* wp = (const uint16_t*)w.data_ptr();
    for_row_blocks(N, [&](int64_t n0) { float_block(xp, wp, yp, K, N, n0, M); });
  }
  return finish(y, bias, x.scalar_type());
}

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xf = prepare(x, w, K);
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.size(1) == K, "uint8 (int8 + 128) weights (N, K)");
  auto xq = quantize_x(xf, XB8);
  auto y = torch::empty({M, N}, xf.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  for_blocks(M, N, [&](int64_t n0, int64_t m0, int mb) { int8_block(xq, wp, yp, K, N, n0, m0, mb); });
  y.mul_(scale.to(torch::kFloat));
  return finish(y, bias, x.scalar_type());
}

torch::Tensor linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor lo,
                          int64_t G, c10::optional<torch::Tensor> bias) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto xf = prepare(x, w, K);
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.size(1) * 2 == K, "packed uint8 weights (N, K/2)");
  TORCH_CHECK(G % 64 == 0 && K % G == 0, "group size must be a multiple of 64 dividing K");
  auto xq = quantize_x(xf, G);
  auto sf = scale.to(torch::kFloat).contiguous(), lf = lo.to(torch::kFloat).contiguous();
  auto y = torch::empty({M, N}, xf.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float *sp = sf.data_ptr<float>(), *lp = lf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for_blocks(M, N, [&](int64_t n0, int64_t m0, int mb) {
    if (mb == 2) int4_block<2>(xq, wp, sp, lp, yp, K, N, G, n0, m0);
    else int4_block<1>(xq, wp, sp, lp, yp, K, N, G, n0, m0);
  });
  return finish(y, bias, x.scalar_type());
}

// Prefill multiplies by GEMM, so the weights are dequantized first: one parallel pass that writes
// each float once (torch's elementwise to/sub/mul chain made three passes and three temporaries).
torch::Tensor dequantize_int8(torch::Tensor w, torch::Tensor scale, c10::ScalarType dtype) {
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.dim() == 2 && w.is_contiguous(), "uint8 (N, K) weights");
  const int64_t N = w.size(0), K = w.size(1);
  auto sf = scale.to(torch::kFloat).contiguous();
  auto out = torch::empty({N, K}, w.options().dtype(torch::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = sf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const float s = sp[n];
      for (int64_t k = 0; k < K; ++k) op[n * K + k] = ((float)wp[n * K + k] - 128.f) * s;
    }
  });
  return out.to(dtype);
}

torch::Tensor dequantize_int4(torch::Tensor w, torch::Tensor scale, torch::Tensor lo, int64_t G, c10::ScalarType dtype) {
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.dim() == 2 && w.is_contiguous(), "packed uint8 (N, K/2) weights");
  const int64_t N = w.size(0), K = w.size(1) * 2, ng = K / G;
  TORCH_CHECK(G % 64 == 0 && K % G == 0, "group size must be a multiple of 64 dividing K");
  auto sf = scale.to(torch::kFloat).contiguous(), lf = lo.to(torch::kFloat).contiguous();
  auto out = torch::empty({N, K}, w.options().dtype(torch::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float *sp = sf.data_ptr<float>(), *lp = lf.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t b = 0; b < K / 64; ++b) {  // block of 64 columns: byte j = column j | column j + 32 << 4
        const int64_t g = b * 64 / G;
        const float s = sp[n * ng + g], l = lp[n * ng + g];
        const uint8_t* src = wp + n * (K / 2) + b * 32;
        float* dst = op + n * K + b * 64;
        for (int j = 0; j < 32; ++j) {
          dst[j] = (float)(src[j] & 15) * s + l;
          dst[j + 32] = (float)(src[j] >> 4) * s + l;
        }
      }
  });
  return out.to(dtype);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dequantize_int8", &dequantize_int8, "(q + 128 as uint8, scale) -> float weights (N, K)");
  m.def("dequantize_int4", &dequantize_int4, "(packed 4-bit, scale, lo, G) -> float weights (N, K)");
  m.def("linear_float", &linear_float, "y = x @ w.T + b, fp32 or bf16 weights, fp32 arithmetic (AVX2/FMA)");
  m.def("linear_int8", &linear_int8, "y = (x @ q.T) * scale + b, int8 weights (AVX2)");
  m.def("linear_int4", &linear_int4, "y = x @ (q * scale + lo).T + b, 4-bit group-wise weights (AVX2)");
  register_decode(m);
}
