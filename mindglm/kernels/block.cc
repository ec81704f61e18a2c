// A ChatGLM2/3 layer's cached step, for MindSpore's CPU backend (ops.Custom, func_type="aot"),
// float32: two calls around the layer's KV cache write (mindglm/fused.py KernelBlock), or the
// whole network's step in one call that writes the caches itself (KernelStackStep).
//
// A decode step of the `small` model spent as long in MindSpore's runtime around its ~120 ops as
// in its matmuls: every op costs its launch, its output allocation and its hand-over to the next
// whatever its size. And a compiled prefill keeps every op's output for the graph's life (the
// 6B model's 64-token prefill: ~490 MB). The fused norm, rotary and attention kernels brought a
// layer to ~13 ops; these chain the same steps (layer.h) inside one op each, leaving a layer four
// in decode and prefill alike: the input block, the cache's two in-place writes, the output block.
// Those four still cost more than their work: each op launched after a kernel has streamed its
// weights through the caches finds MindSpore's own state evicted (a launch took 57 us after a
// 40 MB kernel against 7 after a small one, measured with a stub kernel), so the network call runs
// every layer, and the embedding, rotary, mask and output layer around them, in one launch.
//
//   MindglmAttentionInput(h [T, H], format [1] int32, norm [H], eps [1], w, scale [N], bias [N],
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
//   MindglmNetworkStep(input_ids [B, S] int32, position_ids [B, 1, S] int32, key_valid [B, K] int32,
//                      query_first [B, S] int32, query_last [B, S] int32, slot_mapping [T] int32,
//                      kv_slots [B, K] int32, logits_index [n] or [steps, B] int32, formats [2] int32
//                      (embedding: float16 or float32; output layer), embedding [V, H],
//                      cos_table [P, R], sin_table [P, R], partner [R] int32, sign [R], final norm [H],
//                      eps [1], output (w, scale, bias), rounded output [V', H] int16 or [1, 1],
//                      then for each layer: norm [H], eps [1], qkv (w, scale, bias), keys [N, KV, D],
//                      values [N, KV, D], scales [2], formats [4] int32 (qkv, dense, up, down),
//                      dense (w, scale, bias), norm [H], eps [1], up (w, scale, bias),
//                      down (w, scale, bias))
//       -> logits [steps * n, V'] (V' the output layer's rows), fed [steps, n] (float32 token ids)
//     the whole cached step of the network (GLMTransformer's construct, KernelStackStep): the
//     tokens' embedding rows, their rotary rows, the mask (layers.attention_mask: query (b, s)
//     sees key k when key_valid[b, k] and query_first <= k <= query_last); then layer by layer the
//     input block, token t's k and v written to slot slot_mapping[t] of the layer's keys and
//     values (in place: the Python side declares them written, as ScatterUpdate does), the output
//     block; last, the rows logits_index names through the final norm and the output layer; fed[0]
//     holds those rows' input tokens. Every argument of every layer is checked before anything is
//     written.
//     With logits_index [steps, B] (every row b of it 0..B-1), one query a row (S = 1): `steps`
//     greedy decode steps in one call, each after the first feeding every row the argmax of its
//     previous logits (the first largest) at position + 1 and slot_mapping + 1, its key admitted at
//     window index query_last + 1 (kv_slots must name that slot there); fed[k] holds the tokens
//     step k was fed. The engine keeps a row's step k only while its sampler chose what the
//     kernel fed (mindglm/engine), so every token is the one a step at a time would give.
//     There a float32 output layer with its bfloat16 copy (`rounded output`, [V', H]; [1, 1]: none)
//     gives each logits row as LinearArgmaxRows does (layer.h): its first largest logit, and every
//     logit that could be it, exactly those of the full layer, the others approximations below it.
//
// Each linear layer takes (w, scale, bias) with its format's index in mindglm/quantize.py's
// FORMATS (float layers pass a unit scale and zero bias, which change no bit). Tokens go through
// in chunks of kChunk rows (a multiple of 4, the linear kernel's row block, so every row's sums
// are those of the unfused layers), which bounds the scratch a long prompt needs.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <vector>

#include "layer.h"

namespace {

using mindglm::LinearWeights;

constexpr int64_t kChunk = 32;

// ------------------------------------------------------------------ the input block
struct InputBlock {
  const float* norm;
  float eps;
  LinearWeights qkv;
};

// The norm (params[norm], eps at norm + 1) and the qkv layer (params[qkv..qkv+2]) for inputs
// `hidden` wide; 0 or an error code.
int ReadInputBlock(void** params, int* ndims, int64_t** shapes, int norm, int qkv, int32_t format, int64_t hidden,
                   InputBlock* block) {
  if (int status = mindglm::ReadNorm(params, ndims, shapes, norm, hidden, &block->norm, &block->eps)) return status;
  return mindglm::ReadLinear(params, ndims, shapes, qkv, format, hidden, &block->qkv) ? 0 : 2;
}

// q, k, v of `tokens` rows of h: rms_norm, qkv, split into heads and rotated.
void RunInputBlock(const InputBlock& block, const mindglm::HeadLayout& layout, const float* h, int64_t tokens,
                   int64_t hidden, float* q, float* k, float* v) {
  const int64_t q_width = layout.heads * layout.dim, kv_width = layout.kv_heads * layout.dim;
  thread_local std::vector<float> normed, fused;
  for (int64_t first = 0; first < tokens; first += kChunk) {
    const int64_t rows = std::min(kChunk, tokens - first);
    normed.resize(rows * hidden);
    mindglm::RmsNormRows(h + first * hidden, block.norm, block.eps, rows, hidden, normed.data());
    fused.resize(rows * block.qkv.n);
    mindglm::LinearForward(block.qkv, normed.data(), rows, fused.data());
    mindglm::HeadLayout chunk = layout;
    chunk.cos += first * layout.rotary;
    chunk.sin += first * layout.rotary;
    mindglm::SplitRotateHeads(fused.data(), rows, chunk, q + first * q_width, k + first * kv_width,
                              v + first * kv_width);
  }
}

// ------------------------------------------------------------------ the output block
struct MlpBlock {
  LinearWeights dense, up, down;
  const float* norm;
  float eps;
};

// The layers after the attention, at params[first..first+10] (dense (3), norm and eps, up (3),
// down (3)), in formats[0..2]; 0 or an error code.
int ReadMlpBlock(void** params, int* ndims, int64_t** shapes, int first, const int32_t* formats, int64_t hidden,
                 int64_t attn_width, MlpBlock* block) {
  const int dense = first, norm = first + 3, up = first + 5, down = first + 8;
  if (int status = mindglm::ReadNorm(params, ndims, shapes, norm, hidden, &block->norm, &block->eps)) return status;
  if (!mindglm::ReadLinear(params, ndims, shapes, dense, formats[0], attn_width, &block->dense) ||
      !mindglm::ReadLinear(params, ndims, shapes, up, formats[1], hidden, &block->up) ||
      block->dense.n != hidden || block->up.n % 2 != 0 ||
      !mindglm::ReadLinear(params, ndims, shapes, down, formats[2], block->up.n / 2, &block->down) ||
      block->down.n != hidden)
    return 2;
  return 0;
}

// out = h1 + down(swiglu(up(rms_norm(h1)))) with h1 = h + dense(attn), for `tokens` rows (out
// must not be h).
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

// ------------------------------------------------------------------ the stack
// One layer of the stack (MindglmNetworkStep), read from its 20 arguments.
struct StackLayer {
  InputBlock input;
  mindglm::HeadLayout layout;
  mindglm::CacheAttention attention;
  MlpBlock mlp;
  float *keys, *values;
};

constexpr int kStackShared = 8, kStackPerLayer = 20;

int ReadStackLayer(void** params, int* ndims, int64_t** shapes, int g, int64_t tokens, int64_t hidden,
                   StackLayer* layer) {
  const int keys = g + 5, scales = g + 7, formats = g + 8;
  if (ndims[formats] != 1 || shapes[formats][0] != 4 || ndims[keys] != 3) return 1;
  const int32_t* format = static_cast<const int32_t*>(params[formats]);
  if (int status = ReadInputBlock(params, ndims, shapes, g, g + 2, format[0], hidden, &layer->input)) return status;
  const int64_t kv_heads = shapes[keys][1], dim = shapes[keys][2], width = layer->input.qkv.n;
  if (dim < 1 || width % dim != 0 || width / dim <= 2 * kv_heads) return 2;
  mindglm::HeadLayout& layout = layer->layout;
  layout.heads = width / dim - 2 * kv_heads, layout.kv_heads = kv_heads, layout.dim = dim;
  if (int status = mindglm::ReadRotaryTables(params, ndims, shapes, 1, tokens, dim, &layout)) return status;
  if (int status = mindglm::ReadCacheSlots(params, ndims, shapes, keys, 6, 7, scales, layout.heads, dim,
                                           &layer->attention))
    return status;
  if (layer->attention.batch * layer->attention.queries != tokens) return 2;
  const int32_t* slot_mapping = static_cast<const int32_t*>(params[5]);
  for (int64_t t = 0; t < tokens; ++t)
    if (slot_mapping[t] < 0 || slot_mapping[t] >= layer->attention.slot_count) return 3;
  layer->keys = static_cast<float*>(params[keys]);
  layer->values = static_cast<float*>(params[keys + 1]);
  return ReadMlpBlock(params, ndims, shapes, g + 9, format + 1, hidden, layout.heads * dim, &layer->mlp);
}

// Token t's k and v rows (`width` floats each) into slot slots[t] of keys and values.
void WriteCache(const float* k, const float* v, const int32_t* slots, int64_t tokens, int64_t width, float* keys,
                float* values) {
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(keys + int64_t(slots[t]) * width, k + t * width, sizeof(float) * width);
    std::memcpy(values + int64_t(slots[t]) * width, v + t * width, sizeof(float) * width);
  }
}

// Every layer in turn, from the arguments params[0, nparam) (h [T, H], cos [T, R], sin [T, R],
// partner, sign, slot_mapping [T], kv_slots [B, K], allowed [B, S, K] bool, then 20 a layer; the
// network step lays them out from its own), into out [T, H]; 0, or the error code, before any
// cache is written.
int RunLayerStack(int nparam, void** params, int* ndims, int64_t** shapes, float* out) {
  const int count = (nparam - kStackShared) / kStackPerLayer;
  if (count < 1 || nparam != kStackShared + count * kStackPerLayer || ndims[0] != 2 || ndims[5] != 1) return 1;
  const int64_t tokens = shapes[0][0], hidden = shapes[0][1];
  if (shapes[5][0] != tokens) return 2;
  thread_local std::vector<StackLayer> layers;
  layers.resize(count);
  for (int l = 0; l < count; ++l)   // every layer checked before any cache is written
    if (int status = ReadStackLayer(params, ndims, shapes, kStackShared + l * kStackPerLayer, tokens, hidden, &layers[l]))
      return status;
  const int32_t* slot_mapping = static_cast<const int32_t*>(params[5]);
  thread_local std::vector<float> q, k, v, attended, ping, pong;
  const float* h = static_cast<const float*>(params[0]);
  for (int l = 0; l < count; ++l) {
    StackLayer& layer = layers[l];
    const int64_t q_width = layer.layout.heads * layer.layout.dim, kv_width = layer.layout.kv_heads * layer.layout.dim;
    q.resize(tokens * q_width), attended.resize(tokens * q_width);
    k.resize(tokens * kv_width), v.resize(tokens * kv_width);
    RunInputBlock(layer.input, layer.layout, h, tokens, hidden, q.data(), k.data(), v.data());
    WriteCache(k.data(), v.data(), slot_mapping, tokens, kv_width, layer.keys, layer.values);
    layer.attention.q = q.data();
    layer.attention.out = attended.data();
    mindglm::Attend(layer.attention);
    std::vector<float>& next = l % 2 ? pong : ping;   // never h: the MLP block reads h as it writes
    float* to = out;
    if (l + 1 < count) {
      next.resize(tokens * hidden);
      to = next.data();
    }
    RunMlpBlock(layer.mlp, attended.data(), h, tokens, to);
    h = to;
  }
  return 0;
}

// MindglmNetworkStep's arguments before the layers', and the ranks of those up to the tables.
constexpr int kNetworkShared = 20;
constexpr int kNetworkRanks[] = {2, 3, 2, 2, 2, 1, 2, 1, 1, 2, 2, 2};

// What a step of MindglmNetworkStep reads before its layers, checked.
struct NetworkInputs {
  int64_t batch, seq, tokens, keys, vocab, hidden, positions, rotary, logit_rows;
  const int32_t* formats;
  const float* final_norm;
  float eps;
  LinearWeights head;
  const uint16_t* rounded_head;   // [head.n, hidden], or null
};

// The arguments of one step (logits_index [n], the one output logits [n, V']) up to the layers';
// 0, or the error code. Nothing is written.
int ReadNetworkInputs(int nparam, void** params, int* ndims, int64_t** shapes, NetworkInputs* in) {
  const int count = (nparam - kNetworkShared - 1) / kStackPerLayer, out = nparam - 1;
  if (count < 1 || nparam != kNetworkShared + count * kStackPerLayer + 1) return 1;
  for (int i = 0; i < int(std::size(kNetworkRanks)); ++i)   // the inputs up to the tables; the rest their readers check
    if (ndims[i] != kNetworkRanks[i]) return 1;
  if (ndims[out] != 2) return 1;
  const int64_t batch = shapes[0][0], seq = shapes[0][1], tokens = batch * seq, keys = shapes[2][1];
  const int64_t vocab = shapes[9][0], hidden = shapes[9][1], positions = shapes[10][0], rotary = shapes[10][1];
  const int64_t logit_rows = shapes[7][0];
  for (int i : {3, 4})
    if (shapes[i][0] != batch || shapes[i][1] != seq) return 2;
  if (shapes[1][0] != batch || shapes[1][1] != 1 || shapes[1][2] != seq || shapes[2][0] != batch ||
      shapes[5][0] != tokens || shapes[6][0] != batch || shapes[6][1] != keys || shapes[8][0] != 2 ||
      shapes[11][0] != positions || shapes[11][1] != rotary)
    return 2;
  const int32_t* formats = static_cast<const int32_t*>(params[8]);
  if (formats[0] != mindglm::kF16 && formats[0] != mindglm::kF32) return 2;
  *in = NetworkInputs{batch, seq, tokens, keys, vocab, hidden, positions, rotary, logit_rows, formats};
  if (int status = mindglm::ReadNorm(params, ndims, shapes, 14, hidden, &in->final_norm, &in->eps)) return status;
  if (!mindglm::ReadLinear(params, ndims, shapes, 16, formats[1], hidden, &in->head) || shapes[out][0] != logit_rows ||
      shapes[out][1] != in->head.n)
    return 2;
  in->rounded_head = nullptr;
  if (ndims[19] != 2) return 1;
  if (shapes[19][0] == in->head.n && shapes[19][1] == hidden)
    in->rounded_head = static_cast<const uint16_t*>(params[19]);
  else if (shapes[19][0] != 1 || shapes[19][1] != 1)
    return 2;
  const int32_t *ids = static_cast<const int32_t*>(params[0]), *position = static_cast<const int32_t*>(params[1]);
  const int32_t* logits_index = static_cast<const int32_t*>(params[7]);
  for (int64_t t = 0; t < tokens; ++t)
    if (ids[t] < 0 || ids[t] >= vocab || position[t] < 0 || position[t] >= positions) return 3;
  for (int64_t i = 0; i < logit_rows; ++i)
    if (logits_index[i] < 0 || logits_index[i] >= tokens) return 3;
  return 0;
}

// One step of MindglmNetworkStep: its arguments with logits_index [n] and the one output logits
// [n, V']; `greedy`: the logits of a greedy step (through the rounded head, if there is one).
int NetworkStep(int nparam, void** params, int* ndims, int64_t** shapes, bool greedy) {
  NetworkInputs in;
  if (int status = ReadNetworkInputs(nparam, params, ndims, shapes, &in)) return status;
  const int count = (nparam - kNetworkShared - 1) / kStackPerLayer, out = nparam - 1;
  const int64_t batch = in.batch, seq = in.seq, tokens = in.tokens, keys = in.keys, hidden = in.hidden;
  const int64_t rotary = in.rotary, logit_rows = in.logit_rows;
  const int32_t *ids = static_cast<const int32_t*>(params[0]), *position = static_cast<const int32_t*>(params[1]);
  const int32_t* logits_index = static_cast<const int32_t*>(params[7]);

  // The layers' inputs: token rows of the embedding, rotary rows of the tables, the mask.
  thread_local std::vector<float> h, cos, sin, stacked, picked, normed;
  thread_local std::vector<uint8_t> allowed;
  h.resize(tokens * hidden), cos.resize(tokens * rotary), sin.resize(tokens * rotary);
  for (int64_t t = 0; t < tokens; ++t) {
    mindglm::DenseRow(mindglm::Format(in.formats[0]), params[9], ids[t], hidden, h.data() + t * hidden);
    const int64_t at = int64_t(position[t]) * rotary;
    std::memcpy(cos.data() + t * rotary, static_cast<const float*>(params[10]) + at, sizeof(float) * rotary);
    std::memcpy(sin.data() + t * rotary, static_cast<const float*>(params[11]) + at, sizeof(float) * rotary);
  }
  const int32_t *key_valid = static_cast<const int32_t*>(params[2]), *first = static_cast<const int32_t*>(params[3]),
                *last = static_cast<const int32_t*>(params[4]);
  allowed.resize(tokens * keys);
  for (int64_t q = 0; q < tokens; ++q)   // query q = (b, s) sees key k of row b: first <= k <= last, k real
    for (int64_t k = 0; k < keys; ++k)
      allowed[q * keys + k] = key_valid[q / seq * keys + k] != 0 && first[q] <= k && k <= last[q];

  // The layer stack's arguments: those inputs, then every layer's as given.
  int64_t h_shape[] = {tokens, hidden}, table_shape[] = {tokens, rotary}, mask_shape[] = {batch, seq, keys};
  const int stack_params = kStackShared + count * kStackPerLayer;
  thread_local std::vector<void*> view;
  thread_local std::vector<int> view_ndims;
  thread_local std::vector<int64_t*> view_shapes;
  view.assign({h.data(), cos.data(), sin.data(), params[12], params[13], params[5], params[6], allowed.data()});
  view_ndims.assign({2, 2, 2, ndims[12], ndims[13], ndims[5], ndims[6], 3});
  view_shapes.assign({h_shape, table_shape, table_shape, shapes[12], shapes[13], shapes[5], shapes[6], mask_shape});
  view.insert(view.end(), params + kNetworkShared, params + out);
  view_ndims.insert(view_ndims.end(), ndims + kNetworkShared, ndims + out);
  view_shapes.insert(view_shapes.end(), shapes + kNetworkShared, shapes + out);
  stacked.resize(tokens * hidden);
  if (int status = RunLayerStack(stack_params, view.data(), view_ndims.data(), view_shapes.data(), stacked.data()))
    return status;

  // The head: the rows asked for, normed, through the output layer.
  picked.resize(logit_rows * hidden), normed.resize(logit_rows * hidden);
  for (int64_t i = 0; i < logit_rows; ++i)
    std::memcpy(picked.data() + i * hidden, stacked.data() + int64_t(logits_index[i]) * hidden, sizeof(float) * hidden);
  mindglm::RmsNormRows(picked.data(), in.final_norm, in.eps, logit_rows, hidden, normed.data());
  float* logits = static_cast<float*>(params[out]);
  if (!greedy || !in.rounded_head ||
      !mindglm::LinearArgmaxRows(in.head, in.rounded_head, normed.data(), logit_rows, logits))
    mindglm::LinearForward(in.head, normed.data(), logit_rows, logits);
  return 0;
}

}  // namespace

extern "C" {
int MindglmAttentionInput(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  if (nparam != 14 || ndims[0] != 2 || ndims[1] != 1 || shapes[1][0] != 1) return 1;
  const int64_t tokens = shapes[0][0], hidden = shapes[0][1];
  InputBlock block;
  if (int status = ReadInputBlock(params, ndims, shapes, 2, 4, *static_cast<const int32_t*>(params[1]), hidden, &block))
    return status;
  mindglm::HeadLayout layout;
  if (int status = mindglm::ReadHeadLayout(params, ndims, shapes, 7, 11, tokens, block.qkv.n, &layout)) return status;
  RunInputBlock(block, layout, static_cast<const float*>(params[0]), tokens, hidden, static_cast<float*>(params[11]),
                static_cast<float*>(params[12]), static_cast<float*>(params[13]));
  return 0;
}

int MindglmLayerOutput(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  if (nparam != 20 || ndims[19] != 2 || ndims[6] != 2 || ndims[7] != 1 || shapes[7][0] != 3) return 1;
  mindglm::CacheAttention attention;
  if (int status = mindglm::ReadCacheAttention(params, ndims, shapes, &attention)) return status;
  const int64_t tokens = attention.batch * attention.queries, width = attention.heads * attention.dim;
  const int64_t hidden = shapes[6][1];
  if (shapes[6][0] != tokens) return 2;
  MlpBlock block;
  if (int status = ReadMlpBlock(params, ndims, shapes, 8, static_cast<const int32_t*>(params[7]), hidden, width, &block))
    return status;
  if (shapes[19][0] != tokens || shapes[19][1] != hidden) return 2;
  thread_local std::vector<float> attended;
  attended.resize(tokens * width);
  attention.out = attended.data();
  mindglm::Attend(attention);
  RunMlpBlock(block, attended.data(), static_cast<const float*>(params[6]), tokens, static_cast<float*>(params[19]));
  return 0;
}

int MindglmNetworkStep(int nparam, void** params, int* ndims, int64_t** shapes, const char**, void*, void*) {
  const int logits = nparam - 2, fed_at = nparam - 1;
  if (nparam < kNetworkShared + 2 || (ndims[7] != 1 && ndims[7] != 2) || ndims[logits] != 2 || ndims[fed_at] != 2)
    return 1;
  const int64_t steps = ndims[7] == 2 ? shapes[7][0] : 1, rows = shapes[7][ndims[7] - 1], width = shapes[logits][1];
  if (shapes[logits][0] != steps * rows || shapes[fed_at][0] != steps || shapes[fed_at][1] != rows) return 2;
  // One step's arguments: logits_index [rows], logits [rows, V'] (the fed tokens are this entry's).
  int64_t index_shape[] = {rows}, logits_shape[] = {rows, width};
  thread_local std::vector<void*> view;
  thread_local std::vector<int> view_ndims;
  thread_local std::vector<int64_t*> view_shapes;
  view.assign(params, params + fed_at), view_ndims.assign(ndims, ndims + fed_at);
  view_shapes.assign(shapes, shapes + fed_at);
  view_ndims[7] = 1, view_shapes[7] = index_shape, view_shapes[logits] = logits_shape;
  float* out = static_cast<float*>(params[logits]);
  float* fed = static_cast<float*>(params[fed_at]);
  const int32_t *index = static_cast<const int32_t*>(params[7]), *ids = static_cast<const int32_t*>(params[0]);
  if (steps == 1) {
    if (int status = NetworkStep(fed_at, view.data(), view_ndims.data(), view_shapes.data(), false)) return status;
    for (int64_t i = 0; i < rows; ++i) fed[i] = float(ids[index[i]]);
    return 0;
  }
  // K decode steps (see the top): checked before the first one runs, so that none can fail later
  // (each step checks its layers before it writes a cache, and they stay as they are).
  NetworkInputs in;
  if (int status = ReadNetworkInputs(fed_at, view.data(), view_ndims.data(), view_shapes.data(), &in)) return status;
  const int64_t batch = in.batch, keys = in.keys;
  if (in.seq != 1 || rows != batch || in.head.n > in.vocab) return 2;
  const int32_t *position = static_cast<const int32_t*>(params[1]), *last = static_cast<const int32_t*>(params[4]);
  const int32_t *slot = static_cast<const int32_t*>(params[5]), *kv_slots = static_cast<const int32_t*>(params[6]);
  for (int64_t k = 0; k < steps; ++k)
    for (int64_t b = 0; b < batch; ++b)
      if (index[k * batch + b] != b) return 2;
  for (int64_t b = 0; b < batch; ++b) {
    if (last[b] < 0 || last[b] + steps > keys || position[b] + steps > in.positions) return 3;
    for (int64_t k = 1; k < steps; ++k)
      if (kv_slots[b * keys + last[b] + k] != slot[b] + k) return 2;
  }
  thread_local std::vector<int32_t> now_ids, now_position, now_valid, now_last, now_slot;
  const int32_t* key_valid = static_cast<const int32_t*>(params[2]);
  now_ids.assign(ids, ids + batch), now_position.assign(position, position + batch);
  now_valid.assign(key_valid, key_valid + batch * keys);
  now_last.assign(last, last + batch), now_slot.assign(slot, slot + batch);
  view[0] = now_ids.data(), view[1] = now_position.data(), view[2] = now_valid.data();
  view[4] = now_last.data(), view[5] = now_slot.data();
  for (int64_t k = 0; k < steps; ++k) {
    view[logits] = out + k * rows * width;
    for (int64_t b = 0; b < batch; ++b) fed[k * batch + b] = float(now_ids[b]);
    if (int status = NetworkStep(fed_at, view.data(), view_ndims.data(), view_shapes.data(), true)) return status;
    for (int64_t b = 0; k + 1 < steps && b < batch; ++b) {   // the next step's inputs (none after the last)
      const float* row = out + (k * rows + b) * width;
      now_ids[b] = int32_t(std::max_element(row, row + width) - row);   // the first largest
      now_position[b] += 1, now_slot[b] += 1, now_last[b] += 1;
      now_valid[b * keys + now_last[b]] = 1;
    }
  }
  return 0;
}
}
