// The SIMD level every kernel file of the library is compiled for, and the helpers they share.
// MG_AVX2: AVX2 + FMA + F16C (build.py passes -march=native only when the CPU has all three);
// MG_AVX512: AVX-512F on top (the int4 kernel's nibble lookup). Without them, scalar loops.
#pragma once

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MG_AVX2 1
#if defined(__AVX512F__)
#define MG_AVX512 1
#endif
#endif

namespace mindglm {

#ifdef MG_AVX2
// The sum of a vector's eight floats.
inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

}  // namespace mindglm
