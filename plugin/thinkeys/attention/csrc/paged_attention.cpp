// Paged attention over a thin-key KV cache on CPU: keys of width R, values of width D, one page
// per (block, KV head) in vLLM's logical view [num_blocks, H_kv, block_size, R + D].
//
// Why a compiled kernel: the PyTorch path (paged.py) gathers every request's blocks into a fresh
// tensor, builds masks and loops over prefills in Python. This kernel reads the paged cache in
// place and streams it once per (request, KV head): every key/value of a block is converted to
// fp32 once and used by all G = H / H_kv query heads of its group (GQA), scores use an online
// (flash-style) softmax, so nothing is materialized beyond one block of scratch per thread.
//
// Work items are (request, KV head, tile of <= kQueryTile query tokens), spread over ATen's
// intra-op thread pool (at::parallel_for, i.e. torch.get_num_threads()). One code path covers
// decode (1 query), prefill, chunked prefill and prefix-cache hits: a request with kv_len cached
// tokens (the new ones included) and q_len new queries lets query i see keys 0 .. kv_len - q_len + i.
//
// The hot loops (scores eight tokens at a time, P.V with register accumulators, bf16/fp16 -> fp32)
// have an AVX2+FMA+F16C form, compiled when kernels.py sees that torch's runtime CPU capability
// includes AVX2; every other case (other CPUs, R or D not a multiple of 8) takes plain loops written
// for the compiler's auto-vectorizer. No -march=native: the same source builds on any x86-64.
// Supported dtypes: float32, bfloat16, float16 (query, cache and output share one dtype).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace thinkeys {
namespace {

constexpr int kQueryTile = 16;  // query tokens per work item in a prefill (rows = kQueryTile * G)
constexpr int kChunk = 32;  // tokens per inner step (a multiple of 8): fp32 scratch of a chunk fits L1

// ---- element conversion -------------------------------------------------------------------------

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) {
  // bf16 is the high half of an fp32: a shift the vectorizer turns into vpmovzxwd + vpslld.
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_f32(c10::Half x) { return static_cast<float>(x); }

template <typename T>
inline T from_f32(float x) {
  return static_cast<T>(x);  // c10's conversions round to nearest even
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define THINKEYS_AVX2 1
// 8 consecutive elements as fp32
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// [sum(s0), ..., sum(s7)]: eight horizontal sums in ten instructions instead of eight reductions.
inline __m256 hsum8(__m256 s0, __m256 s1, __m256 s2, __m256 s3, __m256 s4, __m256 s5, __m256 s6, __m256 s7) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));  // per 128-bit lane: partial sums of s0..s3
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(s4, s5), _mm256_hadd_ps(s6, s7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#else
#define THINKEYS_AVX2 0
#endif

// n elements to fp32 (scalar loop the compiler vectorizes; the AVX2 path covers multiples of 8)
template <typename T>
inline void load_f32(const T* __restrict src, float* __restrict dst, int n) {
#if THINKEYS_AVX2
  if (n % 8 == 0) {
    for (int i = 0; i < n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
    return;
  }
#endif
#pragma omp simd
  for (int i = 0; i < n; ++i) dst[i] = to_f32(src[i]);
}

// out[j] = q . keys[j] for j < n; keys is [n rounded up to 8, R] fp32 (rows past n are zeros).
inline void row_scores(const float* __restrict q, const float* __restrict keys, int n, int R, float* __restrict out) {
#if THINKEYS_AVX2
  if (R % 8 == 0) {
    for (int j = 0; j < n; j += 8) {  // eight tokens at a time: eight accumulators, one hsum8
      const float* k = keys + j * R;
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
      for (int t = 0; t < R; t += 8) {
        const __m256 qt = _mm256_loadu_ps(q + t);
        s0 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(k + t), s0);
        s1 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(k + R + t), s1);
        s2 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(k + 2 * R + t), s2);
        s3 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(k + 3 * R + t), s3);
        s4 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(k + 4 * R + t), s4);
        s5 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(k + 5 * R + t), s5);
        s6 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(k + 6 * R + t), s6);
        s7 = _mm256_fmadd_ps(qt, _mm256_loadu_ps(k + 7 * R + t), s7);
      }
      _mm256_storeu_ps(out + j, hsum8(s0, s1, s2, s3, s4, s5, s6, s7));  // out has room for n rounded up to 8
    }
    return;
  }
#endif
  for (int j = 0; j < n; ++j) {
    const float* k = keys + j * R;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int r = 0; r < R; ++r) dot += q[r] * k[r];
    out[j] = dot;
  }
}

#if THINKEYS_AVX2
// acc[0 : 8 NV] += sum_j p[j] values[j, 0 : 8 NV], the accumulators held in registers.
template <int NV>
inline void pv_chunk(const float* __restrict p, const float* __restrict values, int n, int stride, float* __restrict acc) {
  __m256 a[NV];
  for (int v = 0; v < NV; ++v) a[v] = _mm256_loadu_ps(acc + 8 * v);
  for (int j = 0; j < n; ++j) {
    const __m256 pj = _mm256_broadcast_ss(p + j);
    const float* vj = values + j * stride;
    for (int v = 0; v < NV; ++v) a[v] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * v), a[v]);
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(acc + 8 * v, a[v]);
}
#endif

// acc[0 : D] += sum_{j < n} p[j] values[j]; values is [n, D] fp32.
inline void row_pv(const float* __restrict p, const float* __restrict values, int n, int D, float* __restrict acc) {
#if THINKEYS_AVX2
  if (D % 8 == 0) {
    int c = 0;
    for (; c + 64 <= D; c += 64) pv_chunk<8>(p, values + c, n, D, acc + c);
    for (; c + 32 <= D; c += 32) pv_chunk<4>(p, values + c, n, D, acc + c);
    for (; c < D; c += 8) pv_chunk<1>(p, values + c, n, D, acc + c);
    return;
  }
#endif
  for (int j = 0; j < n; ++j) {
    const float pj = p[j];
    const float* vj = values + j * D;
#pragma omp simd
    for (int c = 0; c < D; ++c) acc[c] += pj * vj[c];
  }
}

#if THINKEYS_AVX2
// exp(x) for x <= 0 (scores minus their running maximum): exp(x) = 2^n e^y with n = round(x log2 e),
// |y| <= ln(2) / 2, e^y by a degree-6 Taylor polynomial (relative error < 2e-7, below the fp32
// rounding of the sums it feeds).
inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  // keeps 2^n normal; exp(-87) ~ 1.6e-38 is 0 here
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 y = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945309f));
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

inline float hsum(__m256 v) {
  __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_add_ps(m, _mm_movehl_ps(m, m));
  m = _mm_add_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
#endif

// max(init, s[0 : n])
inline float row_max_of(const float* __restrict s, int n, float init) {
  int j = 0;
  float m = init;
#if THINKEYS_AVX2
  if (n >= 8) {
    __m256 mv = _mm256_set1_ps(init);
    for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
    m = hmax8(mv);
  }
#endif
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// s[j] = exp(s[j] - max) for j < n (every s[j] <= max); returns their sum.
inline float exp_and_sum(float* __restrict s, int n, float max) {
  int j = 0;
  float sum = 0.0f;
#if THINKEYS_AVX2
  const __m256 mv = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - max);
    sum += s[j];
  }
  return sum;
}

// Software prefetch of n cache rows of `width` elements, `stride` elements apart.
template <typename T>
inline void prefetch_rows(const T* first, int n, int64_t stride, int width) {
  constexpr int kLine = 64;
  if (stride == width) {  // contiguous rows (head-major pages): one run
    const char* p = reinterpret_cast<const char*>(first);
    const int64_t bytes = int64_t(n) * width * sizeof(T);
    for (int64_t o = 0; o < bytes; o += kLine) __builtin_prefetch(p + o, 0, 3);
    return;
  }
  for (int j = 0; j < n; ++j) {
    const char* p = reinterpret_cast<const char*>(first + j * stride);
    for (int64_t o = 0; o < int64_t(width * sizeof(T)); o += kLine) __builtin_prefetch(p + o, 0, 3);
  }
}

// ---- problem description ------------------------------------------------------------------------

template <typename T>
struct Problem {
  const T* query;  // [T, H, R], strides q_tok, q_head, 1
  int64_t q_tok, q_head;
  const T* cache;  // [num_blocks, H_kv, block_size, R + D], strides c_block, c_head, c_tok, 1
  int64_t c_block, c_head, c_tok;
  T* out;  // [T, H, D], strides o_tok, o_head, 1
  int64_t o_tok, o_head;
  const int32_t* block_table;  // [num_reqs, max_blocks]
  int64_t bt_stride;
  const int32_t* query_start_loc;  // [num_reqs + 1]
  const int32_t* seq_lens;  // [num_reqs]
  int G, R, D, block_size;
  float scale;
};

struct WorkItem {
  int req, kv_head, q_begin, q_end;  // query tokens [q_begin, q_end) of the request, 0-based
};

// Per-thread scratch, grown on demand and reused across calls.
struct Scratch {
  std::vector<float> q, scores, acc, keys, values, row_max, row_sum;
  void fit(int rows, int R, int D, int chunk) {
    auto grow = [](auto& v, size_t n) {
      if (v.size() < n) v.resize(n, 0);
    };
    grow(q, size_t(rows) * R);
    grow(scores, size_t(rows) * chunk);
    grow(acc, size_t(rows) * D);
    grow(keys, size_t(chunk) * R);
    grow(values, size_t(chunk) * D);
    grow(row_max, rows);
    grow(row_sum, rows);
  }
};

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

// ---- one work item ------------------------------------------------------------------------------

template <typename T>
void attend_tile(const Problem<T>& p, const WorkItem& w, Scratch& s) {
  const int G = p.G, R = p.R, D = p.D, BS = p.block_size;
  const int q_len = p.query_start_loc[w.req + 1] - p.query_start_loc[w.req];
  const int kv_len = p.seq_lens[w.req];
  const int context = kv_len - q_len;  // cached tokens before the first new one
  const int nq = w.q_end - w.q_begin;
  const int rows = nq * G;  // row = query token * G + head within the group
  const int64_t first_tok = int64_t(p.query_start_loc[w.req]) + w.q_begin;
  s.fit(rows, R, D, kChunk);
  float* __restrict q = s.q.data();  // [rows, R], pre-scaled
  float* __restrict scores = s.scores.data();  // [rows, kChunk]: scores, then probabilities
  float* __restrict acc = s.acc.data();  // [rows, D]: unnormalized output
  float* __restrict keys = s.keys.data();  // [kChunk, R] one chunk's keys in fp32
  float* __restrict values = s.values.data();  // [kChunk, D]
  float* __restrict row_max = s.row_max.data();
  float* __restrict row_sum = s.row_sum.data();

  for (int i = 0; i < nq; ++i) {
    for (int g = 0; g < G; ++g) {
      const T* src = p.query + (first_tok + i) * p.q_tok + int64_t(w.kv_head * G + g) * p.q_head;
      float* dst = q + (i * G + g) * R;
      load_f32(src, dst, R);
#pragma omp simd
      for (int r = 0; r < R; ++r) dst[r] *= p.scale;
    }
  }
  std::fill(acc, acc + rows * D, 0.0f);
  std::fill(row_max, row_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + rows, 0.0f);

  const int kv_end = context + w.q_end;  // the tile's last query sees keys [0, kv_end)
  const int32_t* blocks = p.block_table + int64_t(w.req) * p.bt_stride;
  for (int page_start = 0, b = 0; page_start < kv_end; page_start += BS, ++b) {
    const T* page = p.cache + int64_t(blocks[b]) * p.c_block + int64_t(w.kv_head) * p.c_head;
    const int page_len = std::min(BS, kv_end - page_start);
    for (int c0 = 0; c0 < page_len; c0 += kChunk) {  // chunks of a page, so the scratch stays in L1
      const int n = std::min(kChunk, page_len - c0);
      const int n0 = page_start + c0;  // position of the chunk's first token
      // Decode is bound by reading the cache: ask for the next chunk (on this page or the next,
      // which sits anywhere in memory) while this one is computed.
      if (c0 + kChunk < page_len) {
        prefetch_rows(page + int64_t(c0 + kChunk) * p.c_tok, std::min(kChunk, page_len - c0 - kChunk), p.c_tok, R + D);
      } else if (page_start + BS < kv_end) {
        const T* next = p.cache + int64_t(blocks[b + 1]) * p.c_block + int64_t(w.kv_head) * p.c_head;
        prefetch_rows(next, std::min(kChunk, kv_end - page_start - BS), p.c_tok, R + D);
      }
      // the chunk's keys and values in fp32, converted once for all rows of the tile
      for (int j = 0; j < n; ++j) {
        const T* row = page + int64_t(c0 + j) * p.c_tok;
        load_f32(row, keys + j * R, R);
        load_f32(row + R, values + j * D, D);
      }
      std::fill(keys + n * R, keys + (n + 7) / 8 * 8 * R, 0.0f);  // finite padding for row_scores

      for (int i = 0; i < nq; ++i) {
        const int vis = std::min(n, context + w.q_begin + i + 1 - n0);  // causal limit in this chunk
        if (vis <= 0) continue;
        for (int g = 0; g < G; ++g) {
          const int row = i * G + g;
          float* sr = scores + row * kChunk;
          row_scores(q + row * R, keys, vis, R, sr);
          // online softmax: new running maximum, probabilities, rescale of earlier sums
          const float prev_max = row_max[row];
          const float new_max = row_max_of(sr, vis, prev_max);
          const float sum = exp_and_sum(sr, vis, new_max);
          const float alpha = prev_max == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(prev_max - new_max);
          row_sum[row] = row_sum[row] * alpha + sum;
          row_max[row] = new_max;
          float* ar = acc + row * D;
          if (alpha != 1.0f) {
#pragma omp simd
            for (int c = 0; c < D; ++c) ar[c] *= alpha;
          }
          row_pv(sr, values, vis, D, ar);
        }
      }
    }
  }

  for (int i = 0; i < nq; ++i) {
    for (int g = 0; g < G; ++g) {
      const int row = i * G + g;
      const float inv = 1.0f / row_sum[row];  // > 0: every query sees at least its own key
      T* dst = p.out + (first_tok + i) * p.o_tok + int64_t(w.kv_head * G + g) * p.o_head;
      const float* ar = acc + row * D;
      for (int c = 0; c < D; ++c) dst[c] = from_f32<T>(ar[c] * inv);
    }
  }
}

// ---- entry points -------------------------------------------------------------------------------

// Calls fn(T{}) for the cache dtype T in {float, bfloat16, half}.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", dtype, " (float32, bfloat16 or float16)");
  }
}

void check_host_index(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.dim());
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dim");
}

void paged_attention(
    const at::Tensor& query,  // [T, H, R]
    const at::Tensor& kv_cache,  // [num_blocks, H_kv, block_size, R + D]
    const at::Tensor& block_table,  // [num_reqs, max_blocks] int32
    const at::Tensor& query_start_loc,  // [num_reqs + 1] int32
    const at::Tensor& seq_lens,  // [num_reqs] int32
    double scale,
    const at::Tensor& output) {  // [T, H, D]
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 4 && output.dim() == 3, "expected query [T, H, R], kv_cache [blocks, H_kv, block_size, R + D], output [T, H, D]");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() && output.scalar_type() == kv_cache.scalar_type(),
              "query, kv_cache and output must share one dtype, got ", query.scalar_type(), ", ", kv_cache.scalar_type(), ", ", output.scalar_type());
  TORCH_CHECK(query.stride(-1) == 1 && kv_cache.stride(-1) == 1 && output.stride(-1) == 1, "the channel dim of query, kv_cache and output must be contiguous");
  check_host_index(block_table, "block_table", 2);
  check_host_index(query_start_loc, "query_start_loc", 1);
  check_host_index(seq_lens, "seq_lens", 1);
  const int64_t H = query.size(1), R = query.size(2), H_kv = kv_cache.size(1), D = output.size(2);
  const int64_t block_size = kv_cache.size(2);
  TORCH_CHECK(kv_cache.size(3) == R + D, "kv_cache rows hold ", kv_cache.size(3), " channels, expected R + D = ", R + D);
  TORCH_CHECK(H % H_kv == 0, H, " query heads cannot share ", H_kv, " KV heads");
  TORCH_CHECK(output.size(1) == H, "output has ", output.size(1), " heads, query ", H);
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
    const int tile = q_len == 1 ? 1 : kQueryTile;
    for (int64_t h = 0; h < H_kv; ++h)
      for (int q0 = 0; q0 < q_len; q0 += tile) items.push_back({int(i), int(h), q0, std::min(q_len, q0 + tile)});
  }
  if (items.empty()) return;

  dispatch_dtype(kv_cache.scalar_type(), "thinkeys::paged_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    Problem<scalar_t> p{
        query.data_ptr<scalar_t>(), query.stride(0), query.stride(1),
        kv_cache.data_ptr<scalar_t>(), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        output.data_ptr<scalar_t>(), output.stride(0), output.stride(1),
        block_table.data_ptr<int32_t>(), block_table.stride(0),
        qsl, lens,
        int(H / H_kv), int(R), int(D), int(block_size), float(scale)};
    at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
      Scratch& s = thread_scratch();
      for (int64_t k = begin; k < end; ++k) attend_tile(p, items[k], s);
    });
  });
}

void write_kv(
    const at::Tensor& kv_cache,  // [num_blocks, H_kv, block_size, R + D]
    const at::Tensor& key,  // [T, H_kv, R]
    const at::Tensor& value,  // [T, H_kv, D]
    const at::Tensor& slot_mapping) {  // [>= T'] int64, -1 = padding; tokens beyond its length are ignored
  TORCH_CHECK(kv_cache.dim() == 4 && key.dim() == 3 && value.dim() == 3, "expected kv_cache [blocks, H_kv, block_size, R + D], key [T, H_kv, R], value [T, H_kv, D]");
  TORCH_CHECK(key.scalar_type() == kv_cache.scalar_type() && value.scalar_type() == kv_cache.scalar_type(), "key, value and kv_cache must share one dtype");
  TORCH_CHECK(kv_cache.stride(-1) == 1 && key.stride(-1) == 1 && value.stride(-1) == 1, "the channel dim of kv_cache, key and value must be contiguous");
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1, "slot_mapping must be a 1-d int64 CPU tensor");
  const int64_t R = key.size(2), D = value.size(2), H_kv = kv_cache.size(1), block_size = kv_cache.size(2);
  TORCH_CHECK(kv_cache.size(3) == R + D && key.size(1) == H_kv && value.size(1) == H_kv, "key/value shapes do not match the cache");
  const int64_t T = std::min(slot_mapping.size(0), key.size(0));
  TORCH_CHECK(value.size(0) >= T, "fewer values than keys");
  const int64_t num_slots = kv_cache.size(0) * block_size;
  const auto slots = slot_mapping.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slot[t] < num_slots, "slot ", slot[t], " is outside the cache (", num_slots, " slots)");

  dispatch_dtype(kv_cache.scalar_type(), "thinkeys::write_kv", [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* cache = kv_cache.data_ptr<scalar_t>();
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        if (slot[t] < 0) continue;  // padding token
        const int64_t blk = slot[t] / block_size, off = slot[t] % block_size;
        for (int64_t h = 0; h < H_kv; ++h) {
          scalar_t* dst = cache + blk * kv_cache.stride(0) + h * kv_cache.stride(1) + off * kv_cache.stride(2);
          std::memcpy(dst, k + t * key.stride(0) + h * key.stride(1), R * sizeof(scalar_t));
          std::memcpy(dst + R, v + t * value.stride(0) + h * value.stride(1), D * sizeof(scalar_t));
        }
      }
    });
  });
}

}  // namespace
}  // namespace thinkeys

TORCH_LIBRARY(thinkeys, m) {
  m.def("paged_attention(Tensor query, Tensor kv_cache, Tensor block_table, Tensor query_start_loc, Tensor seq_lens, float scale, Tensor(a!) output) -> ()");
  m.def("write_kv(Tensor(a!) kv_cache, Tensor key, Tensor value, Tensor slot_mapping) -> ()");
}

TORCH_LIBRARY_IMPL(thinkeys, CPU, m) {
  m.impl("paged_attention", &thinkeys::paged_attention);
  m.impl("write_kv", &thinkeys::write_kv);
}
