// What the two AVX2 sources share: the products of cpu_linear_avx2.cpp, which the fused decoder of
// cpu_decode_avx2.cpp calls, that file's bindings, and the horizontal sum both use.
#pragma once
#include <torch/extension.h>
#include <immintrin.h>

torch::Tensor linear_float(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale, c10::optional<torch::Tensor> bias);
torch::Tensor linear_int4(torch::Tensor x, torch::Tensor w, torch::Tensor scale, torch::Tensor lo, int64_t G,
                          c10::optional<torch::Tensor> bias);
void register_decode(pybind11::module& m);

// the sum of 8 floats, in a fixed order
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
