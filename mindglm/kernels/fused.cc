// Element-wise steps of a layer fused into one call each, for MindSpore's CPU backend
// (ops.Custom, func_type="aot"). In a decode step every MindSpore op costs 5-8 us of runtime
// work whatever its size, and an RMSNorm is five ops, the SwiGLU activation five more (two
// slices, sigmoid, two products); each becomes one call here (mindglm/fused.py). float32.
//
//   MindglmRmsNorm(x [rows, H], w [H], eps [1]) -> y [rows, H]:  y = x * rsqrt(mean(x^2) + eps) * w
//   MindglmSwiGLU(x [rows, 2F]) -> y [rows, F]:  y = silu(x[:, :F]) * x[:, F:]
//
// The sum of squares accumulates in double; MindSpore's ReduceMean sums in float32 (the two
// differ by ~1e-7 relative).
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "layer.h"
#include "simd.h"

namespace mindglm {

void RmsNormRows(const float* x, const float* w, float eps, int64_t rows, int64_t hidden, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * hidden;
    float* yr = y + r * hidden;
    double sum = 0.0;
    for (int64_t i = 0; i < hidden; ++i) sum += double(xr[i]) * double(xr[i]);
    const float inv = 1.0f / std::sqrt(float(sum / double(hidden)) + eps);
    for (int64_t i = 0; i < hidden; ++i) yr[i] = w[i] * (xr[i] * inv);
  }
}

#ifdef MG_AVX2
namespace {
// exp of eight floats as Cephes' expf computes it: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two
// parts), exp(r) by its degree-7 polynomial, 2^n into the exponent bits; within 2 ulp of
// std::exp. x is clamped to [-87.3, 88.37], where 2^n stays a normal float: exp(-87.3) is already
// below float32's resolution next to 1, and exp(88.37) as good as infinity in 1 + exp(-gate).
inline __m256 Exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.37f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
}  // namespace
#endif

void SwiGLURows(const float* x, int64_t rows, int64_t width, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = x + r * 2 * width;
    const float* up = gate + width;
    float* yr = y + r * width;
    int64_t i = 0;
#ifdef MG_AVX2
    // 2816 std::exp calls took 34 us a `small` layer (0.27 ms a decode token over 8 layers); this 3.
    for (; i + 8 <= width; i += 8) {
      const __m256 g = _mm256_loadu_ps(gate + i);
      const __m256 e = Exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
      _mm256_storeu_ps(yr + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < width; ++i) yr[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

int ReadNorm(void** params, int* ndims, int64_t** shapes, int i, int64_t hidden, const float** weight, float* eps) {
  if (ndims[i] != 1 || ndims[i + 1] != 1) return 1;
  if (shapes[i][0] != hidden || shapes[i + 1][0] != 1) return 2;
  *weight = static_cast<const float*>(params[i]);
  *eps = *static_cast<const float*>(params[i + 1]);
  return 0;
}

}  // namespace mindglm

extern "C" {
int MindglmRmsNorm(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  if (nparam != 4 || ndims[0] != 2 || ndims[3] != 2) return 1;
  const int64_t rows = shapes[0][0], hidden = shapes[0][1];
  const float* weight;
  float eps;
  if (int status = mindglm::ReadNorm(params, ndims, shapes, 1, hidden, &weight, &eps)) return status;
  if (shapes[3][0] != rows || shapes[3][1] != hidden) return 2;
  mindglm::RmsNormRows(static_cast<const float*>(params[0]), weight, eps, rows, hidden, static_cast<float*>(params[3]));
  return 0;
}

int MindglmSwiGLU(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  if (nparam != 2 || ndims[0] != 2 || ndims[1] != 2) return 1;
  const int64_t rows = shapes[0][0], width = shapes[1][1];
  if (shapes[0][1] != 2 * width || shapes[1][0] != rows) return 2;
  mindglm::SwiGLURows(static_cast<const float*>(params[0]), rows, width, static_cast<float*>(params[1]));
  return 0;
}
}
