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
// Query/output dtypes: float32, bfloat16, float16. Cache slots (cache_format):
//   plain                 key (R) | value (D) in the query dtype
//   fp8_e4m3, fp8_e5m2    key | value as fp8 bytes times a per-tensor k_scale / v_scale
//   int8_per_token_head   key | value as int8 (or fp8 e4m3 for fp8_per_token_head) bytes, then the
//   fp8_per_token_head    key's and the value's float32 scale (amax / qmax): R + D + 8 bytes
// 8-bit slots are read in place: each chunk is decoded to fp32 once (the same scratch the float
// path fills), so no dequantized copy of the cache is ever made. fp8 decodes through the F16C
// half converter (e5m2 is the high byte of a half; e4m3 re-biased into a half, then times 2^8),
// which is exact for every finite code, subnormals included. write_kv quantizes with the same
// rounding as thinkeys.attention.quant (round half to even, c10's fp8 conversions).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include "attention_common.h"  // conversions, the AVX2 hot loops, the AVX512-BF16 helpers

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace thinkeys {
namespace {

constexpr int kQueryTile = 16;  // query tokens per work item in a prefill (rows = kQueryTile * G)
constexpr int kChunk = 32;  // tokens per inner step (a multiple of 8): fp32 scratch of a chunk fits L1

// ---- 8-bit codes (Int8Code, E5m2Code, E4m3Code) and slot formats (PlainSlot, PerTensorSlot,
// PerTokenHeadSlot): attention_common.h, shared with the rebuild kernel

// ---- problem description ------------------------------------------------------------------------

template <typename T>
struct Problem {
  const T* query;  // [T, H, R], strides q_tok, q_head, 1
  int64_t q_tok, q_head;
  const uint8_t* cache;  // [num_blocks, H_kv, block_size, slot], strides (in BYTES) c_block, c_head, c_tok
  int64_t c_block, c_head, c_tok;
  int64_t slot_bytes;  // bytes of one (token, KV head) slot
  T* out;  // [T, H, D], strides o_tok, o_head, 1
  int64_t o_tok, o_head;
  const int32_t* block_table;  // [num_reqs, max_blocks]
  int64_t bt_stride;
  const int32_t* query_start_loc;  // [num_reqs + 1]
  const int32_t* seq_lens;  // [num_reqs]
  int G, R, D, block_size;
  float scale;
  float k_scale, v_scale;  // per-tensor fp8 scales (1 otherwise)
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

template <typename T, typename Slot>
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
    const uint8_t* page = p.cache + int64_t(blocks[b]) * p.c_block + int64_t(w.kv_head) * p.c_head;
    const int page_len = std::min(BS, kv_end - page_start);
    for (int c0 = 0; c0 < page_len; c0 += kChunk) {  // chunks of a page, so the scratch stays in L1
      const int n = std::min(kChunk, page_len - c0);
      const int n0 = page_start + c0;  // position of the chunk's first token
      // Decode is bound by reading the cache: ask for the next chunk (on this page or the next,
      // which sits anywhere in memory) while this one is computed.
      if (c0 + kChunk < page_len) {
        prefetch_rows(page + int64_t(c0 + kChunk) * p.c_tok, std::min(kChunk, page_len - c0 - kChunk), p.c_tok, p.slot_bytes);
      } else if (page_start + BS < kv_end) {
        const uint8_t* next = p.cache + int64_t(blocks[b + 1]) * p.c_block + int64_t(w.kv_head) * p.c_head;
        prefetch_rows(next, std::min(kChunk, kv_end - page_start - BS), p.c_tok, p.slot_bytes);
      }
      // the chunk's keys and values in fp32 (dequantized for 8-bit slots), once for all rows of the tile
      for (int j = 0; j < n; ++j) {
        Slot::load(page + int64_t(c0 + j) * p.c_tok, keys + j * R, values + j * D, R, D, p.k_scale, p.v_scale);
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
          const float alpha = online_softmax_step(sr, vis, row_max[row], row_sum[row]);
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

// ---- bf16 caches on AVX512-BF16 CPUs: bf16 pair dot products, AMX tiles for prefill -----------------
// With bf16 queries and a CPU that has AVX512_BF16 (kernels.py then builds with
// -mavx512bf16), a work item takes whole pages and never widens the cache to fp32. Per page:
//   pack    the keys are transposed, 16 tokens at a time, into pairs of channels, K^T as
//           [R/2 pairs][tokens][2] bf16, and the values interleaved by token pairs,
//           V as [tokens/2][D][2]: the "VNNI" layout both vdpbf16ps and AMX tiles read.
//   scores  decode and short tiles: one vdpbf16ps with a broadcast pair of the (bf16, unscaled)
//           query adds two channels' products to 16 token scores. Prefill tiles (>= kAmxRows
//           rows) on a CPU with AMX: one at::native::cpublas::brgemm (oneDNN's AMX micro-kernel,
//           what torch's CPU flash attention uses) for the tile's rows x the page's tokens.
//           Products of two bf16 are exact in fp32, so scores match the fp32 path's.
//   softmax online, per page, in fp32 (scale, causal mask, running max and sum as above).
//   P.V     the probabilities are rounded to bf16 (as torch's flash attention and vLLM's AMX
//           kernel do); vdpbf16ps with a broadcast pair of probabilities adds two tokens'
//           p * v to 16 output channels held in registers, or one brgemm for the whole tile.
// 8-bit slots (any cache_format) with bf16 queries: each page's codes are widened to bf16 first,
// exactly (int8 integers and fp8 values have at most 8 significant bits), and each token's factor
// (its slot's scale, or the tensor's, times the code's kMul) multiplies its score and its
// probability in fp32 (the softmax's sum uses the unscaled probability).
// Widths need not be multiples of 32: masked loads pad keys and values with zeros.
// Only this section is compiled for AVX512 (a target pragma, with -DTHINKEYS_BF16_FORM from
// kernels.py): the rest of the file is the same AVX2 code an AVX2-only CPU runs.
#if THINKEYS_AVX512BF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

struct ScratchBf16 {
  std::vector<int32_t> kt, q;  // K^T [P][tokens] (bf16 pairs); query pairs [rows][P]
  std::vector<uint16_t> vp;  // V by token pairs: [pairs][32 C][2] bf16 (brgemm's VNNI layout)
  std::vector<float> scores, acc, row_max, row_sum;  // [rows][tokens], [rows][32 C], [rows]
  std::vector<uint16_t> probs;  // [rows][tokens] bf16
  std::vector<uint16_t> page;  // an 8-bit page's codes as bf16 [tokens][R + D]
  std::vector<float> ks, vs;  // and their per-token factors [tokens]
  void fit(int rows, int P, int C, int tokens) {
    auto grow = [](auto& v, size_t n) {
      if (v.size() < n) v.resize(n);
    };
    grow(kt, size_t(P) * tokens);
    grow(q, size_t(rows) * P);
    grow(vp, size_t(tokens / 2) * C * 64);
    grow(scores, size_t(rows) * tokens);
    grow(probs, size_t(rows) * tokens);
    grow(acc, size_t(rows) * C * 32);
    grow(row_max, rows);
    grow(row_sum, rows);
    grow(ks, tokens);
    grow(vs, tokens);
  }
};

ScratchBf16& thread_scratch_bf16() {
  thread_local ScratchBf16 s;
  return s;
}

// An 8-bit slot's codes to bf16, exactly (int8 integers and fp8 values have <= 8 significant bits),
// and the factor that turns each code into its value (the slot's or the tensor's scale, times kMul).
template <typename Slot>
struct Bf16Codes;
template <typename Code>
struct Bf16Codes<PerTensorSlot<Code>> {
  static void load(const uint8_t* row, uint16_t* dst, int R, int D, float k_scale, float v_scale, float& ks, float& vs) {
    widen_slot_bf16<Code, false>(row, dst, R, D, k_scale, v_scale, ks, vs);
  }
};
template <typename Code>
struct Bf16Codes<PerTokenHeadSlot<Code>> {
  static void load(const uint8_t* row, uint16_t* dst, int R, int D, float, float, float& ks, float& vs) {
    widen_slot_bf16<Code, true>(row, dst, R, D, 1.0f, 1.0f, ks, vs);
  }
};

template <typename Slot>
void attend_tile_bf16(const Problem<c10::BFloat16>& p, const WorkItem& w, ScratchBf16& s, bool& used_brgemm) {
  constexpr bool kPlain = std::is_same_v<Slot, PlainSlot<c10::BFloat16>>;
  const int G = p.G, R = p.R, D = p.D, BS = p.block_size;
  const int P = (R + 31) / 32 * 16;  // channel pairs of a key, padded to whole 32-channel loads
  const int C = (D + 31) / 32;  // 32-channel chunks of a value
  const int q_len = p.query_start_loc[w.req + 1] - p.query_start_loc[w.req];
  const int kv_len = p.seq_lens[w.req];
  const int nq = w.q_end - w.q_begin;
  const int rows = nq * G;
  const int64_t first_tok = int64_t(p.query_start_loc[w.req]) + w.q_begin;
  const int srow = ((BS + 15) / 16 + 7) / 8 * 8 * 16;  // tokens of a page rounded up to 8 groups of 16
  s.fit(rows, P, C, srow);
  const TileBf16 t{nq, G, rows, P, C, D, srow, kv_len - q_len, w.q_begin, p.scale, rows >= kAmxRows && amx_brgemm_supported(),
                   s.q.data(), s.scores.data(), s.probs.data(), s.acc.data(), s.row_max.data(), s.row_sum.data()};
  int32_t* __restrict kt = s.kt.data();
  uint16_t* __restrict vp = s.vp.data();

  for (int i = 0; i < nq; ++i) {
    for (int g = 0; g < G; ++g) {  // the query's bf16 channels as pairs, zero-padded to P pairs
      const uint16_t* src = reinterpret_cast<const uint16_t*>(p.query + (first_tok + i) * p.q_tok + int64_t(w.kv_head * G + g) * p.q_head);
      uint16_t* dst = reinterpret_cast<uint16_t*>(s.q.data() + (i * G + g) * P);
      for (int c = 0; c < 2 * P; c += 32) _mm512_storeu_si512(dst + c, load_bf16_32(src + c, std::min(32, R - c)));
    }
  }
  std::fill(t.acc, t.acc + int64_t(rows) * C * 32, 0.0f);
  std::fill(t.row_max, t.row_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(t.row_sum, t.row_sum + rows, 0.0f);

  const int kv_end = t.context + w.q_end;
  const int32_t* blocks = p.block_table + int64_t(w.req) * p.bt_stride;
  // bf16 elements from one token's slot to the next: in the cache, or in the decoded 8-bit page
  const int64_t row_elems = kPlain ? p.c_tok / int64_t(sizeof(uint16_t)) : int64_t(R + D);
  const float* ks = nullptr;
  const float* vs = nullptr;
  if constexpr (!kPlain) {
    if (s.page.size() < size_t(srow) * (R + D)) s.page.resize(size_t(srow) * (R + D));
    ks = s.ks.data();
    vs = s.vs.data();
  }
  for (int page_start = 0, b = 0; page_start < kv_end; page_start += BS, ++b) {
    const uint8_t* raw = p.cache + int64_t(blocks[b]) * p.c_block + int64_t(w.kv_head) * p.c_head;
    const int n = std::min(BS, kv_end - page_start);
    const uint16_t* page = reinterpret_cast<const uint16_t*>(raw);
    if constexpr (!kPlain) {  // the page's codes as bf16 once, their factors in fp32 (zeros past n)
      uint16_t* dst = s.page.data();
      for (int j = 0; j < n; ++j)
        Bf16Codes<Slot>::load(raw + int64_t(j) * p.c_tok, dst + int64_t(j) * (R + D), R, D, p.k_scale, p.v_scale, s.ks[j], s.vs[j]);
      std::fill(s.ks.begin() + n, s.ks.begin() + srow, 0.0f);
      std::fill(s.vs.begin() + n, s.vs.begin() + srow, 0.0f);
      page = dst;
    }
    if (page_start + BS < kv_end)  // the next page (blocks are scattered: no hardware prefetch across them)
      prefetch_rows(p.cache + int64_t(blocks[b + 1]) * p.c_block + int64_t(w.kv_head) * p.c_head, std::min(BS, kv_end - page_start - BS),
                    p.c_tok, p.slot_bytes);
    const int nt = pack_keys_bf16(page, row_elems, R, n, P, kt);
    if (t.use_brgemm) pack_values_vnni(page + R, row_elems, n, D, C, vp);
    attend_page_bf16(t, kt, nt, n, page_start, page + R, row_elems, vp, ks, vs);
  }
  used_brgemm = used_brgemm || t.use_brgemm;

  for (int i = 0; i < nq; ++i)
    for (int g = 0; g < G; ++g)
      store_row_bf16(t, i * G + g, p.out + (first_tok + i) * p.o_tok + int64_t(w.kv_head * G + g) * p.o_head);
}
#pragma GCC pop_options
#endif

// ---- entry points -------------------------------------------------------------------------------

// The form of the hot loops this library runs: avx512bf16 (bf16 plain caches; the rest as avx2),
// avx2, or portable.
std::string kernel_isa() {
#if THINKEYS_AVX512BF16
  if (bf16_dot_supported()) return amx_brgemm_supported() ? "avx512bf16+amx" : "avx512bf16";
#endif
  return THINKEYS_AVX2 ? "avx2" : "portable";
}


// Calls fn(T{}) for the query/output dtype T in {float, bfloat16, half}.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", dtype, " (float32, bfloat16 or float16)");
  }
}

enum class Format { kPlain, kFp8E4m3, kFp8E5m2, kInt8PerTokenHead, kFp8PerTokenHead };

Format parse_format(c10::string_view name) {
  const std::string n(name.data(), name.size());
  if (n == "plain") return Format::kPlain;
  if (n == "fp8_e4m3") return Format::kFp8E4m3;
  if (n == "fp8_e5m2") return Format::kFp8E5m2;
  if (n == "int8_per_token_head") return Format::kInt8PerTokenHead;
  if (n == "fp8_per_token_head") return Format::kFp8PerTokenHead;
  TORCH_CHECK(false, "unknown cache_format '", n, "' (plain, fp8_e4m3, fp8_e5m2, int8_per_token_head or fp8_per_token_head)");
}

bool per_token_head(Format f) { return f == Format::kInt8PerTokenHead || f == Format::kFp8PerTokenHead; }

// Bytes of one slot of R + D channels, and a check that the cache's dtype and width fit the format.
int64_t check_slot(const at::Tensor& kv_cache, const at::Tensor& like, Format f, int64_t R, int64_t D) {
  const int64_t width = kv_cache.size(3);
  if (f == Format::kPlain) {
    TORCH_CHECK(like.scalar_type() == kv_cache.scalar_type(), "query, kv_cache and output must share one dtype with a plain cache, got ",
                like.scalar_type(), " and ", kv_cache.scalar_type());
    TORCH_CHECK(width == R + D, "kv_cache rows hold ", width, " channels, expected R + D = ", R + D);
    return width * kv_cache.element_size();
  }
  TORCH_CHECK(kv_cache.element_size() == 1, "an 8-bit cache_format needs a 1-byte kv_cache, got ", kv_cache.scalar_type());
  const int64_t expected = R + D + (per_token_head(f) ? 2 * int64_t(sizeof(float)) : 0);
  TORCH_CHECK(width == expected, "kv_cache rows hold ", width, " bytes, expected R + D", per_token_head(f) ? " + 8 (scales)" : "", " = ", expected);
  return width;
}

// Calls fn(Slot{}) for the slot reader of format f with query dtype T.
template <typename T, typename Fn>
void dispatch_format(Format f, Fn&& fn) {
  switch (f) {
    case Format::kPlain: fn(PlainSlot<T>{}); break;
    case Format::kFp8E4m3: fn(PerTensorSlot<E4m3Code>{}); break;
    case Format::kFp8E5m2: fn(PerTensorSlot<E5m2Code>{}); break;
    case Format::kInt8PerTokenHead: fn(PerTokenHeadSlot<Int8Code>{}); break;
    case Format::kFp8PerTokenHead: fn(PerTokenHeadSlot<E4m3Code>{}); break;
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
    const at::Tensor& kv_cache,  // [num_blocks, H_kv, block_size, slot]
    const at::Tensor& block_table,  // [num_reqs, max_blocks] int32
    const at::Tensor& query_start_loc,  // [num_reqs + 1] int32
    const at::Tensor& seq_lens,  // [num_reqs] int32
    double scale,
    const at::Tensor& output,  // [T, H, D]
    c10::string_view cache_format,
    double k_scale,
    double v_scale) {
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 4 && output.dim() == 3, "expected query [T, H, R], kv_cache [blocks, H_kv, block_size, R + D], output [T, H, D]");
  TORCH_CHECK(query.scalar_type() == output.scalar_type(), "query and output must share one dtype, got ", query.scalar_type(), ", ", output.scalar_type());
  TORCH_CHECK(query.stride(-1) == 1 && kv_cache.stride(-1) == 1 && output.stride(-1) == 1, "the channel dim of query, kv_cache and output must be contiguous");
  check_host_index(block_table, "block_table", 2);
  check_host_index(query_start_loc, "query_start_loc", 1);
  check_host_index(seq_lens, "seq_lens", 1);
  const Format format = parse_format(cache_format);
  const int64_t H = query.size(1), R = query.size(2), H_kv = kv_cache.size(1), D = output.size(2);
  const int64_t block_size = kv_cache.size(2);
  const int64_t slot_bytes = check_slot(kv_cache, query, format, R, D);
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

  const int64_t esize = kv_cache.element_size();
  dispatch_dtype(query.scalar_type(), "thinkeys::paged_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    Problem<scalar_t> p{
        query.data_ptr<scalar_t>(), query.stride(0), query.stride(1),
        static_cast<const uint8_t*>(kv_cache.data_ptr()), kv_cache.stride(0) * esize, kv_cache.stride(1) * esize, kv_cache.stride(2) * esize,
        slot_bytes,
        output.data_ptr<scalar_t>(), output.stride(0), output.stride(1),
        block_table.data_ptr<int32_t>(), block_table.stride(0),
        qsl, lens,
        int(H / H_kv), int(R), int(D), int(block_size), float(scale), float(k_scale), float(v_scale)};
    dispatch_format<scalar_t>(format, [&](auto slot_tag) {
      using Slot = decltype(slot_tag);
#if THINKEYS_AVX512BF16
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (bf16_dot_supported()) {
          at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
            ScratchBf16& s = thread_scratch_bf16();
            bool used_brgemm = false;
            for (int64_t k = begin; k < end; ++k) attend_tile_bf16<Slot>(p, items[k], s, used_brgemm);
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
            if (used_brgemm) at::native::cpublas::brgemm_release();  // the thread's AMX tile state
#endif
          });
          return;
        }
      }
#endif
      at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
        Scratch& s = thread_scratch();
        for (int64_t k = begin; k < end; ++k) attend_tile<scalar_t, Slot>(p, items[k], s);
      });
    });
  });
}

// ---- quantizing writes (the rounding of thinkeys.attention.quant.KVCodec.encode) -----------------

inline uint8_t quantize_one(float x, Format f) {
  switch (f) {
    case Format::kInt8PerTokenHead:
      return uint8_t(int8_t(std::max(-127.0f, std::min(127.0f, std::nearbyint(x)))));  // round half to even
    case Format::kFp8E4m3:
    case Format::kFp8PerTokenHead:
      return c10::Float8_e4m3fn(std::max(-448.0f, std::min(448.0f, x))).x;
    case Format::kFp8E5m2:
      return c10::Float8_e5m2(std::max(-57344.0f, std::min(57344.0f, x))).x;
    default:
      return 0;
  }
}

// n channels of src into dst bytes: divided by `scale` (per tensor), or by amax / qmax (per token
// and head, returned, and what the caller stores after the data).
template <typename T>
float quantize_row(const T* src, uint8_t* dst, int n, Format f, float scale, float* buf) {
  load_f32(src, buf, n);
  if (per_token_head(f)) {
    float amax = 0.0f;
    for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(buf[i]));
    const float qmax = f == Format::kInt8PerTokenHead ? 127.0f : 448.0f;
    scale = std::max(amax / qmax, std::numeric_limits<float>::min());
  }
  for (int i = 0; i < n; ++i) dst[i] = quantize_one(buf[i] / scale, f);
  return scale;
}

void write_kv(
    const at::Tensor& kv_cache,  // [num_blocks, H_kv, block_size, slot]
    const at::Tensor& key,  // [T, H_kv, R]
    const at::Tensor& value,  // [T, H_kv, D]
    const at::Tensor& slot_mapping,  // [>= T'] int64, -1 = padding; tokens beyond its length are ignored
    c10::string_view cache_format,
    double k_scale,
    double v_scale) {
  TORCH_CHECK(kv_cache.dim() == 4 && key.dim() == 3 && value.dim() == 3, "expected kv_cache [blocks, H_kv, block_size, R + D], key [T, H_kv, R], value [T, H_kv, D]");
  TORCH_CHECK(key.scalar_type() == value.scalar_type(), "key and value must share one dtype");
  TORCH_CHECK(kv_cache.stride(-1) == 1 && key.stride(-1) == 1 && value.stride(-1) == 1, "the channel dim of kv_cache, key and value must be contiguous");
  TORCH_CHECK(slot_mapping.device().is_cpu() && slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1, "slot_mapping must be a 1-d int64 CPU tensor");
  const Format format = parse_format(cache_format);
  const int64_t R = key.size(2), D = value.size(2), H_kv = kv_cache.size(1), block_size = kv_cache.size(2);
  TORCH_CHECK(key.size(1) == H_kv && value.size(1) == H_kv, "key/value shapes do not match the cache");
  check_slot(kv_cache, key, format, R, D);
  const int64_t T = std::min(slot_mapping.size(0), key.size(0));
  TORCH_CHECK(value.size(0) >= T, "fewer values than keys");
  const int64_t num_slots = kv_cache.size(0) * block_size;
  const auto slots = slot_mapping.contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slot[t] < num_slots, "slot ", slot[t], " is outside the cache (", num_slots, " slots)");

  const int64_t esize = kv_cache.element_size();
  uint8_t* cache = static_cast<uint8_t*>(kv_cache.data_ptr());
  const int64_t s0 = kv_cache.stride(0) * esize, s1 = kv_cache.stride(1) * esize, s2 = kv_cache.stride(2) * esize;
  dispatch_dtype(key.scalar_type(), "thinkeys::write_kv", [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* k = key.data_ptr<scalar_t>();
    const scalar_t* v = value.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(std::max(R, D));
      for (int64_t t = begin; t < end; ++t) {
        if (slot[t] < 0) continue;  // padding token
        const int64_t blk = slot[t] / block_size, off = slot[t] % block_size;
        for (int64_t h = 0; h < H_kv; ++h) {
          uint8_t* dst = cache + blk * s0 + h * s1 + off * s2;
          const scalar_t* ks = k + t * key.stride(0) + h * key.stride(1);
          const scalar_t* vs = v + t * value.stride(0) + h * value.stride(1);
          if (format == Format::kPlain) {
            std::memcpy(dst, ks, R * sizeof(scalar_t));
            std::memcpy(dst + R * sizeof(scalar_t), vs, D * sizeof(scalar_t));
            continue;
          }
          const float scales[2] = {quantize_row(ks, dst, int(R), format, float(k_scale), buf.data()),
                                   quantize_row(vs, dst + R, int(D), format, float(v_scale), buf.data())};
          if (per_token_head(format)) std::memcpy(dst + R + D, scales, sizeof(scales));
        }
      }
    });
  });
}

}  // namespace
}  // namespace thinkeys

TORCH_LIBRARY(thinkeys, m) {
  m.def("kernel_isa() -> str", &thinkeys::kernel_isa);
  m.def(
      "paged_attention(Tensor query, Tensor kv_cache, Tensor block_table, Tensor query_start_loc, Tensor seq_lens, "
      "float scale, Tensor(a!) output, str cache_format='plain', float k_scale=1.0, float v_scale=1.0) -> ()");
  m.def(
      "write_kv(Tensor(a!) kv_cache, Tensor key, Tensor value, Tensor slot_mapping, str cache_format='plain', "
      "float k_scale=1.0, float v_scale=1.0) -> ()");
}

TORCH_LIBRARY_IMPL(thinkeys, CPU, m) {
  m.impl("paged_attention", &thinkeys::paged_attention);
  m.impl("write_kv", &thinkeys::write_kv);
}
