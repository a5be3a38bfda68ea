// Paged attention for rebuild-at-read checkpoints on CPU: the cache holds, per token and KV head, a
// thin pre-RoPE latent c (R wide) and the value (D wide) in vLLM's logical view
// [num_blocks, H_kv, block_size, R + D]; the key is rebuilt at read time as k = A^T c (D wide) with
// the layer's expansion table [H_kv, D, R] and rotated at its position (NeoX layout, the source's
// RoPE; cos/sin come precomputed as [max_pos, H_kv, D / 2] tables), then attended by the source's
// own D-wide query (which arrives rotated).
//
// Work items are (request, KV head, tile of <= kQueryTile query tokens), spread over ATen's
// intra-op thread pool. For every block the item needs, it expands and rotates the whole page ONCE
// for all G = H / H_kv query heads of the group and all query tokens of its tile (a small
// [n, R] x [R, D] product), converts the values to fp32 once, then runs the dot products and an
// online (flash-style) softmax. One code path covers decode, prefill, chunked prefill and
// prefix-cache hits: with kv_len cached tokens (new ones included) and q_len new queries, query i
// sees keys 0 .. kv_len - q_len + i.
//
// The loops are written for the compiler's auto-vectorizer (`omp simd`, contiguous inner dims);
// rebuild_kernel.py adds -mavx2 -mfma when torch reports AVX2. Dtypes: float32, bfloat16, float16
// (query, cache and output share one dtype); tables are float32; all arithmetic is fp32.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace thinkeys_rebuild {
namespace {

constexpr int kQueryTile = 64;  // query tokens per work item in a prefill

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }

template <typename T>
struct Problem {
  const T* query;  // [T, H, D]
  int64_t q_tok, q_head;
  const T* cache;  // [num_blocks, H_kv, block_size, R + D]
  int64_t c_block, c_head, c_tok;
  T* out;  // [T, H, D]
  int64_t o_tok, o_head;
  const float* expand_t;  // [H_kv, R, D]: the expansion table transposed (contiguous over D)
  const float* cos;  // [max_pos, H_kv, D / 2]
  const float* sin;
  const int32_t* block_table;
  int64_t bt_stride;
  const int32_t* qsl;
  const int32_t* lens;
  int H_kv, G, R, D, block_size;
  float scale;
};

struct WorkItem {
  int req, head, q0, q1;
};

struct Scratch {
  std::vector<float> q, acc, m, l, k, v, s;
};

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

template <typename T>
void attend_tile(const Problem<T>& p, const WorkItem& w, Scratch& s) {
  const int G = p.G, R = p.R, D = p.D, half = D / 2, bs = p.block_size;
  const int q_start = p.qsl[w.req], q_len = p.qsl[w.req + 1] - q_start, kv_len = p.lens[w.req];
  const int ctx = kv_len - q_len;
  const int n_tok = w.q1 - w.q0, rows = n_tok * G;
  s.q.resize(size_t(rows) * D);
  s.acc.assign(size_t(rows) * D, 0.f);
  s.m.assign(rows, -std::numeric_limits<float>::infinity());
  s.l.assign(rows, 0.f);
  s.k.resize(size_t(bs) * D);
  s.v.resize(size_t(bs) * D);
  s.s.resize(bs);
  // rows: token-major, head within the group minor (row = t * G + j)
  for (int t = 0; t < n_tok; ++t)
    for (int j = 0; j < G; ++j) {
      const T* src = p.query + int64_t(q_start + w.q0 + t) * p.q_tok + int64_t(w.head * G + j) * p.q_head;
      float* dst = s.q.data() + size_t(t * G + j) * D;
      for (int e = 0; e < D; ++e) dst[e] = to_f32(src[e]) * p.scale;
    }
  const float* table = p.expand_t + int64_t(w.head) * R * D;  // [R, D]
  const int kv_end = ctx + w.q1;  // keys the last token of the tile sees: 0 .. kv_end - 1
  const int32_t* blocks = p.block_table + int64_t(w.req) * p.bt_stride;
  for (int b0 = 0; b0 < kv_end; b0 += bs) {
    const int n = std::min(bs, kv_end - b0);
    const T* page = p.cache + int64_t(blocks[b0 / bs]) * p.c_block + int64_t(w.head) * p.c_head;
    // expand: K[i] = sum_e c_i[e] * table[e]  ([n, R] x [R, D]), values to fp32
    for (int i = 0; i < n; ++i) {
      const T* slot = page + int64_t(i) * p.c_tok;
      float* k = s.k.data() + size_t(i) * D;
      float* v = s.v.data() + size_t(i) * D;
#pragma omp simd
      for (int e = 0; e < D; ++e) k[e] = 0.f;
      for (int e = 0; e < R; ++e) {
        const float c = to_f32(slot[e]);
        const float* row = table + size_t(e) * D;
#pragma omp simd
        for (int f = 0; f < D; ++f) k[f] += c * row[f];
      }
      // rotate at position b0 + i (NeoX: dim f pairs with f + half)
      const size_t rope = (size_t(b0 + i) * p.H_kv + w.head) * half;
      const float* cs = p.cos + rope;
      const float* sn = p.sin + rope;
#pragma omp simd
      for (int f = 0; f < half; ++f) {
        const float x1 = k[f], x2 = k[f + half];
        k[f] = x1 * cs[f] - x2 * sn[f];
        k[f + half] = x2 * cs[f] + x1 * sn[f];
      }
#pragma omp simd
      for (int f = 0; f < D; ++f) v[f] = to_f32(slot[R + f]);
    }
    // scores, online softmax and P.V for every row of the tile
    for (int t = 0; t < n_tok; ++t) {
      const int visible = std::min(n, ctx + w.q0 + t + 1 - b0);  // keys b0 .. b0 + visible - 1
      if (visible <= 0) continue;
      for (int j = 0; j < G; ++j) {
        const int row = t * G + j;
        const float* q = s.q.data() + size_t(row) * D;
        float mx = s.m[row];
        for (int i = 0; i < visible; ++i) {
          const float* k = s.k.data() + size_t(i) * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int f = 0; f < D; ++f) dot += q[f] * k[f];
          s.s[i] = dot;
          mx = std::max(mx, dot);
        }
        const float correction = std::exp(s.m[row] - mx);  // exp(-inf) = 0 on the first block
        float* acc = s.acc.data() + size_t(row) * D;
        float sum = s.l[row] * correction;
#pragma omp simd
        for (int f = 0; f < D; ++f) acc[f] *= correction;
        for (int i = 0; i < visible; ++i) {
          const float pr = std::exp(s.s[i] - mx);
          sum += pr;
          const float* v = s.v.data() + size_t(i) * D;
#pragma omp simd
          for (int f = 0; f < D; ++f) acc[f] += pr * v[f];
        }
        s.m[row] = mx;
        s.l[row] = sum;
      }
    }
  }
  for (int t = 0; t < n_tok; ++t)
    for (int j = 0; j < G; ++j) {
      const int row = t * G + j;
      const float inv = 1.f / s.l[row];
      T* dst = p.out + int64_t(q_start + w.q0 + t) * p.o_tok + int64_t(w.head * G + j) * p.o_head;
      const float* acc = s.acc.data() + size_t(row) * D;
      for (int f = 0; f < D; ++f) dst[f] = static_cast<T>(acc[f] * inv);
    }
}

void check_host_index(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dim");
}

template <typename F>
void dispatch_dtype(at::ScalarType type, const char* name, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", type, " (float32, bfloat16, float16)");
  }
}

void paged_attention(
    const at::Tensor& query,  // [T, H, D]
    const at::Tensor& kv_cache,  // [num_blocks, H_kv, block_size, R + D]
    const at::Tensor& expand_t,  // [H_kv, R, D] float32, contiguous (the expansion table A^T, transposed)
    const at::Tensor& cos,  // [max_pos, H_kv, D / 2] float32, contiguous
    const at::Tensor& sin,
    const at::Tensor& block_table,  // [num_reqs, max_blocks] int32
    const at::Tensor& query_start_loc,  // [num_reqs + 1] int32
    const at::Tensor& seq_lens,  // [num_reqs] int32
    double scale,
    const at::Tensor& output) {  // [T, H, D]
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 4 && output.dim() == 3 && expand_t.dim() == 3 && cos.dim() == 3,
              "expected query [T, H, D], kv_cache [blocks, H_kv, block_size, R + D], expand_t [H_kv, R, D], cos/sin [P, H_kv, D/2], output [T, H, D]");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() && output.scalar_type() == kv_cache.scalar_type(),
              "query, kv_cache and output must share one dtype");
  TORCH_CHECK(expand_t.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "expand_t, cos and sin must be float32");
  TORCH_CHECK(expand_t.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes(),
              "expand_t, cos and sin must be contiguous (cos and sin of one shape)");
  TORCH_CHECK(query.stride(-1) == 1 && kv_cache.stride(-1) == 1 && output.stride(-1) == 1, "the channel dim of query, kv_cache and output must be contiguous");
  check_host_index(block_table, "block_table", 2);
  check_host_index(query_start_loc, "query_start_loc", 1);
  check_host_index(seq_lens, "seq_lens", 1);
  const int64_t H = query.size(1), D = query.size(2), H_kv = kv_cache.size(1), R = expand_t.size(1);
  const int64_t block_size = kv_cache.size(2);
  TORCH_CHECK(D % 2 == 0, "D must be even (RoPE pairs)");
  TORCH_CHECK(kv_cache.size(3) == R + D, "kv_cache rows hold ", kv_cache.size(3), " channels, expected R + D = ", R + D);
  TORCH_CHECK(expand_t.size(0) == H_kv && expand_t.size(2) == D, "expand_t must be [H_kv, R, D]");
  TORCH_CHECK(cos.size(1) == H_kv && cos.size(2) == D / 2, "cos/sin must be [P, H_kv, D / 2]");
  TORCH_CHECK(H % H_kv == 0, H, " query heads cannot share ", H_kv, " KV heads");
  TORCH_CHECK(output.size(1) == H && output.size(2) == D, "output must be [T, H, D]");
  const int64_t num_reqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_reqs + 1 && block_table.size(0) >= num_reqs, "query_start_loc / block_table do not match ", num_reqs, " requests");

  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int64_t max_blocks = block_table.size(1);
  std::vector<WorkItem> items;
  for (int64_t i = 0; i < num_reqs; ++i) {
    const int q_len = qsl[i + 1] - qsl[i];
    if (q_len <= 0) continue;  // padding request
    TORCH_CHECK(qsl[i + 1] <= query.size(0) && qsl[i + 1] <= output.size(0), "request ", i, " reaches past the ", query.size(0), " query tokens");
    TORCH_CHECK(lens[i] >= q_len, "request ", i, ": seq_len ", lens[i], " < query length ", q_len);
    TORCH_CHECK((lens[i] + block_size - 1) / block_size <= max_blocks, "request ", i, ": seq_len ", lens[i], " needs more than ", max_blocks, " blocks");
    TORCH_CHECK(lens[i] <= cos.size(0), "request ", i, ": seq_len ", lens[i], " exceeds the ", cos.size(0), " positions of the cos/sin tables");
    const int tile = q_len == 1 ? 1 : kQueryTile;
    for (int64_t h = 0; h < H_kv; ++h)
      for (int q0 = 0; q0 < q_len; q0 += tile) items.push_back({int(i), int(h), q0, std::min(q_len, q0 + tile)});
  }
  if (items.empty()) return;

  dispatch_dtype(kv_cache.scalar_type(), "thinkeys_rebuild::paged_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    Problem<scalar_t> p{
        query.data_ptr<scalar_t>(), query.stride(0), query.stride(1),
        kv_cache.data_ptr<scalar_t>(), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        output.data_ptr<scalar_t>(), output.stride(0), output.stride(1),
        expand_t.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
        block_table.data_ptr<int32_t>(), block_table.stride(0),
        qsl, lens,
        int(H_kv), int(H / H_kv), int(R), int(D), int(block_size), float(scale)};
    at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
      Scratch& s = thread_scratch();
      for (int64_t k = begin; k < end; ++k) attend_tile(p, items[k], s);
    });
  });
}

}  // namespace
}  // namespace thinkeys_rebuild

TORCH_LIBRARY(thinkeys_rebuild, m) {
  m.def("paged_attention(Tensor query, Tensor kv_cache, Tensor expand_t, Tensor cos, Tensor sin, Tensor block_table, Tensor query_start_loc, Tensor seq_lens, float scale, Tensor(a!) output) -> ()");
}

TORCH_LIBRARY_IMPL(thinkeys_rebuild, CPU, m) {
  m.impl("paged_attention", &thinkeys_rebuild::paged_attention);
}
