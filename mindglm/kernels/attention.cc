// The attention of a layer around its matmuls, for MindSpore's CPU backend (ops.Custom,
// func_type="aot"), float32. In a decode step every MindSpore op costs 5-8 us of runtime work
// whatever its size; a layer's qkv split and rotary were ~17 ops (slices, the rotation as a
// matmul by a signed permutation, products, sum, concat) and its attention over the cache ~12
// (gathers, transposes, scale, two batched matmuls, mask, softmax). Each becomes one call here
// (mindglm/fused.py).
//
//   MindglmQkvRotary(qkv [T, (H + 2 KV) D], cos [T, R], sin [T, R], partner [R] int32, sign [R])
//       -> q [T, H, D], k [T, KV, D], v [T, KV, D]
//     the fused projection split into heads; the first R dims of every q and k head rotated:
//     out[j] = x[j] cos[j] + sign[j] x[partner[j]] sin[j]  (x @ R for R a signed permutation:
//     ChatGLM2/3's interleaved pairs, ChatGLM-6B's two rotate-half halves), the rest copied.
//
//   MindglmCacheAttention(q [B, H, D], keys [N, KV, D], values [N, KV, D], kv_slots [B, K] int32,
//                         allowed [B, K] bool, scales [2]) -> out [B, H, D]
//     one query per row (decode) over the cache slots kv_slots[b] names (allowed [B, S, K] with
//     q [B * S, H, D]: S queries a row, each seeing its own keys), as DotProductAttention
//     computes it: s = ((q * scales[0]) . k) * scales[1], keys not allowed left out (the -1e9 fill
//     gives them exactly 0 probability), softmax in float32, then the values' weighted sum. Query
//     head h reads key/value head h / (H / KV). A row with no key allowed (padding) averages all
//     K, as the softmax of K equal scores does.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "layer.h"
#include "pool.h"
#include "simd.h"

namespace {

float Dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#ifdef MG_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  sum = mindglm::HSum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// out += p * v
void Axpy(float* out, float p, const float* v, int64_t n) {
  int64_t i = 0;
#ifdef MG_AVX2
  __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
#endif
  for (; i < n; ++i) out[i] += p * v[i];
}

using mindglm::CacheAttention;

void AttendRows(const CacheAttention& job, int64_t first, int64_t last) {
  const int64_t group = job.heads / job.kv_heads, kv_stride = job.kv_heads * job.dim;
  thread_local std::vector<float> scores, query;
  scores.resize(job.keys_per_row);
  query.resize(job.dim);
  for (int64_t task = first; task < last; ++task) {
    // task: (query row, head); a query row is (batch row, query), its keys its batch row's
    const int64_t query_row = task / job.heads, h = task % job.heads, kv = h / group;
    const float* q = job.q + task * job.dim;
    for (int64_t d = 0; d < job.dim; ++d) query[d] = q[d] * job.query_scale;
    const int32_t* slots = job.slots + query_row / job.queries * job.keys_per_row;
    const bool* allowed = job.allowed + query_row * job.keys_per_row;
    bool any = false;
    float top = -INFINITY;
    for (int64_t k = 0; k < job.keys_per_row; ++k) {
      if (!allowed[k]) continue;
      float s = Dot(query.data(), job.keys + int64_t(slots[k]) * kv_stride + kv * job.dim, job.dim);
      if (job.score_scale != 1.0f) s *= job.score_scale;
      scores[k] = s;
      top = any ? std::fmax(top, s) : s;
      any = true;
    }
    float total = 0.0f;
    for (int64_t k = 0; k < job.keys_per_row; ++k) {
      float e = 0.0f;
      if (!any) e = 1.0f;                                  // softmax of K equal scores
      else if (allowed[k]) e = std::exp(scores[k] - top);
      scores[k] = e;
      total += e;
    }
    float* out = job.out + task * job.dim;
    std::memset(out, 0, sizeof(float) * job.dim);
    for (int64_t k = 0; k < job.keys_per_row; ++k)
      if (scores[k] != 0.0f)
        Axpy(out, scores[k] / total, job.values + int64_t(slots[k]) * kv_stride + kv * job.dim, job.dim);
  }
}

void AttendSlice(void* ctx, int t, int tasks) {
  const CacheAttention& job = *static_cast<const CacheAttention*>(ctx);
  const int64_t rows = job.batch * job.queries * job.heads, per = (rows + tasks - 1) / tasks;
  const int64_t first = per * t, last = first + per < rows ? first + per : rows;
  if (first < last) AttendRows(job, first, last);
}

// Below this many multiply-adds an attention runs on the calling thread: waking a second thread
// costs more than it saves (decode over a short window is ~70k).
constexpr int64_t kParallelWork = int64_t(1) << 18;

}  // namespace

namespace mindglm {

void SplitRotateHeads(const float* qkv, int64_t tokens, const HeadLayout& layout, float* q, float* k, float* v) {
  const int64_t heads = layout.heads, kv_heads = layout.kv_heads, dim = layout.dim, rotary = layout.rotary;
  const int64_t width = (heads + 2 * kv_heads) * dim;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* row = qkv + t * width;
    const float* c = layout.cos + t * rotary;
    const float* s = layout.sin + t * rotary;
    for (int64_t head = 0; head < heads + kv_heads; ++head) {
      const float* x = row + head * dim;
      float* y = head < heads ? q + (t * heads + head) * dim : k + (t * kv_heads + head - heads) * dim;
      for (int64_t j = 0; j < rotary; ++j) {
        const float turned = layout.sign[j] * x[layout.partner[j]];
        y[j] = x[j] * c[j] + turned * s[j];
      }
      std::memcpy(y + rotary, x + rotary, sizeof(float) * (dim - rotary));
    }
    std::memcpy(v + t * kv_heads * dim, row + (heads + kv_heads) * dim, sizeof(float) * kv_heads * dim);
  }
}

void Attend(const CacheAttention& job) {
  const int64_t rows = job.batch * job.queries * job.heads;
  int tasks = 1;
  if (rows * job.keys_per_row * job.dim >= kParallelWork)
    tasks = pool().threads() < rows ? pool().threads() : static_cast<int>(rows);
  pool().Run(tasks, &AttendSlice, const_cast<CacheAttention*>(&job));
}

// An AOT call's rotary tables (cos, sin, partner, sign at params[tables..tables+3]) for
// `tokens` rows of heads `dim` wide: sets layout's rotary and tables; 0, or the error code.
int ReadRotaryTables(void** params, int* ndims, int64_t** shapes, int tables, int64_t tokens, int64_t dim,
                     HeadLayout* layout) {
  const int c = tables;
  if (ndims[c] != 2 || ndims[c + 1] != 2 || ndims[c + 2] != 1 || ndims[c + 3] != 1) return 1;
  const int64_t rotary = shapes[c][1];
  if (rotary > dim || shapes[c][0] != tokens || shapes[c + 1][0] != tokens || shapes[c + 1][1] != rotary ||
      shapes[c + 2][0] != rotary || shapes[c + 3][0] != rotary)
    return 2;
  layout->rotary = rotary;
  layout->cos = static_cast<const float*>(params[c]);
  layout->sin = static_cast<const float*>(params[c + 1]);
  layout->partner = static_cast<const int32_t*>(params[c + 2]);
  layout->sign = static_cast<const float*>(params[c + 3]);
  for (int64_t j = 0; j < rotary; ++j)
    if (layout->partner[j] < 0 || layout->partner[j] >= rotary) return 3;
  return 0;
}

// An AOT call's rotary tables (at params[tables..]) and its q, k, v outputs (params[outputs..
// outputs+2]) for `tokens` rows of a fused qkv `width` wide; 0, or the kernel's error code.
int ReadHeadLayout(void** params, int* ndims, int64_t** shapes, int tables, int outputs, int64_t tokens,
                   int64_t width, HeadLayout* layout) {
  const int o = outputs;
  if (ndims[o] != 3 || ndims[o + 1] != 3 || ndims[o + 2] != 3) return 1;
  const int64_t heads = shapes[o][1], dim = shapes[o][2], kv_heads = shapes[o + 1][1];
  if (width != (heads + 2 * kv_heads) * dim || shapes[o][0] != tokens || shapes[o + 1][0] != tokens ||
      shapes[o + 1][2] != dim || shapes[o + 2][0] != tokens || shapes[o + 2][1] != kv_heads || shapes[o + 2][2] != dim)
    return 2;
  layout->heads = heads, layout->kv_heads = kv_heads, layout->dim = dim;
  return ReadRotaryTables(params, ndims, shapes, tables, tokens, dim, layout);
}

// An AOT call's keys, values (params[keys], params[keys + 1]: [N, KV, D]), kv_slots [B, K] int32,
// allowed ([B, K]: one query a row, or [B, S, K]) and scales [2], for queries of `heads` heads
// `dim` wide; the caller sets q and out. 0, or the kernel's error code.
int ReadCacheSlots(void** params, int* ndims, int64_t** shapes, int keys, int slots, int allowed, int scales,
                   int64_t heads, int64_t dim, CacheAttention* job) {
  if (ndims[keys] != 3 || ndims[keys + 1] != 3 || ndims[slots] != 2 || (ndims[allowed] != 2 && ndims[allowed] != 3) ||
      ndims[scales] != 1)
    return 1;
  *job = CacheAttention{};
  job->batch = shapes[slots][0], job->queries = ndims[allowed] == 3 ? shapes[allowed][1] : 1;
  job->heads = heads, job->dim = dim;
  job->slot_count = shapes[keys][0], job->kv_heads = shapes[keys][1], job->keys_per_row = shapes[slots][1];
  if (shapes[keys][2] != dim || shapes[keys + 1][0] != job->slot_count || shapes[keys + 1][1] != job->kv_heads ||
      shapes[keys + 1][2] != dim || shapes[allowed][0] != job->batch ||
      shapes[allowed][ndims[allowed] - 1] != job->keys_per_row || shapes[scales][0] != 2 || job->kv_heads < 1 ||
      heads % job->kv_heads != 0)
    return 2;
  job->keys = static_cast<const float*>(params[keys]);
  job->values = static_cast<const float*>(params[keys + 1]);
  job->slots = static_cast<const int32_t*>(params[slots]);
  job->allowed = static_cast<const bool*>(params[allowed]);
  const float* scale = static_cast<const float*>(params[scales]);
  job->query_scale = scale[0], job->score_scale = scale[1];
  for (int64_t i = 0; i < job->batch * job->keys_per_row; ++i)
    if (job->slots[i] < 0 || job->slots[i] >= job->slot_count) return 3;
  return 0;
}

// An AOT call's (q, keys, values, kv_slots, allowed, scales) at params[0..5]; the caller sets
// `out`. allowed is [B, K] (one query a row) or [B, S, K] (q then holds B * S query rows).
// 0, or the kernel's error code.
int ReadCacheAttention(void** params, int* ndims, int64_t** shapes, CacheAttention* job) {
  if (ndims[0] != 3) return 1;
  if (int status = ReadCacheSlots(params, ndims, shapes, 1, 3, 4, 5, shapes[0][1], shapes[0][2], job)) return status;
  if (shapes[0][0] != job->batch * job->queries) return 2;
  job->q = static_cast<const float*>(params[0]);
  return 0;
}

}  // namespace mindglm

extern "C" {
int MindglmQkvRotary(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  if (nparam != 8 || ndims[0] != 2) return 1;
  mindglm::HeadLayout layout;
  if (int status = mindglm::ReadHeadLayout(params, ndims, shapes, 1, 5, shapes[0][0], shapes[0][1], &layout))
    return status;
  mindglm::SplitRotateHeads(static_cast<const float*>(params[0]), shapes[0][0], layout, static_cast<float*>(params[5]),
                            static_cast<float*>(params[6]), static_cast<float*>(params[7]));
  return 0;
}

int MindglmCacheAttention(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  if (nparam != 7 || ndims[6] != 3) return 1;
  mindglm::CacheAttention job;
  if (int status = mindglm::ReadCacheAttention(params, ndims, shapes, &job)) return status;
  job.out = static_cast<float*>(params[6]);
  mindglm::Attend(job);
  return 0;
}
}
