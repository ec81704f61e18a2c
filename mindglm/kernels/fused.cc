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

#include "layer.h"

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

void SwiGLURows(const float* x, int64_t rows, int64_t width, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* gate = x + r * 2 * width;
    const float* up = gate + width;
    float* yr = y + r * width;
    for (int64_t i = 0; i < width; ++i) yr[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
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
