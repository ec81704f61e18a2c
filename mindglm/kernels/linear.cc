// Weight-only linear layers for MindSpore's CPU backend (ops.Custom, func_type="aot").
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]  (+ bias[n])
//
// x and y are float32; w is float32, float16, int8, or int4 packed two per byte along k
// (THUDM's layout: column 2j in the high nibble, 2j+1 in the low one). The weights are
// converted to float32 in registers inside the dot product and never written out dequantized:
// decode (one row of x) is bound by the bytes of w, so reading 1 or 0.5 byte per weight instead
// of 4 is the whole point. Accumulation is float32, scale and bias are applied once per output.
//
// Work is split over output rows, on the library's own thread pool (pool.h). Small matrices run
// on the calling thread alone.
//
// Every entry point has MindSpore's AOT signature; inputs are (x, w[, scale][, bias]), the last
// param is the output. Built by mindglm/kernels/build.py (g++, AVX2/FMA/F16C when present).
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "layer.h"
#include "pool.h"
#include "simd.h"

namespace {

#ifdef MG_AVX2
using mindglm::HSum;
#endif
using mindglm::pool;

// Below this many weight bytes a matrix is multiplied on the calling thread only: waking a
// second thread costs more than it saves.
int64_t ParallelBytes() {
  static const int64_t bytes = [] {
    const char* env = std::getenv("MINDGLM_KERNEL_PARALLEL_BYTES");
    return env ? std::atoll(env) : int64_t(256) * 1024;
  }();
  return bytes;
}

// ------------------------------------------------------------------------------- formats
float HalfToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int shift = 0;
    while (!(man & 0x400)) { man <<= 1; ++shift; }
    bits = sign | ((113 - shift) << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Each format reads weight row `row` (its `Stride()` elements of storage) against MB rows of x.
// `x` points at MB rows of `ldx` floats; int4 expects x already split into even and odd columns
// (first K/2 floats of a row: the even columns, next K/2: the odd ones).
struct F32 { using T = float; };
struct F16 { using T = uint16_t; };
struct I8 { using T = int8_t; };
struct I4 { using T = int8_t; };

template <class F> struct Dot;

#ifdef MG_AVX2
inline __m256 Load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 Load8(const uint16_t* w) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))); }
inline __m256 Load8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}
#endif
inline float Scalar(float w) { return w; }
inline float Scalar(uint16_t w) { return HalfToFloat(w); }
inline float Scalar(int8_t w) { return float(w); }

// The one-row weight loops ask for the weight bytes kPrefetchBytes ahead of what they read, into
// L2 (T1), where MG_PREFETCH_WEIGHTS is 1 (build.py prefetch_weights: AVX-512 builds, by default).
// There the hardware prefetcher alone fell behind the weight stream: on 2 Zen 4 cores this took
// the 6B-shaped int4 decode step from 274-290 to 206-217 ms (NTA then; 1-8 KiB ahead alike) and
// left the dense formats as they were; on 2 Xeon (AVX-512, AMX) cores, the `small` step's 33
// matrices alone, interleaved in one process (median of 15): int8 15.7 -> 8.8 ms, fp16 16.4 ->
// 11.8, int4 7.6 -> 6.0 (NTA was the slowest there), fp32 26.2 -> 24.0; the 6B-shaped layer set
// fp16 82 -> 63 ms, int8 68 -> 46. 2 KiB ahead was slower on `small`, 8 KiB on the 6B set. On 2
// Zen 1 cores (AVX2 only) every hint and distance lost to none (fp32 24.1 ms without, 24.4-25.7
// with T0 / T1 / NTA at 1-8 KiB). The two-row pass below reads without it on every CPU.
constexpr int64_t kPrefetchBytes = 4096;

// The loop step reading bytes [at, at + bytes) of a weight row: one request per 64 bytes it
// starts, kPrefetchBytes further on.
inline void PrefetchAhead(const void* row, int64_t at, int64_t bytes) {
#if defined(MG_AVX2) && MG_PREFETCH_WEIGHTS
  for (int64_t line = (at + 63) & ~int64_t(63); line < at + bytes; line += 64)
    _mm_prefetch(static_cast<const char*>(row) + line + kPrefetchBytes, _MM_HINT_T1);
#else
  (void)row, (void)at, (void)bytes;
#endif
}

// Dense formats: one weight per element.
template <class F, int MB>
void DotDense(const typename F::T* w, const float* x, int64_t ldx, int64_t k, float* out) {
  int64_t i = 0;
#ifdef MG_AVX2
  constexpr int U = MB == 1 ? 4 : 2;  // independent accumulators per row hide FMA latency
  __m256 acc[MB][U];
  for (int m = 0; m < MB; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
  for (; i + 8 * U <= k; i += 8 * U) {
    PrefetchAhead(w, i * int64_t(sizeof(*w)), 8 * U * int64_t(sizeof(*w)));
    for (int u = 0; u < U; ++u) {
      __m256 wv = Load8(w + i + 8 * u);
      for (int m = 0; m < MB; ++m)
        acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + i + 8 * u), acc[m][u]);
    }
  }
  for (; i + 8 <= k; i += 8) {
    __m256 wv = Load8(w + i);
    for (int m = 0; m < MB; ++m) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + i), acc[m][0]);
  }
  for (int m = 0; m < MB; ++m) {
    __m256 s = acc[m][0];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[m][u]);
    out[m] = HSum(s);
  }
#else
  for (int m = 0; m < MB; ++m) out[m] = 0.0f;
#endif
  for (; i < k; ++i) {
    float wv = Scalar(w[i]);
    for (int m = 0; m < MB; ++m) out[m] += wv * x[m * ldx + i];
  }
}

// Two weight rows against one row of x (decode), x loaded once for both. On long rows x no longer
// stays in L1 next to the weight stream, and reading it once per row cost bandwidth: fp16 GEMV,
// 6B-shaped layers, interleaved in one process: k = 13696 rows 20 -> 25 GB/s, the layer set +8-10%.
// On short rows it loses (k = 1024: 25.5 -> 18.9 GB/s), so Slice takes it from kPairColumns on.
constexpr int64_t kPairColumns = 8192;

template <class F>
void DotDensePair(const typename F::T* w0, const typename F::T* w1, const float* x, int64_t k, float* out) {
  int64_t i = 0;
  float r0 = 0.0f, r1 = 0.0f;
#ifdef MG_AVX2
  __m256 a0[2], a1[2];
  a0[0] = a0[1] = a1[0] = a1[1] = _mm256_setzero_ps();
  for (; i + 16 <= k; i += 16) {
    for (int u = 0; u < 2; ++u) {
      __m256 xv = _mm256_loadu_ps(x + i + 8 * u);
      a0[u] = _mm256_fmadd_ps(Load8(w0 + i + 8 * u), xv, a0[u]);
      a1[u] = _mm256_fmadd_ps(Load8(w1 + i + 8 * u), xv, a1[u]);
    }
  }
  for (; i + 8 <= k; i += 8) {
    __m256 xv = _mm256_loadu_ps(x + i);
    a0[0] = _mm256_fmadd_ps(Load8(w0 + i), xv, a0[0]);
    a1[0] = _mm256_fmadd_ps(Load8(w1 + i), xv, a1[0]);
  }
  r0 = HSum(_mm256_add_ps(a0[0], a0[1]));
  r1 = HSum(_mm256_add_ps(a1[0], a1[1]));
#endif
  for (; i < k; ++i) {
    r0 += Scalar(w0[i]) * x[i];
    r1 += Scalar(w1[i]) * x[i];
  }
  out[0] = r0;
  out[1] = r1;
}

// int4: `half` = K/2 packed bytes per row; x rows hold [even columns | odd columns].

template <int MB>
void DotInt4(const int8_t* w, const float* x, int64_t ldx, int64_t half, float* out) {
  int64_t j = 0;
  for (int m = 0; m < MB; ++m) out[m] = 0.0f;
#ifdef MG_AVX512
  {
    // A nibble's value is a lookup in a 16-float table (vpermps reads the low 4 bits of each
    // index): no shifts to sign-extend, no int -> float conversion. The int4 decode GEMV is bound
    // by these instructions, not by memory: the 65024 x 1024 output layer 2.2-2.6 -> 1.42 ms on
    // 2 Zen 4 cores. (The other formats stay on AVX2: for them AVX-512 gained nothing, and int8's
    // 16-wide widen + convert was slower, 2.1 -> 3.1 ms.)
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
    constexpr int U = MB == 1 ? 2 : 1;
    __m512 even[MB][U], odd[MB][U];
    for (int m = 0; m < MB; ++m)
      for (int u = 0; u < U; ++u) even[m][u] = odd[m][u] = _mm512_setzero_ps();
    for (; j + 16 * U <= half; j += 16 * U) {
      PrefetchAhead(w, j, 16 * U);
      for (int u = 0; u < U; ++u) {
        const int64_t at = j + 16 * u;
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + at)));
        __m512 lo = _mm512_permutexvar_ps(bytes, table);                         // column 2j+1
        __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table);   // column 2j
        for (int m = 0; m < MB; ++m) {
          even[m][u] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + m * ldx + at), even[m][u]);
          odd[m][u] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + m * ldx + half + at), odd[m][u]);
        }
      }
    }
    for (int m = 0; m < MB; ++m) {
      __m512 sum = _mm512_add_ps(even[m][0], odd[m][0]);
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, _mm512_add_ps(even[m][u], odd[m][u]));
      out[m] += _mm512_reduce_add_ps(sum);
    }
  }
#endif
#ifdef MG_AVX2
  {
    __m256 acc[MB][2];
    for (int m = 0; m < MB; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (; j + 8 <= half; j += 8) {
      PrefetchAhead(w, j, 8);
      __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + j)));
      __m256 hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 4));                          // column 2j
      __m256 lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));  // column 2j+1
      for (int m = 0; m < MB; ++m) {
        acc[m][0] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + m * ldx + j), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + m * ldx + half + j), acc[m][1]);
      }
    }
    for (int m = 0; m < MB; ++m) out[m] += HSum(_mm256_add_ps(acc[m][0], acc[m][1]));
  }
#endif
  for (; j < half; ++j) {
    int byte = w[j];
    float hi = float(byte >> 4), lo = float(int8_t(byte << 4) >> 4);
    for (int m = 0; m < MB; ++m) out[m] += hi * x[m * ldx + j] + lo * x[m * ldx + half + j];
  }
}

// ------------------------------------------------------------------------------- GEMM
struct Job {
  const float* x;      // [M, ldx]
  int64_t ldx;
  const void* w;       // [N, stride] elements of the format
  int64_t stride, k;   // storage per weight row; reduction length handed to the dot
  const float* scale;  // [N] or null
  const float* bias;   // [N] or null
  float* y;            // [M, N]
  int64_t m, n;
};

template <class F, int MB>
inline void DotRows(const Job& job, int64_t row, int64_t m0, float* out) {
  const auto* w = static_cast<const typename F::T*>(job.w) + row * job.stride;
  if constexpr (std::is_same<F, I4>::value)
    DotInt4<MB>(w, job.x + m0 * job.ldx, job.ldx, job.k, out);
  else
    DotDense<F, MB>(w, job.x + m0 * job.ldx, job.ldx, job.k, out);
}

// A row's dot product with its scale and bias applied.
inline float Finish(const Job& job, int64_t row, float dot) {
  return dot * (job.scale ? job.scale[row] : 1.0f) + (job.bias ? job.bias[row] : 0.0f);
}

// Task t's output rows [begin, end) of n: contiguous blocks, multiples of 8 so that threads never
// share a cache line of y.
inline void TaskRows(int64_t n, int t, int tasks, int64_t* begin, int64_t* end) {
  const int64_t per = ((n + tasks - 1) / tasks + 7) / 8 * 8;
  *begin = per * t;
  *end = *begin + per < n ? *begin + per : n;
}

// Tasks for n output rows reading `bytes` of weights: one below ParallelBytes, else a thread each
// (at most one per block of 8 rows).
inline int Tasks(int64_t n, int64_t bytes) {
  if (bytes < ParallelBytes()) return 1;
  const int64_t by_rows = (n + 7) / 8;
  return pool().threads() < by_rows ? pool().threads() : static_cast<int>(by_rows);
}

template <class F>
void Slice(void* ctx, int t, int tasks) {
  const Job& job = *static_cast<const Job*>(ctx);
  int64_t begin, end;
  TaskRows(job.n, t, tasks, &begin, &end);
  if constexpr (!std::is_same<F, I4>::value) {
    if (job.m == 1 && job.k >= kPairColumns) {
      for (; begin + 2 <= end; begin += 2) {
        const auto* w = static_cast<const typename F::T*>(job.w) + begin * job.stride;
        float out[2];
        DotDensePair<F>(w, w + job.stride, job.x, job.k, out);
        for (int i = 0; i < 2; ++i) job.y[begin + i] = Finish(job, begin + i, out[i]);
      }
    }
  }
  for (int64_t row = begin; row < end; ++row) {   // (the odd row left after the pairs, if any)
    int64_t m0 = 0;
    float out[4];
    for (; m0 + 4 <= job.m; m0 += 4) {
      DotRows<F, 4>(job, row, m0, out);
      for (int i = 0; i < 4; ++i) job.y[(m0 + i) * job.n + row] = Finish(job, row, out[i]);
    }
    for (; m0 < job.m; ++m0) {
      DotRows<F, 1>(job, row, m0, out);
      job.y[m0 * job.n + row] = Finish(job, row, out[0]);
    }
  }
}

// Time spent inside the linear kernels, for the benchmark's breakdown (two clock reads per call).
std::atomic<int64_t> kernel_nanos{0};
std::atomic<int64_t> kernel_calls{0};

// Counts a kernel call that began at `start`.
void CountKernelCall(std::chrono::steady_clock::time_point start) {
  kernel_nanos.fetch_add(std::chrono::duration_cast<std::chrono::nanoseconds>(
      std::chrono::steady_clock::now() - start).count(), std::memory_order_relaxed);
  kernel_calls.fetch_add(1, std::memory_order_relaxed);
}
// Logits the argmax rows computed exactly, of all they gave (the benchmark's report).
std::atomic<int64_t> head_exact{0};
std::atomic<int64_t> head_logits{0};

// The job of y = layer(x) for the dense formats (Multiply changes x, stride and k for int4).
Job DenseJob(const mindglm::LinearWeights& layer, const float* x, int64_t m, float* y) {
  Job job{};
  job.x = x, job.ldx = layer.k, job.w = layer.w, job.stride = job.k = layer.k;
  job.scale = layer.scale, job.bias = layer.bias, job.y = y, job.m = m, job.n = layer.n;
  return job;
}

template <class F>
void Multiply(const mindglm::LinearWeights& layer, const float* x, int64_t m, float* y) {
  Job job = DenseJob(layer, x, m, y);
  int64_t bytes_per_row;
  thread_local std::vector<float> split;
  if constexpr (std::is_same<F, I4>::value) {
    // Split x into even / odd columns once, so the int4 dot reads both nibbles of a byte
    // against contiguous floats.
    const int64_t half = layer.k / 2;
    split.resize(static_cast<size_t>(m * layer.k));
    for (int64_t r = 0; r < m; ++r) {
      const float* src = x + r * layer.k;
      float* dst = split.data() + r * layer.k;
      for (int64_t j = 0; j < half; ++j) {
        dst[j] = src[2 * j];
        dst[half + j] = src[2 * j + 1];
      }
    }
    job.x = split.data();
    job.stride = job.k = half;
    bytes_per_row = half;
  } else {
    bytes_per_row = layer.k * int64_t(sizeof(typename F::T));
  }
  pool().Run(Tasks(job.n, job.n * bytes_per_row * (job.m < 4 ? 1 : 4)), &Slice<F>, &job);
}

// ------------------------------------------------------------------------------- argmax rows
// A greedy decode step needs, of the output layer, only each row's largest logit. A bfloat16 copy
// of a float32 head (`rounded`: each weight rounded to its nearest bfloat16, as its top 16 bits)
// gives every logit to within a bound (below) at half the head's bytes; the float32 weights are
// then read only for the logits that can still be the largest. On the `small` model the head is
// 43% of a decode step's weight bytes (266 of 618 MB); on the 6B one 4%.
inline float RoundedToFloat(uint16_t r) {
  const uint32_t bits = uint32_t(r) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#ifdef MG_AVX2
inline __m256 Rounded8(const uint16_t* r) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r))), 16));
}
#endif

// For MB rows of x (and of |x|, `x_abs`): approx[m] = sum_i r_i x_mi and spread[m] = sum_i |r_i| |x_mi|,
// fused multiply-adds in float32 (the bound allows for their rounding).

template <int MB>
void RoundedDot(const uint16_t* r, const float* x, const float* x_abs, int64_t ldx, int64_t k, float* approx,
                float* spread) {
  int64_t i = 0;
  for (int m = 0; m < MB; ++m) approx[m] = spread[m] = 0.0f;
#ifdef MG_AVX512
  {  // 16 lanes: the widening to float32 is most of this loop's work (AVX2: 3.5 against 2.6 ms a small head)
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 a[MB], s[MB];
    for (int m = 0; m < MB; ++m) a[m] = s[m] = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) {
      PrefetchAhead(r, i * 2, 32);
      const __m512 w = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i))), 16));
      const __m512 w_abs = _mm512_and_ps(w, magnitude);
      for (int m = 0; m < MB; ++m) {
        a[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * ldx + i), a[m]);
        s[m] = _mm512_fmadd_ps(w_abs, _mm512_loadu_ps(x_abs + m * ldx + i), s[m]);
      }
    }
    for (int m = 0; m < MB; ++m) approx[m] = _mm512_reduce_add_ps(a[m]), spread[m] = _mm512_reduce_add_ps(s[m]);
  }
#endif
#ifdef MG_AVX2
  {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 a[MB], s[MB];
    for (int m = 0; m < MB; ++m) a[m] = s[m] = _mm256_setzero_ps();
    for (; i + 8 <= k; i += 8) {
      PrefetchAhead(r, i * 2, 16);
      const __m256 w = Rounded8(r + i), w_abs = _mm256_and_ps(w, magnitude);
      for (int m = 0; m < MB; ++m) {
        a[m] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * ldx + i), a[m]);
        s[m] = _mm256_fmadd_ps(w_abs, _mm256_loadu_ps(x_abs + m * ldx + i), s[m]);
      }
    }
    for (int m = 0; m < MB; ++m) approx[m] += HSum(a[m]), spread[m] += HSum(s[m]);
  }
#endif
  for (; i < k; ++i) {
    const float w = RoundedToFloat(r[i]);
    for (int m = 0; m < MB; ++m) {
      approx[m] += w * x[m * ldx + i];
      spread[m] += std::fabs(w) * x_abs[m * ldx + i];
    }
  }
}

struct RoundedJob {
  const uint16_t* rounded;  // [n, k]
  const float *x, *x_abs;   // [m, k]
  int64_t m, n, k;
  float *approx, *spread;   // [m, n]
};

void RoundedSlice(void* ctx, int t, int tasks) {
  const RoundedJob& job = *static_cast<const RoundedJob*>(ctx);
  int64_t begin, end;
  TaskRows(job.n, t, tasks, &begin, &end);
  float a[4], s[4];
  for (int64_t row = begin; row < end; ++row) {
    const uint16_t* r = job.rounded + row * job.k;
    int64_t m0 = 0;
    for (; m0 + 4 <= job.m; m0 += 4) {
      RoundedDot<4>(r, job.x + m0 * job.k, job.x_abs + m0 * job.k, job.k, job.k, a, s);
      for (int i = 0; i < 4; ++i) job.approx[(m0 + i) * job.n + row] = a[i], job.spread[(m0 + i) * job.n + row] = s[i];
    }
    for (; m0 < job.m; ++m0) {
      RoundedDot<1>(r, job.x + m0 * job.k, job.x_abs + m0 * job.k, job.k, job.k, a, s);
      job.approx[m0 * job.n + row] = a[0], job.spread[m0 * job.n + row] = s[0];
    }
  }
}

// y[b, row] exactly as Multiply<F> writes it for an x of job.m rows (the same dot, row block and
// pairing: Slice's), for one output.
template <class F>
float OneOutput(const Job& job, int64_t row, int64_t b) {
  float out[4];
  if constexpr (!std::is_same<F, I4>::value) {
    // Slice pairs rows from each slice's start (a multiple of 8): only an odd n's last row is alone.
    if (job.m == 1 && job.k >= kPairColumns && !(job.n % 2 == 1 && row == job.n - 1)) {
      const auto* w = static_cast<const typename F::T*>(job.w) + row * job.stride;
      DotDensePair<F>(w, w, job.x, job.k, out);
      return Finish(job, row, out[0]);
    }
  }
  if (b < job.m / 4 * 4) {
    DotRows<F, 4>(job, row, b / 4 * 4, out);
    return Finish(job, row, out[b % 4]);
  }
  DotRows<F, 1>(job, row, b, out);
  return Finish(job, row, out[0]);
}

// Whether a weight stored `stride` elements a row holds rows of k inputs in `format` (int4: two a byte).
bool FitsFormat(mindglm::Format format, int64_t k, int64_t stride) {
  return format == mindglm::kInt4 ? k % 2 == 0 && stride == k / 2 : stride == k;
}

// An entry point's (x, w[, scale][, bias]) -> y.
int Launch(mindglm::Format format, int nparam, void** params, int* ndims, int64_t** shapes) {
  const bool scaled = format == mindglm::kInt8 || format == mindglm::kInt4;
  const int inputs = nparam - 1, expected = scaled ? 3 : 2;
  if (inputs != expected && inputs != expected + 1) return 1;
  if (ndims[0] != 2 || ndims[1] != 2 || ndims[nparam - 1] != 2) return 2;
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  if (!FitsFormat(format, k, shapes[1][1])) return 3;
  mindglm::LinearWeights layer{format, params[1], n, k, scaled ? static_cast<const float*>(params[2]) : nullptr,
                               inputs == expected + 1 ? static_cast<const float*>(params[expected]) : nullptr};
  mindglm::LinearForward(layer, static_cast<const float*>(params[0]), m, static_cast<float*>(params[nparam - 1]));
  return 0;
}

}  // namespace

namespace mindglm {

void LinearForward(const LinearWeights& layer, const float* x, int64_t m, float* y) {
  auto start = std::chrono::steady_clock::now();
  switch (layer.format) {
    case kInt8: Multiply<I8>(layer, x, m, y); break;
    case kInt4: Multiply<I4>(layer, x, m, y); break;
    case kF16: Multiply<F16>(layer, x, m, y); break;
    case kF32: Multiply<F32>(layer, x, m, y); break;
  }
  CountKernelCall(start);
}

bool LinearArgmaxRows(const LinearWeights& layer, const uint16_t* rounded, const float* x, int64_t m, float* y) {
  if (layer.format != kF32) return false;
  auto start = std::chrono::steady_clock::now();
  const int64_t n = layer.n, k = layer.k;
  thread_local std::vector<float> x_abs, radius;
  x_abs.resize(static_cast<size_t>(m * k)), radius.resize(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m * k; ++i) x_abs[i] = std::fabs(x[i]);
  RoundedJob rounded_job{rounded, x, x_abs.data(), m, n, k, y, radius.data()};
  pool().Run(Tasks(n, n * k * 2), &RoundedSlice, &rounded_job);
  // The bound. With u = 2^-24 and g = (k + 2) u / (1 - (k + 2) u), for a logit's dot product
  // D = fl(sum w_i x_i) in the float32 kernel and its approximation A = fl(sum r_i x_i):
  //   |w_i - r_i| <= 2^-8 |r_i| + 2^-134 (round to nearest; the second term for subnormals),
  //   |A - sum r_i x_i| <= g S and |D - sum w_i x_i| <= g (1 + 2^-8) S, S = sum |r_i| |x_i|,
  //   S <= spread / (1 - g) (spread: S summed in float32),
  // so |D - A| <= c spread + 2^-134 sum |x_i|, c = (2^-8 + g (2 + 2^-8)) / (1 - g). Then the scale
  // and bias (Finish: a rounding of at most u of each result, 5 u |value| + 5 u |A scale| covers
  // them and the float32 arithmetic of the bound itself, which the factor 1 + 2^-10 covers too).
  // A logit is computed exactly (OneOutput) where its upper bound reaches the row's largest lower
  // bound, where a bound is not finite, or where it is huge; every other is left at its
  // approximation, below the row's largest logit, so that the row's first largest is the exact one's.
  const double u = std::ldexp(1.0, -24), g = (k + 2) * u / (1 - (k + 2) * u);
  const float c = float((std::ldexp(1.0, -8) + g * (2 + std::ldexp(1.0, -8))) / (1 - g) * (1 + 1e-6));
  const float five_u = float(5 * u), slack = 1.0f + 1.0f / 1024;
  constexpr float kLargest = 3.4028235e38f, kHuge = 1e37f;
  thread_local std::vector<float> floor;
  floor.assign(static_cast<size_t>(m), -kLargest);
  for (int64_t b = 0; b < m; ++b) {
    float* value = y + b * n;
    float* r = radius.data() + b * n;   // spread in, radius out
    float x_sum = 0.0f;
    for (int64_t i = 0; i < k; ++i) x_sum += x_abs[b * k + i];
    const float absolute = std::ldexp(x_sum * slack, -134);
    float best = -kLargest;
    for (int64_t v = 0; v < n; ++v) {
      const float scale = layer.scale ? layer.scale[v] : 1.0f, bias = layer.bias ? layer.bias[v] : 0.0f;
      const float scaled = value[v] * scale, finished = scaled + bias;
      const float bound = (std::fabs(scale) * (c * r[v] + absolute) + five_u * (std::fabs(finished) + std::fabs(scaled))) * slack;
      const float lower = finished - bound;
      value[v] = finished, r[v] = bound;
      best = std::fabs(lower) <= kLargest && lower > best ? lower : best;
    }
    floor[b] = best;
  }
  auto exact = [&](int64_t b, int64_t v) {
    const float value = y[b * n + v], high = value + radius[b * n + v];
    return !(std::fabs(high) <= kLargest) || high >= floor[b] || std::fabs(value) > kHuge;
  };
  // The logits to compute exactly; past an eighth of the head, reading it whole costs less.
  int64_t count = 0;
  for (int64_t b = 0; b < m; ++b)
    for (int64_t v = 0; v < n; ++v) count += exact(b, v);
  if (count * 8 > m * n) {
    Multiply<F32>(layer, x, m, y);
    count = m * n;
  } else {
    const Job job = DenseJob(layer, x, m, y);
    for (int64_t b = 0; b < m; ++b)
      for (int64_t v = 0; v < n; ++v)
        if (exact(b, v)) y[b * n + v] = OneOutput<F32>(job, v, b);
  }
  head_exact.fetch_add(count, std::memory_order_relaxed);
  head_logits.fetch_add(m * n, std::memory_order_relaxed);
  CountKernelCall(start);
  return true;
}

void DenseRow(Format format, const void* table, int64_t row, int64_t n, float* out) {
  if (format == kF32) {
    std::memcpy(out, static_cast<const float*>(table) + row * n, sizeof(float) * n);
    return;
  }
  const uint16_t* half = static_cast<const uint16_t*>(table) + row * n;
  for (int64_t i = 0; i < n; ++i) out[i] = HalfToFloat(half[i]);
}

bool ReadLinear(void** params, int* ndims, int64_t** shapes, int i, int32_t format, int64_t k,
                LinearWeights* layer) {
  if (format < kInt8 || format > kF32 || ndims[i] != 2 || ndims[i + 1] != 1 || ndims[i + 2] != 1) return false;
  const int64_t n = shapes[i][0];
  if (!FitsFormat(Format(format), k, shapes[i][1]) || shapes[i + 1][0] != n || shapes[i + 2][0] != n) return false;
  *layer = LinearWeights{Format(format), params[i], n, k, static_cast<const float*>(params[i + 1]),
                         static_cast<const float*>(params[i + 2])};
  return true;
}

}  // namespace mindglm

extern "C" {
int MatmulF32(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  return Launch(mindglm::kF32, nparam, params, ndims, shapes);
}
int MatmulF16(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  return Launch(mindglm::kF16, nparam, params, ndims, shapes);
}
int MatmulInt8(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  return Launch(mindglm::kInt8, nparam, params, ndims, shapes);
}
int MatmulInt4(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  return Launch(mindglm::kInt4, nparam, params, ndims, shapes);
}
// (x [m, k], w [n, k] float32, rounded [n, k] int16 (bfloat16 bits), scale [n], bias [n]) -> y [m, n]
// through LinearArgmaxRows, for tests (the network step calls it itself).
int MatmulF32Greedy(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  if (nparam != 6 || ndims[0] != 2 || ndims[1] != 2 || ndims[2] != 2 || ndims[3] != 1 || ndims[4] != 1 || ndims[5] != 2)
    return 1;
  const int64_t m = shapes[0][0], k = shapes[0][1], n = shapes[1][0];
  if (shapes[1][1] != k || shapes[2][0] != n || shapes[2][1] != k || shapes[3][0] != n || shapes[4][0] != n ||
      shapes[5][0] != m || shapes[5][1] != n)
    return 2;
  mindglm::LinearWeights layer{mindglm::kF32, params[1], n, k, static_cast<const float*>(params[3]),
                               static_cast<const float*>(params[4])};
  mindglm::LinearArgmaxRows(layer, static_cast<const uint16_t*>(params[2]), static_cast<const float*>(params[0]), m,
                            static_cast<float*>(params[5]));
  return 0;
}
// Nanoseconds spent in the kernels and number of calls since the last reset (benchmarks).
int64_t MindglmKernelNanos(int reset) {
  return reset ? kernel_nanos.exchange(0) : kernel_nanos.load();
}
int64_t MindglmKernelCalls(int reset) {
  return reset ? kernel_calls.exchange(0) : kernel_calls.load();
}
// Logits LinearArgmaxRows computed exactly, and all it gave, since the last reset.
int64_t MindglmHeadExact(int reset) {
  return reset ? head_exact.exchange(0) : head_exact.load();
}
int64_t MindglmHeadLogits(int reset) {
  return reset ? head_logits.exchange(0) : head_logits.load();
}
// The kernels' compile-time SIMD level, for tests and the benchmark report: 0 scalar, 1 AVX2, 2 AVX-512.
int MindglmKernelsSimd() {
#if defined(MG_AVX512)
  return 2;
#elif defined(MG_AVX2)
  return 1;
#else
  return 0;
#endif
}
}
