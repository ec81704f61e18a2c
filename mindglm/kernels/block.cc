// A ChatGLM2/3 layer's cached step in two calls around its KV cache write, for MindSpore's CPU
// backend (ops.Custom, func_type="aot"), float32 (mindglm/fused.py KernelBlock).
//
// A decode step of the `small` model spent as long in MindSpore's runtime around its ~120 ops as
// in its matmuls: every op costs its launch, its output allocation and its hand-over to the next
// whatever its size. And a compiled prefill keeps every op's output for the graph's life (the
// 6B model's 64-token prefill: ~490 MB). The fused norm, rotary and attention kernels brought a
// layer to ~13 ops; these chain the same steps (layer.h) inside one op each, leaving a layer four
// in decode and prefill alike: the input block, the cache's two in-place writes, the output block.
//
//   MindglmAttentionInput(h [T, H], norm [H], eps [1], format [1] int32, w, scale [N], bias [N],
//                         cos [T, R], sin [T, R], partner [R] int32, sign [R])
//       -> q [T, heads, D], k [T, KV, D], v [T, KV, D]
//     qkv = rms_norm(h) W^T * scale + bias, split into heads and rotated (MindglmQkvRotary).
//
//   MindglmLayerOutput(q [T, heads, D], keys, values, kv_slots [B, K], allowed [B, S, K], scales,
//                      h [T, H], formats [3] int32, dense (w, scale [H], bias [H]), norm [H],
//                      eps [1], up (w, scale [2F], bias [2F]), down (w, scale [H], bias [H]))
//       -> out [T, H]     (T = B * S)
//     attn = the attention over the cache (MindglmCacheAttention); h1 = h + dense(attn);
//     out = h1 + down(swiglu(up(rms_norm(h1)))).
//
// Each linear layer takes (w, scale, bias) with its format's index in mindglm/quantize.py's
// FORMATS (float layers pass a unit scale and zero bias, which change no bit). Tokens go through
// in chunks of kChunk rows (a multiple of 4, the linear kernel's row block, so every row's sums
// are those of the unfused layers), which bounds the scratch a long prompt needs.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "layer.h"

namespace {

using mindglm::LinearWeights;

constexpr int64_t kChunk = 32;

struct MlpBlock {
  LinearWeights dense, up, down;
  const float* norm;
  float eps;
};

// Reads MindglmLayerOutput's inputs from params[first] (h) on; 0 or an error code.
int ReadMlpBlock(void** params, int* ndims, int64_t** shapes, int first, int64_t tokens, int64_t attn_width,
                 MlpBlock* block) {
  const int h = first, formats = first + 1, dense = first + 2, norm = first + 5, up = first + 7, down = first + 10;
  if (ndims[h] != 2 || ndims[formats] != 1 || shapes[formats][0] != 3) return 1;
  const int64_t hidden = shapes[h][1];
  if (int status = mindglm::ReadNorm(params, ndims, shapes, norm, hidden, &block->norm, &block->eps)) return status;
  if (shapes[h][0] != tokens) return 2;
  const int32_t* format = static_cast<const int32_t*>(params[formats]);
  if (!mindglm::ReadLinear(params, ndims, shapes, dense, format[0], attn_width, &block->dense) ||
      !mindglm::ReadLinear(params, ndims, shapes, up, format[1], hidden, &block->up) ||
      block->dense.n != hidden || block->up.n % 2 != 0 ||
      !mindglm::ReadLinear(params, ndims, shapes, down, format[2], block->up.n / 2, &block->down) ||
      block->down.n != hidden)
    return 2;
  return 0;
}

// out = h1 + down(swiglu(up(rms_norm(h1)))) with h1 = h + dense(attn), for `tokens` rows.
void RunMlpBlock(const MlpBlock& block, const float* attn, const float* h, int64_t tokens, float* out) {
  const int64_t hidden = block.dense.n, ffn = block.down.k;
  thread_local std::vector<float> normed, fused, active, down;
  for (int64_t first = 0; first < tokens; first += kChunk) {
    const int64_t rows = std::min(kChunk, tokens - first), cells = rows * hidden;
    float* h1 = out + first * hidden;
    const float* residual = h + first * hidden;
    mindglm::LinearForward(block.dense, attn + first * block.dense.k, rows, h1);
    for (int64_t i = 0; i < cells; ++i) h1[i] = residual[i] + h1[i];
    normed.resize(cells);
    mindglm::RmsNormRows(h1, block.norm, block.eps, rows, hidden, normed.data());
    fused.resize(rows * 2 * ffn);
    mindglm::LinearForward(block.up, normed.data(), rows, fused.data());
    active.resize(rows * ffn);
    mindglm::SwiGLURows(fused.data(), rows, ffn, active.data());
    down.resize(cells);
    mindglm::LinearForward(block.down, active.data(), rows, down.data());
    for (int64_t i = 0; i < cells; ++i) h1[i] = h1[i] + down[i];
  }
}

}  // namespace

extern "C" {
int MindglmAttentionInput(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  if (nparam != 14 || ndims[0] != 2 || ndims[3] != 1 || shapes[3][0] != 1) return 1;
  const int64_t tokens = shapes[0][0], hidden = shapes[0][1];
  const float* norm;
  float eps;
  if (int status = mindglm::ReadNorm(params, ndims, shapes, 1, hidden, &norm, &eps)) return status;
  mindglm::LinearWeights qkv;
  if (!mindglm::ReadLinear(params, ndims, shapes, 4, *static_cast<const int32_t*>(params[3]), hidden, &qkv)) return 2;
  mindglm::HeadLayout layout;
  if (int status = mindglm::ReadHeadLayout(params, ndims, shapes, 7, 11, tokens, qkv.n, &layout)) return status;
  const float* h = static_cast<const float*>(params[0]);
  float* q = static_cast<float*>(params[11]);
  float* k = static_cast<float*>(params[12]);
  float* v = static_cast<float*>(params[13]);
  const int64_t q_width = layout.heads * layout.dim, kv_width = layout.kv_heads * layout.dim;
  thread_local std::vector<float> normed, fused;
  for (int64_t first = 0; first < tokens; first += kChunk) {
    const int64_t rows = std::min(kChunk, tokens - first);
    normed.resize(rows * hidden);
    mindglm::RmsNormRows(h + first * hidden, norm, eps, rows, hidden, normed.data());
    fused.resize(rows * qkv.n);
    mindglm::LinearForward(qkv, normed.data(), rows, fused.data());
    mindglm::HeadLayout chunk = layout;
    chunk.cos += first * layout.rotary;
    chunk.sin += first * layout.rotary;
    mindglm::SplitRotateHeads(fused.data(), rows, chunk, q + first * q_width, k + first * kv_width,
                              v + first * kv_width);
  }
  return 0;
}

int MindglmLayerOutput(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  if (nparam != 20 || ndims[19] != 2) return 1;
  mindglm::CacheAttention attention;
  if (int status = mindglm::ReadCacheAttention(params, ndims, shapes, &attention)) return status;
  const int64_t tokens = attention.batch * attention.queries, width = attention.heads * attention.dim;
  MlpBlock block;
  if (int status = ReadMlpBlock(params, ndims, shapes, 6, tokens, width, &block)) return status;
  if (shapes[19][0] != tokens || shapes[19][1] != block.dense.n) return 2;
  thread_local std::vector<float> attended;
  attended.resize(tokens * width);
  attention.out = attended.data();
  mindglm::Attend(attention);
  RunMlpBlock(block, attended.data(), static_cast<const float*>(params[6]), tokens, static_cast<float*>(params[19]));
  return 0;
}
}
