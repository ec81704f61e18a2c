// What the kernel files of the library call in one another (build.py compiles them into one
// shared library): the weight-only linear layer, and the row-wise steps of a layer. The fused
// layer kernels (block.cc) chain them inside one MindSpore op. Everything here is float32.
#pragma once
#include <cstdint>

namespace mindglm {

// Storage formats of a linear layer's weight, in the order of mindglm/quantize.py's FORMATS
// (the Python side passes a layer's index there).
enum Format : int32_t { kInt8 = 0, kInt4 = 1, kF16 = 2, kF32 = 3 };

// y[m, n] = scale[n] * sum_k x[m, k] w[n, k] + bias[n]; scale and bias may be null.
// w is [n, k] of the format (int4: [n, k / 2], two values a byte, column 2j in the high nibble).
struct LinearWeights {
  Format format;
  const void* w;
  int64_t n, k;
  const float* scale;
  const float* bias;
};

// x [m, k] -> y [m, n], threaded over output rows (linear.cc).
void LinearForward(const LinearWeights& layer, const float* x, int64_t m, float* y);

// x [m, k] -> y [m, n] for a greedy step: each row's first largest value is that of
// LinearForward's y, every value that could be it computed exactly (bit for bit LinearForward's),
// the others from `rounded` [n, k], the weights rounded to bfloat16 (their top 16 bits), and
// below the row's largest. float32 layers only: false (nothing written) for the other formats.
bool LinearArgmaxRows(const LinearWeights& layer, const uint16_t* rounded, const float* x, int64_t m, float* y);

// The layer (w [n, stride], scale [n], bias [n]) at params[i], i+1, i+2 of an AOT call, for
// inputs of width k; false when the shapes do not fit the format (linear.cc).
bool ReadLinear(void** params, int* ndims, int64_t** shapes, int i, int32_t format, int64_t k,
                LinearWeights* layer);

// Row `row` of a float32 or float16 table [rows, n] as n float32s (an embedding lookup; linear.cc).
void DenseRow(Format format, const void* table, int64_t row, int64_t n, float* out);

// y = x * rsqrt(mean(x^2) + eps) * w, row by row (fused.cc).
void RmsNormRows(const float* x, const float* w, float eps, int64_t rows, int64_t hidden, float* y);

// An AOT call's norm weight [hidden] at params[i] and eps [1] at params[i + 1] (fused.cc); 0, or
// the kernel's error code (1: ranks, 2: shapes).
int ReadNorm(void** params, int* ndims, int64_t** shapes, int i, int64_t hidden, const float** weight, float* eps);

// y [rows, width] = silu(x[:, :width]) * x[:, width:] of x [rows, 2 width] (fused.cc).
void SwiGLURows(const float* x, int64_t rows, int64_t width, float* y);

// The fused qkv rows [tokens, (heads + 2 kv_heads) dim] split into q [tokens, heads, dim],
// k, v [tokens, kv_heads, dim], the first `rotary` dims of every q and k head rotated:
// out[j] = x[j] cos[j] + sign[j] x[partner[j]] sin[j] (attention.cc).
struct HeadLayout {
  int64_t heads, kv_heads, dim, rotary;
  const float *cos, *sin;  // [tokens, rotary]
  const int32_t* partner;  // [rotary], each in [0, rotary)
  const float* sign;       // [rotary]
};
void SplitRotateHeads(const float* qkv, int64_t tokens, const HeadLayout& layout, float* q, float* k, float* v);

// `queries` queries per batch row over the KV cache slots the row names (attention.cc).
struct CacheAttention {
  const float *q, *keys, *values;  // q [batch * queries, heads, dim]; keys, values [slot_count, kv_heads, dim]
  const int32_t* slots;            // [batch, keys_per_row], each in [0, slot_count)
  const bool* allowed;             // [batch * queries, keys_per_row]: the keys each query sees
  float query_scale, score_scale;
  float* out;                      // [batch * queries, heads, dim]
  int64_t batch, queries, heads, kv_heads, dim, keys_per_row, slot_count;
};
void Attend(const CacheAttention& job);

// Argument readers shared by the entry points of attention.cc and block.cc: 0, or the error
// code the kernel returns (1: ranks, 2: shapes, 3: an index out of range). Each reads the
// arguments at the positions it is given (attention.cc says which).
int ReadRotaryTables(void** params, int* ndims, int64_t** shapes, int tables, int64_t tokens, int64_t dim,
                     HeadLayout* layout);
int ReadHeadLayout(void** params, int* ndims, int64_t** shapes, int tables, int outputs, int64_t tokens,
                   int64_t width, HeadLayout* layout);
int ReadCacheSlots(void** params, int* ndims, int64_t** shapes, int keys, int slots, int allowed, int scales,
                   int64_t heads, int64_t dim, CacheAttention* job);
int ReadCacheAttention(void** params, int* ndims, int64_t** shapes, CacheAttention* job);

}  // namespace mindglm
