// Paged attention for rebuild-at-read checkpoints on CPU: the cache holds, per token and KV head, a
// thin pre-RoPE latent c (R wide) and the value (D wide) in vLLM's logical view
// [num_blocks, H_kv, block_size, R + D]; the key is rebuilt at read time as k = A^T c (D wide) with
// the layer's expansion table [H_kv, D, R] and rotated at its position (NeoX layout, the source's
// RoPE; cos/sin come precomputed as [max_pos, H_cs, D / 2] tables, H_cs = 1 when every KV head has
// the same frequencies), then attended by the source's own D-wide query (which arrives rotated).
//
// Shared K=V caches (one D-wide vector per token and KV head, the value as it is and the key once
// rotated: the THINKEYS_SHARED_KV backend) are the case R == D with no expansion: the fp32 form
// reads them with shared_kv=true (plain or 8-bit, see SharedPlainSlot).
//
// Work items are (request, KV head, tile of query tokens), spread over ATen's intra-op thread pool.
// One code path per form covers decode, prefill, chunked prefill and prefix-cache hits: with kv_len
// cached tokens (new ones included) and q_len new queries, query i sees keys 0 .. kv_len - q_len + i.
// A page's keys are rebuilt once for all G = H / H_kv query heads of the group and all query tokens
// of the tile.
//
// Two forms (rebuild_kernel.py builds the one kernels.cpu_isa() picks, like the main kernel):
//
// * fp32 (float32 and float16 everywhere, bfloat16 on CPUs without AVX512-BF16): chunks of 32
//   tokens; latents and values widened to fp32, keys expanded as a [32, R] x [R, D] product
//   (register-blocked AVX-512 FMAs on CPUs that have them, AVX2 otherwise) and rotated, then the
//   main kernel's fp32 hot loops (attention_common.h: eight-token scores, online softmax, P.V).
//   All arithmetic in fp32.
// * bf16 (bfloat16 on AVX512-BF16 CPUs; -DTHINKEYS_BF16_FORM): the cache is never widened. For
//   requests with tokens to prefill, where the CPU has AMX, a page's latents are expanded as one
//   [tokens, R] x [R, D] bf16 product into fp32 read in place by oneDNN's AMX brgemm
//   (at::native::cpublas::brgemm), rotated, rounded to bf16 and packed into channel pairs (K^T). Else
//   (decodes; every request on CPUs without AMX; D of 32, 64 or 128) 16 tokens at a time go into the
//   lanes of the expansion (products_bf16: vdpbf16ps with a table pair broadcast per channel, or AMX-BF16
//   tiles for decodes where the CPU has them and R <= 32) and are rotated in registers (angles from
//   the transposed lane tables of rebuild_kernel.rope_lane_tables). Decodes (one query a request, at
//   most kFusedMaxG heads a KV head) take the scores right there, each rotated channel pair against
//   the fp32 query (expand_scores); other requests get K^T, paired (f, f + D / 2) as RoPE pairs them
//   (expand_kt). Then the main kernel's bf16 page step (attention_common.h: vdpbf16ps scores unless
//   fused, and P.V straight from the page for decodes, brgemm for prefill tiles of >= 16 rows, fp32
//   online softmax). The table comes in the VNNI pair layout,
//   prepared once per layer by rebuild_kernel.py. A thread
//   keeps the pages it rebuilt for the (request, KV head) it is working on, so the tiles of a
//   prefill rebuild each page once, not once per tile.
//   8-bit caches (cache_format int8_per_token_head, fp8_per_token_head, fp8_e4m3, fp8_e5m2: the
//   slots of quant.py, bf16 form only): each page's codes are widened to bf16 exactly
//   (attention_common.h widen_slot_bf16, as the main kernel's 8-bit page step) and rebuilt like a
//   bf16 latent; the expansion and RoPE are linear, so the key is s * RoPE(A^T c_q) and each
//   token's key factor s multiplies its scores, its value factor its probabilities, in fp32
//   (attend_page_bf16's ks / vs). int8_per_token_head latents skip the widening where the CPU has
//   AVX512-VNNI, D is 32, 64 or 128 and rebuild_kernel.py passes the int8 table (a call of decodes, or
//   any call where AMX does not run the prefills): they are multiplied as bytes by the table
//   quantized to int8 per output channel (products_i8, vpdpbusd: twice vdpbf16ps' products per
//   instruction; 16 tokens in the lanes, into scores or K^T as above, with no packing step), and P.V reads the value codes as they are (attend_page_i8: int16 probabilities,
//   vpdpwssd), so nothing of such a page is widened. Other 8-bit pages are widened a chunk at a time, just before the
//   chunk's expansion, while the next chunk's rows are prefetched. The fp32 form reads them too:
//   each chunk's codes are dequantized to fp32 (code * scale, attention_common.h's slot formats, as
//   the main kernel's fp32 form) where it would widen a float cache's latents and values.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "attention_common.h"  // conversions, the fp32 hot loops, the AVX512-BF16 page step

#include <algorithm>
#include <atomic>
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace thinkeys {
namespace {

constexpr int kQueryTile = 64;  // query tokens per work item in a prefill, fp32 form
constexpr int kQueryTileBf16 = 32;  // bf16 form (rows = tile * G; pages are rebuilt once per request anyway)
constexpr int kChunk = 32;  // tokens per inner step of the fp32 form (a multiple of 8)

template <typename T>
struct Problem {
  const T* query;  // [T, H, D]
  int64_t q_tok, q_head;
  const T* cache;  // [num_blocks, H_kv, block_size, R + D] (element strides)
  int64_t c_block, c_head, c_tok;
  T* out;  // [T, H, D]
  int64_t o_tok, o_head;
  const float* expand_t;  // [H_kv, R, D]: the expansion table transposed (contiguous over D)
  const uint16_t* expand_pairs;  // [H_kv, Rp / 2, Dv, 2] bf16: the same in VNNI pairs (Rp, Dv: R, D rounded up to 2, 16)
  const float* cos;  // [max_pos, H_cs, D / 2]
  const float* sin;
  int cs_heads;  // H_cs: 1 (shared by all KV heads) or H_kv
  // the same transposed, [H_cs, D / 2, lane_stride] (positions contiguous, zeros past the last): the K^T expansions
  // load one channel's angles for 16 consecutive positions (rebuild_kernel.rope_lane_tables); null in the fp32 form
  const float* cos_lanes;
  const float* sin_lanes;
  int64_t lane_stride;
  const int32_t* block_table;
  int64_t bt_stride;
  const int32_t* qsl;
  const int32_t* lens;
  int H_kv, G, R, D, block_size;
  float scale;
  int64_t call;  // this call's number (keys of the rebuilt-page caches)
  // 8-bit caches: the cache as bytes (null for a float cache; c_block, c_head and c_tok are then
  // byte strides) and the per-tensor fp8 scales (1 otherwise)
  const uint8_t* cache8;
  float k_scale, v_scale;
  bool shared;  // shared K=V slots: one vector per token (R == D), the value as it is and the key once rotated
  // int8 latents expanded in int8 (bf16 form, see products_i8): the table quantized per output
  // channel, [H_kv, Rq / 4, Dv, 4] (Rq: R rounded up to 4), and per KV head its channels' scales and
  // 128 * column sums [H_kv, 2, Dv]; null otherwise
  const int8_t* expand_quads = nullptr;
  const float* quad_scale = nullptr;
};

// Slot encodings the bf16 form reads: Plain (the cache's own bf16), or 8-bit codes widened to bf16
// per page (attention_common.h widen_slot_bf16), their factors applied to scores and probabilities.
struct PlainBf16 {
  static constexpr bool kPerTokenHead = false;
  static constexpr bool kQuads = false;
};
template <typename CodeT, bool kPerTokenHeadV>
struct Codes8 {
  using Code = CodeT;
  static constexpr bool kPerTokenHead = kPerTokenHeadV;
  static constexpr bool kQuads = false;
};
// int8_per_token_head pages read as the codes they are: latents expanded in int8 (products_i8), values
// multiplied by int16 probabilities (attend_page_i8)
struct Int8Quads {
  using Code = Int8Code;
  static constexpr bool kPerTokenHead = true;
  static constexpr bool kQuads = true;
};

struct WorkItem {
  int req, head, q0, q1;
};

std::atomic<int64_t> g_calls{0};

// ---- fp32 form ----------------------------------------------------------------------------------

// keys[j][0 : D] = sum_e lat[j][e] * table[e][0 : D] for j < n (n a multiple of 2; lat rows [R], keys rows [D])
inline void expand_rows_generic(const float* __restrict lat, int n, int R, const float* __restrict table, int D, float* __restrict keys) {
  for (int j = 0; j < n; ++j) {
    float* k = keys + int64_t(j) * D;
#pragma omp simd
    for (int f = 0; f < D; ++f) k[f] = 0.0f;
    for (int e = 0; e < R; ++e) {
      const float c = lat[int64_t(j) * R + e];
      const float* row = table + int64_t(e) * D;
#pragma omp simd
      for (int f = 0; f < D; ++f) k[f] += c * row[f];
    }
  }
}

#if THINKEYS_AVX2
// Two rows x 8 NV channels (from c0) held in registers over the R latent channels.
template <int NV>
inline void expand_block_avx2(const float* __restrict lat, int n, int R, const float* __restrict table, int D, int c0, float* __restrict keys) {
  for (int j = 0; j < n; j += 2) {
    __m256 a0[NV], a1[NV];
    for (int v = 0; v < NV; ++v) a0[v] = a1[v] = _mm256_setzero_ps();
    const float* l0 = lat + int64_t(j) * R;
    const float* l1 = l0 + R;
    for (int e = 0; e < R; ++e) {
      const __m256 b0 = _mm256_broadcast_ss(l0 + e), b1 = _mm256_broadcast_ss(l1 + e);
      const float* row = table + int64_t(e) * D + c0;
      for (int v = 0; v < NV; ++v) {
        const __m256 t = _mm256_loadu_ps(row + 8 * v);
        a0[v] = _mm256_fmadd_ps(b0, t, a0[v]);
        a1[v] = _mm256_fmadd_ps(b1, t, a1[v]);
      }
    }
    for (int v = 0; v < NV; ++v) {
      _mm256_storeu_ps(keys + int64_t(j) * D + c0 + 8 * v, a0[v]);
      _mm256_storeu_ps(keys + int64_t(j + 1) * D + c0 + 8 * v, a1[v]);
    }
  }
}
#endif

#if THINKEYS_AVX512BF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// Four rows x 16 NV channels (from c0) in zmm registers (n a multiple of 4).
template <int NV>
inline void expand_block_avx512(const float* __restrict lat, int n, int R, const float* __restrict table, int D, int c0, float* __restrict keys,
                                const uint8_t* pf = nullptr, int pf_n = 0, int64_t pf_stride = 0, int64_t slot_bytes = 0) {
  for (int j = 0; j < n; j += 4) {
    for (int i = j; i < std::min(j + 4, pf_n); ++i)  // the next chunk's slots, spread over this one's expansion
      for (int64_t o = 0; o < slot_bytes; o += 64) __builtin_prefetch(pf + i * pf_stride + o, 0, 3);
    __m512 a[4][NV];
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < NV; ++v) a[i][v] = _mm512_setzero_ps();
    const float* l = lat + int64_t(j) * R;
    for (int e = 0; e < R; ++e) {
      const float* row = table + int64_t(e) * D + c0;
      __m512 t[NV];
      for (int v = 0; v < NV; ++v) t[v] = _mm512_loadu_ps(row + 16 * v);
      for (int i = 0; i < 4; ++i) {
        const __m512 b = _mm512_set1_ps(l[int64_t(i) * R + e]);
        for (int v = 0; v < NV; ++v) a[i][v] = _mm512_fmadd_ps(b, t[v], a[i][v]);
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(keys + int64_t(j + i) * D + c0 + 16 * v, a[i][v]);
  }
}

void expand_rows_avx512(const float* lat, int n, int R, const float* table, int D, float* keys, const uint8_t* pf, int pf_n, int64_t pf_stride,
                        int64_t slot_bytes) {
  int c = 0;
  for (; c + 64 <= D; c += 64) expand_block_avx512<4>(lat, n, R, table, D, c, keys, c ? nullptr : pf, c ? 0 : pf_n, pf_stride, slot_bytes);
  for (; c + 32 <= D; c += 32) expand_block_avx512<2>(lat, n, R, table, D, c, keys, c ? nullptr : pf, c ? 0 : pf_n, pf_stride, slot_bytes);
  for (; c < D; c += 16) expand_block_avx512<1>(lat, n, R, table, D, c, keys, c ? nullptr : pf, c ? 0 : pf_n, pf_stride, slot_bytes);
}

// For RB rows r: acc_r[0 : 16 NV] += sum_j p_r[j] values[j][0 : 16 NV] (value rows `stride` apart,
// probability rows `srow` apart, accumulator rows `D` apart); the values loaded once for all rows,
// accumulators in registers (a single row runs two token streams, so the FMA chains overlap).
template <int RB, int NV>
THINKEYS_ALWAYS_INLINE void pv_rows16(const float* __restrict p, int srow, const float* __restrict values, int n, int stride,
                                      float* __restrict acc, int D) {
  constexpr int U = RB == 1 ? 2 : 1;
  __m512 a[U][RB][NV];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < NV; ++v) a[u][r][v] = u ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + int64_t(r) * D + 16 * v);
  int j = 0;
  for (; j + U <= n; j += U) {
    for (int u = 0; u < U; ++u) {
      __m512 x[NV];
      for (int v = 0; v < NV; ++v) x[v] = _mm512_loadu_ps(values + int64_t(j + u) * stride + 16 * v);
      for (int r = 0; r < RB; ++r) {
        const __m512 pj = _mm512_set1_ps(p[int64_t(r) * srow + j + u]);
        for (int v = 0; v < NV; ++v) a[u][r][v] = _mm512_fmadd_ps(pj, x[v], a[u][r][v]);
      }
    }
  }
  for (; j < n; ++j) {
    for (int r = 0; r < RB; ++r) {
      const __m512 pj = _mm512_set1_ps(p[int64_t(r) * srow + j]);
      for (int v = 0; v < NV; ++v) a[0][r][v] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(values + int64_t(j) * stride + 16 * v), a[0][r][v]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) {
      __m512 sum = a[0][r][v];
      for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, a[u][r][v]);
      _mm512_storeu_ps(acc + int64_t(r) * D + 16 * v, sum);
    }
}

template <int RB>
inline void pv_rows(const float* p, int srow, const float* values, int n, int D, float* acc) {
  int c = 0;
  for (; c + 64 <= D; c += 64) pv_rows16<RB, 4>(p, srow, values + c, n, D, acc + c, D);
  for (; c + 32 <= D; c += 32) pv_rows16<RB, 2>(p, srow, values + c, n, D, acc + c, D);
  for (; c < D; c += 16) pv_rows16<RB, 1>(p, srow, values + c, n, D, acc + c, D);
}

// kt [D][32] = keys [32][D] transposed (D a multiple of 16), 16 x 16 blocks in registers
inline void transpose_keys32(const float* __restrict keys, int D, float* __restrict kt) {
  for (int t0 = 0; t0 < 32; t0 += 16)
    for (int c0 = 0; c0 < D; c0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_castps_si512(_mm512_loadu_ps(keys + int64_t(t0 + i) * D + c0));
      transpose16x16_epi32(r);
      for (int k = 0; k < 16; ++k) _mm512_storeu_ps(kt + int64_t(c0 + k) * 32 + t0, _mm512_castsi512_ps(r[k]));
    }
}

// scores[r][0 : 32] = q_r . keys of the chunk for RB rows (q rows D apart), from kt [D][32]: a
// broadcast query channel times 16 tokens per FMA, no horizontal sums
template <int RB>
THINKEYS_ALWAYS_INLINE void score_rows_kt(const float* __restrict q, int D, const float* __restrict kt, float* __restrict scores, int srow) {
  __m512 a[RB][2];
  for (int r = 0; r < RB; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
  for (int f = 0; f < D; ++f) {
    const __m512 k0 = _mm512_loadu_ps(kt + int64_t(f) * 32), k1 = _mm512_loadu_ps(kt + int64_t(f) * 32 + 16);
    for (int r = 0; r < RB; ++r) {
      const __m512 qb = _mm512_set1_ps(q[int64_t(r) * D + f]);
      a[r][0] = _mm512_fmadd_ps(qb, k0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(qb, k1, a[r][1]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    _mm512_storeu_ps(scores + int64_t(r) * srow, a[r][0]);
    _mm512_storeu_ps(scores + int64_t(r) * srow + 16, a[r][1]);
  }
}

// The fp32 form's per-chunk step with 16-lane vectors (D a multiple of 16): for every row of the
// tile that sees part of the chunk (n tokens from position n0; keys zero-padded to a multiple of
// 8 rows), scores eight tokens at a time, the online softmax, and P.V.
void attend_chunk_avx512(const float* __restrict q, const float* __restrict keys, const float* __restrict values, int n, int n0, int first_q,
                         int nq, int G, int D, int srow, float* __restrict scores, float* __restrict acc, float* __restrict row_max,
                         float* __restrict row_sum, float* __restrict kt) {
  // Prefill tiles (12+ rows, 32-token chunks): transpose the chunk's keys once, then score six rows
  // at a time against all 32 tokens (the causal mask applies in the softmax below). Decodes score
  // eight tokens at a time from the token-major keys (a transpose would cost more than it saves).
  const int rows = nq * G;
  const bool by_kt = rows >= 12 && srow == 32;
  if (by_kt) {
    transpose_keys32(keys, D, kt);
    for (int r = std::max(0, n0 - first_q) * G; r < rows; r += 6) {  // rows whose token sees part of the chunk
      const float* qr = q + int64_t(r) * D;
      float* sr = scores + int64_t(r) * srow;
      switch (std::min(6, rows - r)) {
        case 6: score_rows_kt<6>(qr, D, kt, sr, srow); break;
        case 5: score_rows_kt<5>(qr, D, kt, sr, srow); break;
        case 4: score_rows_kt<4>(qr, D, kt, sr, srow); break;
        case 3: score_rows_kt<3>(qr, D, kt, sr, srow); break;
        case 2: score_rows_kt<2>(qr, D, kt, sr, srow); break;
        default: score_rows_kt<1>(qr, D, kt, sr, srow); break;
      }
    }
  }
  for (int i = 0; i < nq; ++i) {
    const int vis = std::min(n, first_q + i + 1 - n0);  // causal limit in this chunk
    if (vis <= 0) continue;
    for (int g = 0; g < G; ++g) {
      const int row = i * G + g;
      float* sr = scores + int64_t(row) * srow;
      const float* qr = q + int64_t(row) * D;
      for (int j = 0; !by_kt && j < vis; j += 8) {
        __m512 a[8];
        for (int t = 0; t < 8; ++t) a[t] = _mm512_setzero_ps();
        for (int c = 0; c < D; c += 16) {
          const __m512 qv = _mm512_loadu_ps(qr + c);
          for (int t = 0; t < 8; ++t) a[t] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(keys + int64_t(j + t) * D + c), a[t]);
        }
        __m256 h[8];
        for (int t = 0; t < 8; ++t) h[t] = _mm256_add_ps(_mm512_castps512_ps256(a[t]), _mm512_extractf32x8_ps(a[t], 1));
        _mm256_storeu_ps(sr + j, hsum8(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]));
      }
      const float alpha = online_softmax_step(sr, vis, row_max[row], row_sum[row]);
      float* ar = acc + int64_t(row) * D;
      if (alpha != 1.0f) {
        const __m512 av = _mm512_set1_ps(alpha);
        for (int c = 0; c < D; c += 16) _mm512_storeu_ps(ar + c, _mm512_mul_ps(_mm512_loadu_ps(ar + c), av));
      }
    }
    // P.V for the token's G rows (same visible keys), up to three rows per pass over the values
    for (int g = 0; g < G; g += 3) {
      const int rb = std::min(3, G - g), row = i * G + g;
      const float* pr = scores + int64_t(row) * srow;
      float* ar = acc + int64_t(row) * D;
      if (rb == 3) pv_rows<3>(pr, srow, values, vis, D, ar);
      else if (rb == 2) pv_rows<2>(pr, srow, values, vis, D, ar);
      else pv_rows<1>(pr, srow, values, vis, D, ar);
    }
  }
}
#pragma GCC pop_options
#endif

// keys [n8][D] = lat [n8][R] x table [R][D], n8 = n rounded up to 8 (the rows past n are zero latents).
// The AVX-512 form also prefetches pf_n slots of slot_bytes from pf (pf_stride apart) as it goes;
// the others leave that to the caller (returns false).
inline bool expand_rows(const float* lat, int n8, int R, const float* table, int D, float* keys, const uint8_t* pf, int pf_n,
                        int64_t pf_stride, int64_t slot_bytes) {
#if THINKEYS_AVX512BF16
  if (D % 16 == 0 && bf16_dot_supported()) {  // an AVX512-BF16 CPU has AVX512F
    expand_rows_avx512(lat, n8, R, table, D, keys, pf, pf_n, pf_stride, slot_bytes);
    return true;
  }
#endif
  (void)pf, (void)pf_n, (void)pf_stride, (void)slot_bytes;
#if THINKEYS_AVX2
  if (D % 8 == 0) {
    int c = 0;
    for (; c + 32 <= D; c += 32) expand_block_avx2<4>(lat, n8, R, table, D, c, keys);
    for (; c < D; c += 8) expand_block_avx2<1>(lat, n8, R, table, D, c, keys);
    return false;
  }
#endif
  expand_rows_generic(lat, n8, R, table, D, keys);
  return false;
}

// NeoX rotation of key rows [n][D] at positions pos0 + t0 .. pos0 + t0 + n - 1 (dim f pairs with
// f + half), pos0 a page's first position: angles by angle addition from the table's row pos0 and
// its rows t0 .. t0 + n - 1 (see rope_to_bf16), so a long decode reads one table row per page.
inline void rope_rows(float* __restrict keys, int n, int D, const float* __restrict cos, const float* __restrict sin, int64_t cs_row,
                      int64_t cs_off, int pos0, int t0) {
  const int half = D / 2;
  const float* cp = cos + int64_t(pos0) * cs_row + cs_off;
  const float* sp = sin + int64_t(pos0) * cs_row + cs_off;
  for (int j = 0; j < n; ++j) {
    float* k = keys + int64_t(j) * D;
    const float* cb = cos + int64_t(t0 + j) * cs_row + cs_off;
    const float* sb = sin + int64_t(t0 + j) * cs_row + cs_off;
#pragma omp simd
    for (int f = 0; f < half; ++f) {
      const float c = cp[f] * cb[f] - sp[f] * sb[f], s = sp[f] * cb[f] + cp[f] * sb[f];
      const float x1 = k[f], x2 = k[f + half];
      k[f] = x1 * c - x2 * s;
      k[f + half] = x2 * c + x1 * s;
    }
  }
}

struct Scratch {
  std::vector<float> q, scores, acc, lat, keys, values, row_max, row_sum, kt;
  void fit(int rows, int R, int D, int chunk) {
    auto grow = [](auto& v, size_t n) {
      if (v.size() < n) v.resize(n, 0);
    };
    grow(q, size_t(rows) * D);
    grow(scores, size_t(rows) * chunk);
    grow(acc, size_t(rows) * D);
    grow(lat, size_t(chunk) * R);
    grow(keys, size_t(chunk) * D);
    grow(kt, size_t(chunk) * D);
    grow(values, size_t(chunk) * D);
    grow(row_max, rows);
    grow(row_sum, rows);
  }
};

Scratch& thread_scratch() {
  thread_local Scratch s;
  return s;
}

// Shared K=V slots (THINKEYS_SHARED_KV: one D-wide vector per token and KV head, [+ one float32
// scale] with a per-token-head 8-bit cache): read once into k and copied to v; the key is the
// vector rotated at its position, with no expansion (R == D).
template <typename T>
struct SharedPlainSlot {
  static void load(const uint8_t* row, float* k, float* v, int R, int D, float, float) {
    load_f32(reinterpret_cast<const T*>(row), k, D);
    std::memcpy(v, k, sizeof(float) * D);
  }
};

template <typename Code>
struct SharedPerTensorSlot {
  static void load(const uint8_t* row, float* k, float* v, int R, int D, float k_scale, float) {
    dequant_f32<Code>(row, k, D, k_scale);  // one vector, the layer's key scale
    std::memcpy(v, k, sizeof(float) * D);
  }
};

template <typename Code>
struct SharedPerTokenHeadSlot {
  static void load(const uint8_t* row, float* k, float* v, int R, int D, float, float) {
    float scale;
    std::memcpy(&scale, row + D, sizeof(scale));  // not 4-byte aligned in general
    dequant_f32<Code>(row, k, D, scale);
    std::memcpy(v, k, sizeof(float) * D);
  }
};

// Slot: PlainSlot<T> for a float cache, an 8-bit slot format (attention_common.h) otherwise: each
// chunk's latents and values are read to fp32 (dequantized: code * scale), then rebuilt as below.
// Shared K=V slots (p.shared) load the key directly (see SharedPlainSlot) and skip the expansion.
template <typename T, typename Slot>
void attend_tile(const Problem<T>& p, const WorkItem& w, Scratch& s) {
  const int G = p.G, R = p.R, D = p.D, bs = p.block_size;
  const int q_start = p.qsl[w.req], q_len = p.qsl[w.req + 1] - q_start, kv_len = p.lens[w.req];
  const int ctx = kv_len - q_len;
  const int nq = w.q1 - w.q0, rows = nq * G;
  s.fit(rows, R, D, kChunk);
  float* __restrict q = s.q.data();  // [rows, D], pre-scaled; row = token * G + head in the group
  float* __restrict scores = s.scores.data();  // [rows, kChunk]
  float* __restrict acc = s.acc.data();  // [rows, D]
  float* __restrict lat = s.lat.data();  // [kChunk, R]: a chunk's latents in fp32 (zero rows past n)
  float* __restrict keys = s.keys.data();  // [kChunk, D]: rebuilt and rotated keys (zero rows past n)
  float* __restrict values = s.values.data();  // [kChunk, D]
  float* __restrict row_max = s.row_max.data();
  float* __restrict row_sum = s.row_sum.data();
  for (int i = 0; i < nq; ++i)
    for (int g = 0; g < G; ++g) {
      const T* src = p.query + int64_t(q_start + w.q0 + i) * p.q_tok + int64_t(w.head * G + g) * p.q_head;
      float* dst = q + int64_t(i * G + g) * D;
      load_f32(src, dst, D);
#pragma omp simd
      for (int e = 0; e < D; ++e) dst[e] *= p.scale;
    }
  std::fill(acc, acc + int64_t(rows) * D, 0.0f);
  std::fill(row_max, row_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + rows, 0.0f);

  const float* table = p.shared ? nullptr : p.expand_t + int64_t(w.head) * R * D;  // [R, D]
  const int64_t cs_row = int64_t(p.cs_heads) * (D / 2), cs_off = (p.cs_heads == 1 ? 0 : int64_t(w.head)) * (D / 2);
  const int kv_end = ctx + w.q1;  // keys the last token of the tile sees: 0 .. kv_end - 1
  const int32_t* blocks = p.block_table + int64_t(w.req) * p.bt_stride;
  const bool wide = D % 16 == 0 && bf16_dot_supported();  // AVX-512 scores and P.V (an AVX512-BF16 CPU has AVX512F)
  (void)wide;
  // the cache as bytes, with byte strides (a float cache's element strides times its element size)
  const bool eight_bit = p.cache8 != nullptr;
  const uint8_t* base = eight_bit ? p.cache8 : reinterpret_cast<const uint8_t*>(p.cache);
  const int64_t esz = eight_bit ? 1 : int64_t(sizeof(T));
  const int64_t c_block = p.c_block * esz, c_head = p.c_head * esz, c_tok = p.c_tok * esz;
  const int64_t slot_bytes = eight_bit ? c_tok : int64_t(p.shared ? D : R + D) * int64_t(sizeof(T));
  for (int page_start = 0, b = 0; page_start < kv_end; page_start += bs, ++b) {
    const uint8_t* page = base + int64_t(blocks[b]) * c_block + int64_t(w.head) * c_head;
    const int page_len = std::min(bs, kv_end - page_start);
    for (int c0 = 0; c0 < page_len; c0 += kChunk) {
      const int n = std::min(kChunk, page_len - c0);
      const int n0 = page_start + c0;  // position of the chunk's first token
      // the next chunk's slots (on this page or the next), prefetched a few at a time during the
      // expansion where it can (a burst would fill the miss buffers)
      const uint8_t* pf = nullptr;
      int pf_n = 0;
      if (c0 + kChunk < page_len) {
        pf = page + int64_t(c0 + kChunk) * c_tok, pf_n = std::min(kChunk, page_len - c0 - kChunk);
      } else if (page_start + bs < kv_end) {
        pf = base + int64_t(blocks[b + 1]) * c_block + int64_t(w.head) * c_head;
        pf_n = std::min(kChunk, kv_end - page_start - bs);
      }
      const int n8 = (n + 7) / 8 * 8;
      float* kin = p.shared ? keys : lat;  // shared K=V: the vector is the (un-rotated) key, R == D
      for (int j = 0; j < n; ++j)
        Slot::load(page + int64_t(c0 + j) * c_tok, kin + int64_t(j) * R, values + int64_t(j) * D, R, D, p.k_scale, p.v_scale);
      std::fill(kin + int64_t(n) * R, kin + int64_t(n8) * R, 0.0f);  // zero keys past n: finite padding for row_scores
      if (p.shared) {
        if (pf) prefetch_rows(pf, pf_n, c_tok, slot_bytes);
      } else if (!expand_rows(lat, n8, R, table, D, keys, pf, pf_n, c_tok, slot_bytes) && pf) {
        prefetch_rows(pf, pf_n, c_tok, slot_bytes);
      }
      rope_rows(keys, n, D, p.cos, p.sin, cs_row, cs_off, page_start, c0);

#if THINKEYS_AVX512BF16
      if (wide) {
        attend_chunk_avx512(q, keys, values, n, n0, ctx + w.q0, nq, G, D, kChunk, scores, acc, row_max, row_sum, s.kt.data());
        continue;
      }
#endif
      for (int i = 0; i < nq; ++i) {
        const int vis = std::min(n, ctx + w.q0 + i + 1 - n0);  // causal limit in this chunk
        if (vis <= 0) continue;
        for (int g = 0; g < G; ++g) {
          const int row = i * G + g;
          float* sr = scores + int64_t(row) * kChunk;
          row_scores(q + int64_t(row) * D, keys, vis, D, sr);
          const float alpha = online_softmax_step(sr, vis, row_max[row], row_sum[row]);
          float* ar = acc + int64_t(row) * D;
          if (alpha != 1.0f) {
#pragma omp simd
            for (int c = 0; c < D; ++c) ar[c] *= alpha;
          }
          row_pv(sr, values, vis, D, ar);
        }
      }
    }
  }
  for (int i = 0; i < nq; ++i)
    for (int g = 0; g < G; ++g) {
      const int row = i * G + g;
      const float inv = 1.f / row_sum[row];  // > 0: every query sees at least its own key
      T* dst = p.out + int64_t(q_start + w.q0 + i) * p.o_tok + int64_t(w.head * G + g) * p.o_head;
      const float* ar = acc + int64_t(row) * D;
      for (int c = 0; c < D; ++c) dst[c] = from_f32<T>(ar[c] * inv);
    }
}

// ---- the bf16 K^T expansion on AMX tiles (decodes on CPUs with AMX-BF16) ----
// On the AMX Xeon of session 10 vdpbf16ps issues about one per two cycles (vpdpbusd two per cycle),
// so the bf16 expansion of decodes (the vdpbf16ps loop of products_bf16) was two thirds of the op. tdpbf16ps does a
// group's products, 16 channels x 16 tokens x 2 R bf16 at a time: A = the table's rows of 16 channels
// ([Dv][Rp] bf16, table_rows), B = the group's latent pairs as rows_to_lanes lays them out (AMX's B
// layout: [pairs][16 tokens x 2]), C = [16 channels][16 tokens] fp32, stored for rope_kt_store. For
// R <= 32 (one tile's K). The configuration is loaded per work item; the caller releases the tiles
// and cpublas' record of its own configuration afterwards (at::native::cpublas::brgemm_release).

#if THINKEYS_AVX512BF16 && defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define THINKEYS_AMX_EXPANSION 1
// Whether the CPU has AMX-BF16 and Linux lets this process use the tile data (requested here if not yet).
bool amx_bf16_tiles() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 24)) || !(d & (1u << 22))) return false;  // AMX-TILE, AMX-BF16
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,amx-tile,amx-bf16")
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0 - tmm3: C (16 x 16 fp32); tmm4, tmm5: A (16 channels x K bytes); tmm6, tmm7: B (K / 4 rows of 64 bytes).
void amx_expansion_configure(int K) {
  TileConfig cfg;
  for (int i = 0; i < 4; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  cfg.colsb[4] = cfg.colsb[5] = uint16_t(K), cfg.rows[4] = cfg.rows[5] = 16;
  cfg.colsb[6] = cfg.colsb[7] = 64, cfg.rows[6] = cfg.rows[7] = uint8_t(K / 4);
  // not _tile_loadconfig: GCC 12's tells the compiler it reads 8 bytes, so the other stores may be dropped
  asm volatile("ldtilecfg %0" : : "m"(cfg));
}

// acc[g] [D][16] fp32 = table rows [D][K bytes] x group g's latent pairs (lp + g * 16 K / 4 int32), for the
// n_groups (1 or 2) groups of a chunk: four independent products in flight.
void amx_expansion_chunk(const int32_t* lp, int n_groups, const uint16_t* rows, int K, int D, float* acc) {
  const int64_t group = int64_t(4) * K, out = int64_t(D) * 16;
  const uint8_t* a = reinterpret_cast<const uint8_t*>(rows);
  _tile_loadd(6, lp, 64);
  if (n_groups > 1) _tile_loadd(7, lp + group, 64);
  for (int c0 = 0; c0 < D; c0 += 32) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(4, a + int64_t(c0) * K, K);
    _tile_loadd(5, a + int64_t(c0 + 16) * K, K);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if (n_groups > 1) {
      _tile_zero(2);
      _tile_zero(3);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
      _tile_stored(2, acc + out + c0 * 16, 64);
      _tile_stored(3, acc + out + (c0 + 16) * 16, 64);
    }
    _tile_stored(0, acc + c0 * 16, 64);
    _tile_stored(1, acc + (c0 + 16) * 16, 64);
  }
}
#pragma GCC pop_options

// Whether decodes expand bf16 latents on AMX tiles: AMX on (amx_brgemm_supported: not THINKEYS_KERNEL_NO_AMX) and AMX-BF16.
bool amx_expansion_enabled() {
  static const bool ok = amx_brgemm_supported() && amx_bf16_tiles();
  return ok;
}
#else
#define THINKEYS_AMX_EXPANSION 0
#endif

// ---- bf16 form ----------------------------------------------------------------------------------
#if THINKEYS_AVX512BF16
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")

struct ScratchBf16 {
  std::vector<int32_t> q;  // the tile's query pairs [rows][P]
  std::vector<float> q32;  // fused decodes (expand_scores): the query in fp32 [rows][D]
  std::vector<int32_t> bias;  // the int8 table's 128 * column sums of the work item's KV head, as integers [Dv]
  std::vector<float> scores, acc, row_max, row_sum, k32;  // [rows][srow], [rows][32 C], [rows], a page's keys [srow][Dv]
  std::vector<uint16_t> probs, kb;  // [rows][srow]; a page's rotated keys [srow][32 C] bf16
  // the pages rebuilt for (call, req, head): K^T pairs [page][P][srow] and values [page][pairs][32 C][2]
  int64_t call = -1;
  int req = -1, head = -1;
  std::vector<int32_t> kt;
  std::vector<uint16_t> vp;
  std::vector<int32_t> lanes;  // bf16 K^T expansion: a chunk's latent pairs, tokens in lanes [2][pairs][16]
  // AMX bf16 K^T expansion: the layer's table as rows of channels [H_kv][Dv][Rp] bf16 (for one call), a chunk's products
  std::vector<uint16_t> table_rows;
  const uint16_t* table_rows_src = nullptr;
  int64_t table_rows_call = -1;
  std::vector<float> amx_acc;  // [2][Dv][16]
  std::vector<int> nt;  // per page: packed token count (0: not rebuilt yet)
  std::vector<char> vp_done;
  std::vector<uint16_t> page8;  // 8-bit caches: a page's codes widened to bf16 [srow][R + D]
  std::vector<uint8_t> lat8;  // int8 expansion: a page's latent codes + 128 in quads, 16 tokens a group [srow / 16][R4 / 4][16][4]
  std::vector<float> ks, vs;  // and its per-token key / value factors [srow]
  std::vector<float> pscale;  // int8 values (Int8Quads): per row, the factor of a page's int16 probabilities [rows]
  void fit(int rows, int P, int C, int Dv, int srow) {
    auto grow = [](auto& v, size_t n) {
      if (v.size() < n) v.resize(n);
    };
    grow(q, size_t(rows) * P);
    grow(q32, size_t(rows) * 2 * P);
    grow(scores, size_t(rows) * srow);
    grow(probs, size_t(rows) * srow);
    grow(acc, size_t(rows) * C * 32);
    grow(row_max, rows);
    grow(row_sum, rows);
    grow(k32, size_t(srow) * Dv);
    grow(kb, size_t(srow) * C * 32);
  }
};

ScratchBf16& thread_scratch_bf16() {
  thread_local ScratchBf16 s;
  return s;
}

// k32[t][0 : Dv] = latents of token t (R bf16 at lat + t * stride) x the VNNI table [Rp/2][Dv] pairs,
// four tokens x NB 16-channel blocks in registers (each latent pair a broadcast load); with odd R
// the last pair's second element (the slot's first value channel) is masked off.
template <int NB, bool kOddR>
THINKEYS_ALWAYS_INLINE void expand_bf16_block(const uint16_t* __restrict lat, int64_t stride, int n, int R, const int32_t* __restrict tbl, int Dv, int b0,
                              float* __restrict k32) {
  const int pairs = (R + 1) / 2;
  for (int t0 = 0; t0 < n; t0 += 4) {
    const int nt = std::min(4, n - t0);
    __m512 a[4][NB];
    for (int i = 0; i < 4; ++i)
      for (int b = 0; b < NB; ++b) a[i][b] = _mm512_setzero_ps();
    const int32_t* l[4];
    for (int i = 0; i < 4; ++i) l[i] = reinterpret_cast<const int32_t*>(lat + int64_t(t0 + std::min(i, nt - 1)) * stride);
    for (int pp = 0; pp < pairs; ++pp) {
      __m512i tv[NB];
      for (int b = 0; b < NB; ++b) tv[b] = _mm512_loadu_si512(tbl + int64_t(pp) * Dv + 16 * (b0 + b));
      for (int i = 0; i < 4; ++i) {  // rows past nt repeat the last token (not stored)
        int32_t bits;
        std::memcpy(&bits, l[i] + pp, sizeof(bits));
        if (kOddR && pp + 1 == pairs) bits &= 0xFFFF;
        const __m512i cv = _mm512_set1_epi32(bits);
        for (int b = 0; b < NB; ++b) a[i][b] = dp_bf16(a[i][b], tv[b], cv);
      }
    }
    for (int i = 0; i < nt; ++i)
      for (int b = 0; b < NB; ++b) _mm512_storeu_ps(k32 + int64_t(t0 + i) * Dv + 16 * (b0 + b), a[i][b]);
  }
}

template <bool kOddR>
inline void expand_bf16(const uint16_t* lat, int64_t stride, int n, int R, const int32_t* t, int Dv, float* k32) {
  int b = 0;
  const int nb = Dv / 16;
  for (; b + 4 <= nb; b += 4) expand_bf16_block<4, kOddR>(lat, stride, n, R, t, Dv, b, k32);
  for (; b + 2 <= nb; b += 2) expand_bf16_block<2, kOddR>(lat, stride, n, R, t, Dv, b, k32);
  for (; b < nb; ++b) expand_bf16_block<1, kOddR>(lat, stride, n, R, t, Dv, b, k32);
}

// k32 [n][Dv] fp32 = the n latents (read in place, `stride` elements apart) x the table in pairs
inline void expand_page_bf16(const uint16_t* lat, int64_t stride, int n, int R, const uint16_t* tbl, int Dv, float* k32, bool amx) {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  if (amx && R % 2 == 0) {  // [n, R] (read in place from the page) x [R, Dv] -> fp32
    at::native::cpublas::brgemm(n, Dv, R, stride, Dv, Dv, false, reinterpret_cast<const at::BFloat16*>(lat),
                                reinterpret_cast<const at::BFloat16*>(tbl), k32);
    return;
  }
#endif
  const int32_t* t = reinterpret_cast<const int32_t*>(tbl);
  if (R % 2) {
    expand_bf16<true>(lat, stride, n, R, t, Dv, k32);
  } else {
    expand_bf16<false>(lat, stride, n, R, t, Dv, k32);
  }
}

// kb[t][0 : D] = bf16(RoPE(k32[t])) at positions pos0 + t0 + t (NeoX pairs f, f + half), pos0 the
// page's first position and t0 + t the offset in the page. The angles come by angle addition,
// cos((pos0 + o) w) = cos(pos0 w) cos(o w) - sin(pos0 w) sin(o w) (likewise sin), from the table's
// row pos0 and its rows 0 .. block_size - 1: a decode over a long context then reads one row of the
// big table per page instead of one per token, and the offset rows stay in the caches.
THINKEYS_ALWAYS_INLINE void rope_one(const float* k, const float* cb, const float* sb, __m512 ca, __m512 sa, int half, int f, __mmask16 m,
                                     uint16_t* o) {
  const __m512 x1 = _mm512_maskz_loadu_ps(m, k + f), x2 = _mm512_maskz_loadu_ps(m, k + half + f);
  const __m512 cbv = _mm512_maskz_loadu_ps(m, cb + f), sbv = _mm512_maskz_loadu_ps(m, sb + f);
  const __m512 c = _mm512_fmsub_ps(ca, cbv, _mm512_mul_ps(sa, sbv));
  const __m512 s = _mm512_fmadd_ps(sa, cbv, _mm512_mul_ps(ca, sbv));
  const __m512 y1 = _mm512_fmsub_ps(x1, c, _mm512_mul_ps(x2, s));
  const __m512 y2 = _mm512_fmadd_ps(x2, c, _mm512_mul_ps(x1, s));
  if (m == __mmask16(0xFFFF)) {  // plain stores: masked stores are slow on some CPUs
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + f), (__m256i)_mm512_cvtneps_pbh(y1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + half + f), (__m256i)_mm512_cvtneps_pbh(y2));
  } else {
    _mm256_mask_storeu_epi16(o + f, m, (__m256i)_mm512_cvtneps_pbh(y1));
    _mm256_mask_storeu_epi16(o + half + f, m, (__m256i)_mm512_cvtneps_pbh(y2));
  }
}

inline void rope_to_bf16(const float* __restrict k32, int Dv, int n, int D, const float* __restrict cos, const float* __restrict sin,
                         int64_t cs_row, int64_t cs_off, int pos0, int t0, uint16_t* __restrict kb, int kb_stride) {
  const int half = D / 2;
  const float* cp = cos + int64_t(pos0) * cs_row + cs_off;  // the page's angle
  const float* sp = sin + int64_t(pos0) * cs_row + cs_off;
  for (int f = 0; f < half; f += 16) {
    const __mmask16 m = half - f >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (half - f)) - 1);
    const __m512 ca = _mm512_maskz_loadu_ps(m, cp + f), sa = _mm512_maskz_loadu_ps(m, sp + f);
    for (int t = 0; t < n; ++t) {
      const int64_t off = int64_t(t0 + t) * cs_row + cs_off;  // the token's offset angle
      rope_one(k32 + int64_t(t) * Dv, cos + off, sin + off, ca, sa, half, f, m, kb + int64_t(t0 + t) * kb_stride);
    }
  }
}

// Rows i0 .. i1 - 1 of the next chunk (slot_bytes each, pf_stride apart), a few per step of this one, so the
// prefetches spread over the chunk's work (a burst would fill the miss buffers).
THINKEYS_ALWAYS_INLINE void prefetch_spread(const uint8_t* pf, int i0, int i1, int64_t pf_stride, int slot_bytes) {
  for (int i = i0; i < i1; ++i)
    for (int o = 0; o < slot_bytes; o += 64) __builtin_prefetch(pf + int64_t(i) * pf_stride + o, 0, 3);
}

// Whether the tokens-in-lanes expansions (expand_group_bf16 / expand_group_i8) handle D, else expansion then rope_to_bf16.
inline bool fused_rope(int D) { return D == 32 || D == 64 || D == 128; }

bool int8_expansion_supported() {
  static const bool ok = bf16_dot_supported() && __builtin_cpu_supports("avx512vnni");
  return ok;
}

// ---- int8 expansion, tokens in lanes (products_i8) ----
// int8 latents (int8_per_token_head codes c) times the table quantized to int8 per output channel
// (A^T ~ s_ch * a_q): vpdpbusd multiplies four unsigned by four signed bytes per lane, so the codes
// come in as c + 128 (xor 0x80) and 128 * sum_m a_q[m][ch] comes off; 64 products per instruction
// where vdpbf16ps gives 32, and the latents are never widened to bf16. Then k = s_ch * (acc - bias)
// in fp32 and rotated, then scored or rounded to bf16 into K^T (the token's factor multiplies its scores,
// as for every 8-bit page). Exact integer sums (|acc| < 2^24); the approximation is the table's int8 rounding, which
// the float64 reference of the tests reproduces (rebuild_kernel.int8_table). Latent bytes past R (a
// slot's first value codes) meet zero table rows.
// The scoring loops read a page's keys as K^T in channel pairs, kt [P][nt]. With tokens in the lanes
// of the expansion the keys come out in that layout and need no transpose (pack_key_groups): 16
// tokens' latent quads (rows_to_lanes) are the unsigned operand of vpdpbusd, a table entry
// broadcast per channel the signed one. A pair is then (channel f, channel f + D / 2), RoPE's own
// pair: both come out of one rotation, and the query is packed in the same pairing (rope_paired_query).

// acc += u . (the four signed bytes at s, broadcast): vpdpbusd with an embedded-broadcast operand. Inline
// assembly: with the intrinsic, GCC 12 copies every accumulator of an unrolled block twice per step.
THINKEYS_ALWAYS_INLINE __m512i dp_u8s8_bcast(__m512i acc, __m512i u, const int32_t* s) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*s));
  return acc;
}

// acc += a . (the bf16 pair at b, broadcast): vdpbf16ps with an embedded-broadcast operand (as dp_u8s8_bcast).
THINKEYS_ALWAYS_INLINE __m512 dp_bf16_bcast(__m512 acc, __m512i a, const int32_t* b) {
  asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(a), "m"(*b));
  return acc;
}

// Word permutation interleaving the two halves of a vector: lane t of the result is (word t, word 16 + t).
THINKEYS_ALWAYS_INLINE __m512i interleave_halves_idx() {
  return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}

// The first `bytes` (a multiple of 4) of `cnt` <= 16 rows (`row_stride` bytes apart) as 32-bit words with
// tokens in lanes: lq [bytes / 4][16] int32 (lanes past cnt zero); kFlip: every byte xor 0x80 (int8 codes as
// c + 128). For int8 latents the words are quads of codes (bytes = R rounded up to 4: bytes past R are value
// codes, met by zero table rows), for bf16 latents pairs.
template <bool kFlip>
THINKEYS_ALWAYS_INLINE void rows_to_lanes(const uint8_t* rows, int64_t row_stride, int cnt, int bytes, int32_t* __restrict lq) {
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int o = 0; o < bytes; o += 64) {
    const int w = std::min(64, bytes - o);
    const __mmask64 m = w == 64 ? ~__mmask64(0) : (__mmask64(1) << w) - 1;
    __m512i r[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) {
      const __m512i x = t < cnt ? _mm512_maskz_loadu_epi8(m, rows + t * row_stride + o) : _mm512_setzero_si512();
      r[t] = kFlip && t < cnt ? _mm512_xor_si512(x, flip) : x;
    }
    transpose16x16_epi32(r);
#pragma GCC unroll 16
    for (int k = 0; k < 16; ++k)  // unrolled with a test, not a loop to w / 4: r stays in registers
      if (4 * k < w) _mm512_storeu_si512(lq + (o / 4 + k) * 16, r[k]);
  }
}

// A group of cnt <= 16 tokens as the tokens-in-lanes expansions see it: where its angles are and what to
// prefetch meanwhile (the next chunk's cache rows, a few per block of channels).
struct ExpandGroup {
  const float* lane_cos;  // the group's first position in the transposed cos / sin tables (rows lane_stride apart)
  const float* lane_sin;
  int64_t lane_stride;
  int cnt;  // live tokens (lanes past them: zero latents)
  const uint8_t* pf;  // pf_n rows of slot_bytes, pf_stride apart
  int pf_n;
  int64_t pf_stride;
  int slot_bytes;
};

// Channel pair (f, f + D / 2) of 16 tokens (x1, x2: fp32, tokens in lanes) rotated at the tokens' positions
// (one load per table: the lane tables hold 16 consecutive positions of a channel side by side).
THINKEYS_ALWAYS_INLINE void rope_pair(__m512& x1, __m512& x2, int f, const ExpandGroup& e) {
  const __m512 c = _mm512_loadu_ps(e.lane_cos + f * e.lane_stride), s = _mm512_loadu_ps(e.lane_sin + f * e.lane_stride);
  const __m512 y1 = _mm512_fmsub_ps(x1, c, _mm512_mul_ps(x2, s));
  const __m512 y2 = _mm512_fmadd_ps(x2, c, _mm512_mul_ps(x1, s));
  x1 = y1, x2 = y2;
}

// The expansions' driver: per block of FB = 8 channel pairs, products(f0, x1, x2) gives the fp32 keys (16
// tokens in lanes) of channels f0 .. f0 + 7 in x1 and of their RoPE partners f0 + D / 2 .. in x2; each pair
// is rotated (rope_pair) and handed to sink(f, y1, y2).
template <int D, typename Products, typename Sink>
THINKEYS_ALWAYS_INLINE void expand_rotate(const ExpandGroup& e, Products&& products, Sink&& sink) {
  constexpr int half = D / 2, FB = 8, blocks = half / FB;
  for (int f0 = 0; f0 < half; f0 += FB) {
    const int step = (e.pf_n + blocks - 1) / blocks, i0 = f0 / FB * step;
    prefetch_spread(e.pf, i0, std::min(i0 + step, e.pf_n), e.pf_stride, e.slot_bytes);
    __m512 x1[FB], x2[FB];
    products(f0, x1, x2);
#pragma GCC unroll 8
    for (int k = 0; k < FB; ++k) {  // unrolled: x1 / x2 stay in registers
      rope_pair(x1[k], x2[k], f0 + k, e);
      sink(f0 + k, x1[k], x2[k]);
    }
  }
}

// K^T of the group: kt[f][0 : 16] (f < D / 2; rows nt apart) = bf16 pairs (channel f, channel f + D / 2) of
// the rebuilt, rotated keys, tokens in lanes (past cnt: zero); what score_groups reads.
template <int D, typename Products>
inline void expand_kt(const ExpandGroup& e, int32_t* __restrict kt, int nt, Products&& products) {
  const __mmask16 live = e.cnt >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << e.cnt) - 1);
  const __m512i idx = interleave_halves_idx();
  expand_rotate<D>(e, products, [&](int f, __m512 y1, __m512 y2) {
    const __m512i pr = _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(y2, y1));
    _mm512_storeu_si512(kt + int64_t(f) * nt, _mm512_maskz_mov_epi32(live, pr));
  });
}

// Decodes: the scores fused into the expansion. sr[g * srow + 0 : 16] = the raw scores of the group's 16
// tokens for the G query heads (q32 [G][D] fp32, the rotated query), accumulated from each rotated channel
// pair in fp32 as it comes out: no K^T is stored and the keys are not rounded to bf16. Two sums per head
// (channels f and f + D / 2) for G <= 4, so the dependent FMA chains are half as long.
template <int D, int G, typename Products>
inline void expand_scores(const ExpandGroup& e, const float* __restrict q32, float* __restrict sr, int srow, Products&& products) {
  constexpr int half = D / 2, NS = G <= 4 ? 2 : 1;
  __m512 acc[NS][G];
  for (int i = 0; i < NS; ++i)
    for (int g = 0; g < G; ++g) acc[i][g] = _mm512_setzero_ps();
  expand_rotate<D>(e, products, [&](int f, __m512 y1, __m512 y2) {
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      acc[0][g] = _mm512_fmadd_ps(_mm512_set1_ps(q32[g * D + f]), y1, acc[0][g]);
      acc[NS - 1][g] = _mm512_fmadd_ps(_mm512_set1_ps(q32[g * D + half + f]), y2, acc[NS - 1][g]);
    }
  });
  for (int g = 0; g < G; ++g) _mm512_storeu_ps(sr + int64_t(g) * srow, NS == 2 ? _mm512_add_ps(acc[0][g], acc[NS - 1][g]) : acc[0][g]);
}

// The query heads a fused decode handles (expand_scores' G).
constexpr int kFusedMaxG = 8;

// One group through expand_scores (q32 given: G heads) or into K^T, for D of 32, 64 or 128; products(D tag,
// f0, x1, x2) is called with std::integral_constant<int, D>.
template <typename Products>
inline void expand_group(int D, int G, const ExpandGroup& e, const float* q32, float* sr, int srow, int32_t* kt, int nt, Products&& products) {
  auto with_d = [&](auto dtag) {
    constexpr int DD = decltype(dtag)::value;
    auto prod = [&](int f0, __m512* x1, __m512* x2) { products(dtag, f0, x1, x2); };
    if (!q32) return expand_kt<DD>(e, kt, nt, prod);
    switch (G) {
#define THINKEYS_FUSED_G(NG) \
  case NG: return expand_scores<DD, NG>(e, q32, sr, srow, prod);
      THINKEYS_FUSED_G(1)
      THINKEYS_FUSED_G(2)
      THINKEYS_FUSED_G(3)
      THINKEYS_FUSED_G(4)
      THINKEYS_FUSED_G(5)
      THINKEYS_FUSED_G(6)
      THINKEYS_FUSED_G(7)
#undef THINKEYS_FUSED_G
      default: return expand_scores<DD, kFusedMaxG>(e, q32, sr, srow, prod);
    }
  };
  switch (D) {
    case 32: with_d(std::integral_constant<int, 32>{}); break;
    case 64: with_d(std::integral_constant<int, 64>{}); break;
    default: with_d(std::integral_constant<int, 128>{}); break;
  }
}

// The int8 expansion's products for channels f0 .. f0 + 7 (x1) and f0 + D / 2 .. (x2) of a group's 16 tokens:
// lq [quads][16] the latent quads (rows_to_lanes<true>), tbl [quads][D] the int8 table in quads, bias [D] the
// channels' 128 * column sums as int32 (the sums start there: exact), qs [D] the channel scales
// (k = scale * (acc - bias)).
template <int D>
THINKEYS_ALWAYS_INLINE void products_i8(const int32_t* __restrict lq, int quads, const int32_t* __restrict tbl, const int32_t* __restrict bias,
                                        const float* __restrict qs, int f0, __m512* x1, __m512* x2) {
  constexpr int half = D / 2, FB = 8;
  __m512i a1[FB], a2[FB];
  for (int k = 0; k < FB; ++k) a1[k] = _mm512_set1_epi32(-bias[f0 + k]), a2[k] = _mm512_set1_epi32(-bias[half + f0 + k]);
  for (int qq = 0; qq < quads; ++qq) {
    const __m512i l = _mm512_loadu_si512(lq + qq * 16);
    const int32_t* t = tbl + qq * D + f0;
#pragma GCC unroll 8
    for (int k = 0; k < FB; ++k) {
      a1[k] = dp_u8s8_bcast(a1[k], l, t + k);
      a2[k] = dp_u8s8_bcast(a2[k], l, t + half + k);
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < FB; ++k) {
    x1[k] = _mm512_mul_ps(_mm512_cvtepi32_ps(a1[k]), _mm512_set1_ps(qs[f0 + k]));
    x2[k] = _mm512_mul_ps(_mm512_cvtepi32_ps(a2[k]), _mm512_set1_ps(qs[half + f0 + k]));
  }
}

// The bf16 expansion's products (as products_i8): lp [pairs][16] int32 (rows_to_lanes<false>: latent pairs,
// tokens in lanes) times the bf16 table in VNNI pairs (tbl [pairs][D] int32, a pair broadcast per channel) by
// vdpbf16ps, in fp32; or, given amx (amx_expansion_chunk's [D][16] fp32 products of the group), those.
template <int D>
THINKEYS_ALWAYS_INLINE void products_bf16(const int32_t* __restrict lp, int pairs, const int32_t* __restrict tbl, const float* __restrict amx,
                                          int f0, __m512* x1, __m512* x2) {
  constexpr int half = D / 2, FB = 8;
  if (amx) {
#pragma GCC unroll 8
    for (int k = 0; k < FB; ++k) x1[k] = _mm512_loadu_ps(amx + (f0 + k) * 16), x2[k] = _mm512_loadu_ps(amx + (half + f0 + k) * 16);
    return;
  }
  for (int k = 0; k < FB; ++k) x1[k] = x2[k] = _mm512_setzero_ps();
  for (int pp = 0; pp < pairs; ++pp) {
    const __m512i l = _mm512_loadu_si512(lp + pp * 16);
    const int32_t* t = tbl + pp * D + f0;
#pragma GCC unroll 8
    for (int k = 0; k < FB; ++k) {
      x1[k] = dp_bf16_bcast(x1[k], l, t + k);
      x2[k] = dp_bf16_bcast(x2[k], l, t + half + k);
    }
  }
}

// A group of int8 latents (lq: its quads; quads [R4 / 4][D][4] int8 table, bias and qs as products_i8), into K^T
// or (q32 given) into scores: see expand_group.
inline void expand_group_i8(int D, int G, const ExpandGroup& e, const int32_t* lq, int R, const int8_t* quads, const int32_t* bias,
                            const float* qs, const float* q32, float* sr, int srow, int32_t* kt, int nt) {
  const int32_t* t = reinterpret_cast<const int32_t*>(quads);
  const int nq = (R + 3) / 4;
  expand_group(D, G, e, q32, sr, srow, kt, nt, [&](auto dtag, int f0, __m512* x1, __m512* x2) {
    products_i8<decltype(dtag)::value>(lq, nq, t, bias, qs, f0, x1, x2);
  });
}

// A group of bf16 latents (lp: its pairs; pairs_tbl the VNNI table; amx: its products from tiles, or null), as expand_group_i8.
inline void expand_group_bf16(int D, int G, const ExpandGroup& e, const int32_t* lp, int R, const uint16_t* pairs_tbl, const float* amx,
                              const float* q32, float* sr, int srow, int32_t* kt, int nt) {
  const int32_t* t = reinterpret_cast<const int32_t*>(pairs_tbl);
  const int np = (R + 1) / 2;
  expand_group(D, G, e, q32, sr, srow, kt, nt, [&](auto dtag, int f0, __m512* x1, __m512* x2) {
    products_bf16<decltype(dtag)::value>(lp, np, t, amx, f0, x1, x2);
  });
}

// The KV heads' bf16 tables as rows of channels [H_kv][Dv][Rp] (AMX's A operand) from the VNNI pairs
// [H_kv][Rp / 2][Dv][2], once per call and thread.
inline const uint16_t* table_rows(ScratchBf16& s, const uint16_t* pairs, int H_kv, int Rp, int Dv, int64_t call) {
  if (s.table_rows_src != pairs || s.table_rows_call != call) {
    s.table_rows.resize(size_t(H_kv) * Dv * Rp);
    for (int h = 0; h < H_kv; ++h)
      for (int q = 0; q < Rp / 2; ++q)
        for (int c = 0; c < Dv; ++c)
          std::memcpy(s.table_rows.data() + (int64_t(h) * Dv + c) * Rp + 2 * q, pairs + ((int64_t(h) * (Rp / 2) + q) * Dv + c) * 2, 4);
    s.table_rows_src = pairs, s.table_rows_call = call;
  }
  return s.table_rows.data();
}

// The query's D bf16 channels as the pairs expand_kt writes: (f, f + D / 2), f < D / 2 (D of 32, 64, 128).
inline void rope_paired_query(const uint16_t* __restrict src, int D, uint16_t* __restrict dst) {
  const int half = D / 2;
  const __m512i idx = interleave_halves_idx();
  for (int f = 0; f < half; f += 16) {
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + f));
    const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + half + f));
    _mm512_storeu_si512(dst + 2 * f, _mm512_permutexvar_epi16(idx, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)));
  }
}

// ---- P.V on the int8 value codes (Int8Quads pages) ----
// An int8_per_token_head page's values are read as the codes they are: per row and page, the
// probabilities times the values' factors (p_t vs_t >= 0) are rounded to int16 steps of their page
// maximum / 32767, and vpdpwssd sums q_t * code_t, two tokens per lane, exactly in int32; the row's
// factor (maximum / 32767) then scales the page's sums into the fp32 accumulators. No widened copy of
// the values is made, and P.V reads 1 byte per value instead of 2. The rounding is relative to the
// page's largest term (2^-15 of it), finer than bf16 probabilities for every term above 2^-7 of it.

// acc += a . b, pairs of signed 16-bit integers per 32-bit lane (inline assembly, as dp_u8s8_bcast).
THINKEYS_ALWAYS_INLINE __m512i dp_i16(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}

// softmax_row for int8 values: the probabilities times vs as int16 steps of their page maximum (pr, zero
// from vis up to `width`) and that step (pscale); sr is overwritten with the fp32 terms on the way.
inline void softmax_row_i16(float* __restrict sr, int vis, int width, float scale, int16_t* __restrict pr, float& row_max, float& row_sum,
                            float* __restrict ar, int acc_width, const float* __restrict ks, const float* __restrict vs, float& pscale) {
  __m512 top = _mm512_setzero_ps();
  int j = online_softmax_step(sr, vis, scale, row_max, row_sum, ar, acc_width, ks, vs, [&](int j, __m512 p) {
    top = _mm512_max_ps(top, p);
    _mm512_storeu_ps(sr + j, p);
  });
  const float m = _mm512_reduce_max_ps(top);
  const __m512 inv = _mm512_set1_ps(m > 0.0f ? 32767.0f / m : 0.0f);
  for (j = 0; j < vis; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(sr + j), inv))));
  if (j < width) std::memset(pr + j, 0, sizeof(int16_t) * (width - j));
  pscale = m / 32767.0f;
}

// pv_block on int8 values: RB rows x NC 32-channel chunks (from chunk c0), token pairs [j0, j1) of the
// page, codes read in place (rows row_bytes apart; token 2j + 1 >= n reads as zeros) and sign-extended to
// 16 bits, int16 probabilities; int32 sums in registers, added to acc times the row's pscale (pv_block's
// channel order: vpunpck[lh]wd interleave 16-bit channels the same way).
template <int RB, int NC>
THINKEYS_ALWAYS_INLINE void pv_block_i8(const int16_t* __restrict probs, int srow, const uint8_t* __restrict values, int64_t row_bytes, int j0,
                                        int j1, int n, int D, int c0, float* __restrict acc, int acc_stride, const float* __restrict pscale) {
  __m512i a[RB][2 * NC];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < 2 * NC; ++v) a[r][v] = _mm512_setzero_si512();
  __mmask32 m[NC];
  for (int k = 0; k < NC; ++k) {
    const int w = std::min(32, D - 32 * (c0 + k));
    m[k] = w >= 32 ? ~__mmask32(0) : (__mmask32(1) << w) - 1;
  }
  for (int j = j0; j < j1; ++j) {
    const uint8_t* v0 = values + int64_t(2 * j) * row_bytes + 32 * c0;
    const bool has1 = 2 * j + 1 < n;
    __m512i lo[NC], hi[NC];
    for (int k = 0; k < NC; ++k) {
      const __m512i x0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m[k], v0 + 32 * k));
      const __m512i x1 = has1 ? _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m[k], v0 + row_bytes + 32 * k)) : _mm512_setzero_si512();
      lo[k] = _mm512_unpacklo_epi16(x0, x1);
      hi[k] = _mm512_unpackhi_epi16(x0, x1);
    }
    for (int r = 0; r < RB; ++r) {
      int32_t bits;
      std::memcpy(&bits, probs + int64_t(r) * srow + 2 * j, sizeof(bits));
      const __m512i pb = _mm512_set1_epi32(bits);
      for (int k = 0; k < NC; ++k) {
        a[r][2 * k] = dp_i16(a[r][2 * k], lo[k], pb);
        a[r][2 * k + 1] = dp_i16(a[r][2 * k + 1], hi[k], pb);
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    const __m512 f = _mm512_set1_ps(pscale[r]);
    for (int v = 0; v < 2 * NC; ++v) {
      float* o = acc + int64_t(r) * acc_stride + 32 * c0 + 16 * v;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][v]), f, _mm512_loadu_ps(o)));
    }
  }
}

// acc[rows][32 C] += probs . int8 values of the page, as pv_page; int32 sums flushed every 128 token pairs
// (|sum| < 256 x 32767 x 127 < 2^31).
inline void pv_page_i8(const int16_t* probs, int srow, int rows, const uint8_t* values, int64_t row_bytes, int vis, int n, int D, int C,
                       float* acc, const float* pscale) {
  const int pairs = (vis + 1) / 2;
  for (int j0 = 0; j0 < pairs; j0 += 128) {
    const int j1 = std::min(pairs, j0 + 128);
    for (int r0 = 0; r0 < rows; r0 += 4) {
      const int rb = std::min(4, rows - r0);
      const int16_t* pr = probs + int64_t(r0) * srow;
      float* ar = acc + int64_t(r0) * C * 32;
      for (int c0 = 0; c0 < C; c0 += 2) {
        const bool two = c0 + 2 <= C;
#define THINKEYS_PV8(RB)                                                                                   \
  (two ? pv_block_i8<RB, 2>(pr, srow, values, row_bytes, j0, j1, n, D, c0, ar, C * 32, pscale + r0)      \
       : pv_block_i8<RB, 1>(pr, srow, values, row_bytes, j0, j1, n, D, c0, ar, C * 32, pscale + r0))
        switch (rb) {
          case 4: THINKEYS_PV8(4); break;
          case 3: THINKEYS_PV8(3); break;
          case 2: THINKEYS_PV8(2); break;
          default: THINKEYS_PV8(1); break;
        }
#undef THINKEYS_PV8
      }
    }
  }
}

// attend_page_bf16 (its vdpbf16ps branch) for int8_per_token_head pages read as codes: scores against
// kt, softmax with int16 probabilities (softmax_row_i16), P.V on the value codes in place (values: the
// page's first value code, rows row_bytes apart; ks / vs: per-token factors; pscale: [rows] scratch).
// scored: the tile's scores are already in t.scores (expand_scores), kt is not read.
inline void attend_page_i8(const TileBf16& t, const int32_t* __restrict kt, int nt, int n, int page_start, const uint8_t* __restrict values,
                           int64_t row_bytes, const float* ks, const float* vs, float* pscale, bool scored) {
  const int P = t.P, C = t.C, srow = t.srow;
  const int ng_pad = nt / 16;
  const int max_vis = std::min(n, t.context + t.q_begin + t.nq - page_start);  // the tile's last query
  const int width = (max_vis + 1) / 2 * 2;
  int16_t* probs = reinterpret_cast<int16_t*>(t.probs);
  for (int i = 0; i < t.nq; ++i) {
    const int vis = std::min(n, t.context + t.q_begin + i + 1 - page_start);
    const int vg = (vis + 15) / 16;
    for (int g = 0; g < t.G; ++g) {
      const int row = i * t.G + g;
      int16_t* pr = probs + int64_t(row) * srow;
      if (vis <= 0) {
        std::memset(pr, 0, sizeof(int16_t) * width);
        pscale[row] = 0.0f;
        continue;
      }
      float* sr = t.scores + int64_t(row) * srow;
      const int32_t* qp = t.q + row * P;
      int g0 = scored ? vg : 0;
      for (; g0 + 8 <= vg || (g0 + 4 < vg && g0 + 8 <= ng_pad); g0 += 8) score_groups<8>(qp, kt, P, nt, g0, sr);
      for (; g0 < vg; g0 += 4) score_groups<4>(qp, kt, P, nt, g0, sr);
      softmax_row_i16(sr, vis, width, t.scale, pr, t.row_max[row], t.row_sum[row], t.acc + int64_t(row) * C * 32, C * 32, ks, vs, pscale[row]);
    }
  }
  pv_page_i8(probs, srow, t.rows, values, row_bytes, max_vis, n, t.D, C, t.acc, pscale);
}

constexpr int kRebuildChunk = 32;  // tokens expanded, rotated and packed at a time (two groups of 16; scratch stays in L1)

// 8-bit caches: the key is s * RoPE(A^T c_q) for codes c_q and factor s (RoPE and the expansion are
// linear), so the codes are widened to bf16 exactly, expanded and rotated like a bf16 latent, and
// the factor multiplies the scores (and the value's the probabilities) in attend_page_bf16.
template <typename Enc>
void attend_tile_bf16(const Problem<c10::BFloat16>& p, const WorkItem& w, ScratchBf16& s, bool& used_brgemm) {
  const int G = p.G, R = p.R, D = p.D, BS = p.block_size;
  const int P = (D + 31) / 32 * 16;  // channel pairs of a rebuilt key, padded to whole 32-channel loads
  const int C = (D + 31) / 32;
  const int Dv = (D + 15) / 16 * 16;  // the expansion's output width
  const int q_start = p.qsl[w.req], q_len = p.qsl[w.req + 1] - q_start, kv_len = p.lens[w.req];
  const int nq = w.q1 - w.q0, rows = nq * G;
  const int srow = ((BS + 15) / 16 + 7) / 8 * 8 * 16;  // tokens of a page rounded up to 8 groups of 16
  // AMX brgemm (where on) for the requests with new tokens to prefill: the expansion of whole pages, scores and
  // P.V of tiles of >= kAmxRows rows; decodes take the vdpbf16ps / int8 paths, faster for one query a request
  const bool amx = !Enc::kQuads && amx_brgemm_supported() && q_len > 1;
  const bool fused = fused_rope(D);
  // keys expanded with tokens in lanes straight into K^T (expand_group_i8 / expand_group_bf16; pairs (f, f + D / 2))
  const bool kt_direct = Enc::kQuads || (fused && !amx);
  // decodes: the scores come out of the expansion (expand_scores), in fp32, with no K^T in between
  const bool fused_scores = kt_direct && q_len == 1 && G <= kFusedMaxG;
  s.fit(rows, P, C, Dv, srow);
  const TileBf16 t{nq, G, rows, P, C, D, srow, kv_len - q_len, w.q0, p.scale, rows >= kAmxRows && amx,
                   s.q.data(), s.scores.data(), s.probs.data(), s.acc.data(), s.row_max.data(), s.row_sum.data()};
  for (int i = 0; i < nq; ++i)
    for (int g = 0; g < G; ++g) {  // the query's bf16 channels as pairs, zero-padded to P pairs
      const uint16_t* src = reinterpret_cast<const uint16_t*>(p.query + int64_t(q_start + w.q0 + i) * p.q_tok + int64_t(w.head * G + g) * p.q_head);
      uint16_t* dst = reinterpret_cast<uint16_t*>(s.q.data() + int64_t(i * G + g) * P);
      if (fused_scores) {  // fp32 channels [G][D]
        float* q32 = s.q32.data() + int64_t(i * G + g) * D;
        for (int c = 0; c < D; ++c) q32[c] = c10::BFloat16(src[c], c10::BFloat16::from_bits());
      } else if (kt_direct) {  // expand_kt's pairs (f, f + D / 2)
        rope_paired_query(src, D, dst);
      } else {
        for (int c = 0; c < 2 * P; c += 32) _mm512_storeu_si512(dst + c, load_bf16_32(src + c, std::min(32, D - c)));
      }
    }
  std::fill(t.acc, t.acc + int64_t(rows) * C * 32, 0.0f);
  std::fill(t.row_max, t.row_max + rows, -std::numeric_limits<float>::infinity());
  std::fill(t.row_sum, t.row_sum + rows, 0.0f);

  // the rebuilt pages of this (call, request, KV head): kept across the request's tiles
  const int num_pages = (kv_len + BS - 1) / BS;
  const int64_t kt_page = int64_t(P) * srow, vp_page = int64_t(srow / 2) * C * 64;
  if (s.call != p.call || s.req != w.req || s.head != w.head) {
    s.call = p.call, s.req = w.req, s.head = w.head;
    s.nt.assign(num_pages, 0);
    s.vp_done.assign(num_pages, 0);
    // a decode reads each page once: one page's room, reused
    const int room = q_len > nq ? num_pages : 1;
    if (s.kt.size() < size_t(room) * kt_page) s.kt.resize(size_t(room) * kt_page);
    if (s.vp.size() < size_t(room) * vp_page) s.vp.resize(size_t(room) * vp_page);
  }
  const bool keep = q_len > nq;  // more than one tile: keep every page

  const uint16_t* tbl = p.expand_pairs + int64_t(w.head) * ((R + 1) / 2) * Dv * 2;
  const int R4 = (R + 3) / 4 * 4;  // latent bytes the int8 expansion reads per token
  const int8_t* quads = Enc::kQuads ? p.expand_quads + int64_t(w.head) * ((R + 3) / 4) * Dv * 4 : nullptr;
  const float* qs = Enc::kQuads ? p.quad_scale + int64_t(w.head) * 2 * Dv : nullptr;
  const int32_t* bias = nullptr;  // the int8 table's 128 * column sums as integers (exact: |sum| < 2^24)
  if constexpr (Enc::kQuads) {
    if (s.bias.size() < size_t(Dv)) s.bias.resize(Dv);
    for (int c = 0; c < Dv; ++c) s.bias[c] = int32_t(qs[Dv + c]);
    bias = s.bias.data();
  }
  const int64_t cs_row = int64_t(p.cs_heads) * (D / 2), cs_off = (p.cs_heads == 1 ? 0 : int64_t(w.head)) * (D / 2);
  constexpr bool kPlain = std::is_same_v<Enc, PlainBf16>;
  // bf16 elements from one token's slot to the next: in the cache, or in the widened 8-bit page
  const int64_t stride = kPlain ? p.c_tok : int64_t(R + D);
  const float* ks = nullptr;
  const float* vs = nullptr;
  if constexpr (!kPlain) {
    if (!Enc::kQuads && s.page8.size() < size_t(srow) * (R + D)) s.page8.resize(size_t(srow) * (R + D));
    if (Enc::kQuads && s.lat8.size() < size_t(srow) * R4) s.lat8.resize(size_t(srow) * R4);

    if (s.ks.size() < size_t(srow)) s.ks.resize(srow), s.vs.resize(srow);
    if (Enc::kQuads && s.pscale.size() < size_t(rows)) s.pscale.resize(rows);
    ks = s.ks.data();
    vs = s.vs.data();
  }
  const int64_t lane_off = (p.cs_heads == 1 ? 0 : int64_t(w.head)) * (D / 2) * p.lane_stride;  // the KV head's lane tables
  // decodes of bf16 (or widened 8-bit) latents on AMX-BF16 tiles where the CPU has them (R <= 32: one tile's K)
  const uint16_t* amx_rows = nullptr;
#if THINKEYS_AMX_EXPANSION
  if (!Enc::kQuads && kt_direct && amx_expansion_enabled() && R <= 32) {
    const int Rp = (R + 1) / 2 * 2;
    if (s.amx_acc.size() < size_t(2) * Dv * 16) s.amx_acc.resize(size_t(2) * Dv * 16);
    amx_rows = table_rows(s, p.expand_pairs, p.H_kv, Rp, Dv, p.call) + int64_t(w.head) * Dv * Rp;
    amx_expansion_configure(2 * Rp);
  }
#endif
  const int kv_end = t.context + w.q1;
  const int32_t* blocks = p.block_table + int64_t(w.req) * p.bt_stride;
  for (int page_start = 0, b = 0; page_start < kv_end; page_start += BS, ++b) {
    const uint16_t* page = reinterpret_cast<const uint16_t*>(p.cache + int64_t(blocks[b]) * p.c_block + int64_t(w.head) * p.c_head);
    const int n = std::min(BS, kv_end - page_start);
    const int slot = keep ? b : 0;
    const uint8_t* raw = kPlain ? nullptr : p.cache8 + int64_t(blocks[b]) * p.c_block + int64_t(w.head) * p.c_head;
    // 8-bit: the codes this visit reads (all the request's on the page when kept) are widened into
    // page8 a chunk at a time, just before their expansion, zero factors past them
    const int nw = keep ? std::min(BS, kv_len - page_start) : n;
    auto widen = [&](int j0, int j1, bool latents) {
      if constexpr (Enc::kQuads) {  // latent codes to c + 128 in quads, tokens in lanes (for products_i8); the factors
        if (latents)  // j0 is a multiple of 16
          for (int g0 = j0; g0 < j1; g0 += 16)
            rows_to_lanes<true>(raw + int64_t(g0) * p.c_tok, p.c_tok, std::min(16, j1 - g0), R4,
                                reinterpret_cast<int32_t*>(s.lat8.data() + int64_t(g0) * R4));
        for (int j = j0; j < j1; ++j) {  // the values stay codes (attend_page_i8): only their factors
          const uint8_t* row = raw + int64_t(j) * p.c_tok;
          float scales[2];
          std::memcpy(scales, row + R + D, sizeof(scales));
          s.ks[j] = scales[0] * Int8Code::kMul, s.vs[j] = scales[1] * Int8Code::kMul;
        }
      } else if constexpr (!kPlain) {
        uint16_t* dst = s.page8.data();
        for (int j = j0; j < j1; ++j)
          widen_slot_bf16<typename Enc::Code, Enc::kPerTokenHead>(raw + int64_t(j) * p.c_tok, dst + int64_t(j) * (R + D), R, D, p.k_scale,
                                                                  p.v_scale, s.ks[j], s.vs[j]);
      }
    };
    if constexpr (!kPlain) {
      std::fill(s.ks.begin() + nw, s.ks.begin() + srow, 0.0f);
      std::fill(s.vs.begin() + nw, s.vs.begin() + srow, 0.0f);
      page = s.page8.data();
    }
    // the cache rows of the next page (blocks are scattered: no hardware prefetch across them), as bytes
    const bool next_page = page_start + BS < kv_end;
    const uint8_t* next = !next_page ? nullptr
                          : kPlain   ? reinterpret_cast<const uint8_t*>(p.cache + int64_t(blocks[b + 1]) * p.c_block + int64_t(w.head) * p.c_head)
                                     : p.cache8 + int64_t(blocks[b + 1]) * p.c_block + int64_t(w.head) * p.c_head;
    const int64_t row_stride = kPlain ? p.c_tok * 2 : p.c_tok;  // bytes from one cached token to the next
    const int row_bytes = kPlain ? (R + D) * 2 : R + D + (Enc::kPerTokenHead ? 8 : 0);
    const uint8_t* rows = kPlain ? reinterpret_cast<const uint8_t*>(page) : raw;
    int32_t* kt = s.kt.data() + slot * kt_page;
    uint16_t* vp = s.vp.data() + slot * vp_page;
    if (!keep || s.nt[b] == 0) {  // rebuild: every token the request has on this page, a chunk at a time
      const int n_all = nw;
      const int nt = packed_tokens(n_all);
      for (int c0 = 0; c0 < n_all; c0 += kRebuildChunk) {
        const int m = std::min(kRebuildChunk, n_all - c0);
        widen(c0, c0 + m, true);
        // the next chunk's cache rows (on this page or the next): prefetched while this one is rebuilt
        const uint8_t* pf = nullptr;
        int pf_n = 0;
        if (c0 + kRebuildChunk < n_all) {
          pf = rows + (c0 + kRebuildChunk) * row_stride, pf_n = std::min(kRebuildChunk, n_all - c0 - kRebuildChunk);
        } else if (next_page) {
          pf = next, pf_n = std::min(kRebuildChunk, (keep ? kv_len : kv_end) - page_start - BS);
        }
        if (!kt_direct && pf) prefetch_rows(pf, pf_n, row_stride, row_bytes);  // (the K^T expansions spread theirs)
        // the tokens-in-lanes expansions' group from token g0: its angles in the lane tables, and the next chunk's
        // rows to prefetch meanwhile (the first half during the chunk's first group, the rest during its last)
        auto group_at = [&](int g0) {
          const int64_t lanes = lane_off + page_start + g0;
          const int i0 = g0 == c0 ? 0 : (pf_n + 1) / 2, i1 = g0 + 16 >= c0 + m ? pf_n : (pf_n + 1) / 2;
          return ExpandGroup{p.cos_lanes + lanes, p.sin_lanes + lanes, p.lane_stride, std::min(16, c0 + m - g0),
                             pf ? pf + i0 * row_stride : nullptr, std::max(0, i1 - i0), row_stride, row_bytes};
        };
        if constexpr (Enc::kQuads) {  // vpdpbusd expansion, tokens in lanes, RoPE in registers, into the scores or K^T
          for (int g0 = c0; g0 < c0 + m; g0 += 16) {
            const ExpandGroup e = group_at(g0);
            expand_group_i8(D, G, e, reinterpret_cast<const int32_t*>(s.lat8.data() + int64_t(g0) * R4), R, quads, bias, qs,
                            fused_scores ? s.q32.data() : nullptr, t.scores + g0, srow, kt + g0, nt);
          }
          continue;  // K^T (or the scores) written: no packing
        } else if (kt_direct) {  // bf16 expansion, tokens in lanes, RoPE in registers, into the scores or K^T
          const int pairs = (R + 1) / 2;
          if (s.lanes.size() < size_t(2) * pairs * 16) s.lanes.resize(size_t(2) * pairs * 16);
          for (int g0 = c0; g0 < c0 + m; g0 += 16) {
            int32_t* lp = s.lanes.data() + (g0 - c0) / 16 * pairs * 16;
            rows_to_lanes<false>(reinterpret_cast<const uint8_t*>(page + int64_t(g0) * stride), stride * 2, std::min(16, c0 + m - g0), 4 * pairs, lp);
            if (R % 2)  // the last pair's second half is the slot's first value channel: off
              for (int k = 0; k < 16; ++k) lp[(pairs - 1) * 16 + k] &= 0xFFFF;
          }
#if THINKEYS_AMX_EXPANSION
          if (amx_rows) amx_expansion_chunk(s.lanes.data(), (m + 15) / 16, amx_rows, 4 * pairs, D, s.amx_acc.data());  // the products on tiles
#endif
          for (int g0 = c0; g0 < c0 + m; g0 += 16) {
            const ExpandGroup e = group_at(g0);
            expand_group_bf16(D, G, e, s.lanes.data() + (g0 - c0) / 16 * pairs * 16, R, tbl,
                              amx_rows ? s.amx_acc.data() + (g0 - c0) / 16 * D * 16 : nullptr, fused_scores ? s.q32.data() : nullptr,
                              t.scores + g0, srow, kt + g0, nt);
          }
          continue;  // K^T (or the scores) written: no packing
        } else {  // expansion (AMX brgemm or vdpbf16ps) into fp32, then RoPE
          expand_page_bf16(page + c0 * stride, stride, m, R, tbl, Dv, s.k32.data(), amx);
          rope_to_bf16(s.k32.data(), Dv, m, D, p.cos, p.sin, cs_row, cs_off, page_start, c0, s.kb.data(), C * 32);
        }
        pack_key_groups(s.kb.data(), C * 32, D, n_all, P, nt, c0 / 16, (c0 + m + 15) / 16, kt);
      }
      if (!fused_scores)  // K^T's zero groups up to nt (fused scores read no K^T)
        pack_key_groups(s.kb.data(), C * 32, D, n_all, P, nt, (n_all + 15) / 16, nt / 16, kt);
      s.nt[b] = nt;
      s.vp_done[b] = 0;
    } else if constexpr (!kPlain) {  // a kept page rebuilt by an earlier tile: only its values are widened again
      widen(0, nw, false);
      if (next_page) prefetch_rows(next, std::min(BS, kv_len - page_start - BS), row_stride, row_bytes);
    }
    if constexpr (Enc::kQuads) {  // the values read as codes, in place
      attend_page_i8(t, kt, s.nt[b], n, page_start, raw + R, p.c_tok, ks, vs, s.pscale.data(), fused_scores);
      continue;
    }
    if (t.use_brgemm && !s.vp_done[b]) {
      pack_values_vnni(page + R, stride, keep ? std::min(BS, kv_len - page_start) : n, D, C, vp);
      s.vp_done[b] = keep;
    }
    attend_page_bf16(t, kt, s.nt[b], n, page_start, page + R, stride, vp, ks, vs, fused_scores);
  }
  used_brgemm = used_brgemm || t.use_brgemm || amx || amx_rows;
#if THINKEYS_AMX_EXPANSION
  if (amx_rows) at::native::cpublas::brgemm_release();  // our tile configuration must not look like cpublas' own to its next call
#endif

  for (int i = 0; i < nq; ++i)
    for (int g = 0; g < G; ++g)
      store_row_bf16(t, i * G + g, p.out + int64_t(q_start + w.q0 + i) * p.o_tok + int64_t(w.head * G + g) * p.o_head);
}
#pragma GCC pop_options
#endif

// ---- entry points -------------------------------------------------------------------------------

// Whether the bf16 form expands int8_per_token_head latents in int8 (products_i8) on this CPU.
bool int8_expansion_available() {
#if THINKEYS_AVX512BF16
  return int8_expansion_supported();
#else
  return false;
#endif
}

std::string kernel_isa() {
#if THINKEYS_AVX512BF16
  if (bf16_dot_supported()) return amx_brgemm_supported() ? "avx512bf16+amx" : "avx512bf16";
#endif
  return THINKEYS_AVX2 ? "avx2" : "portable";
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
    const at::Tensor& expand_pairs,  // [H_kv, ceil(R / 2), ceil16(D), 2] bfloat16, contiguous (the same, VNNI pairs)
    const at::Tensor& cos,  // [max_pos, H_cs, D / 2] float32, contiguous; H_cs = 1 or H_kv
    const at::Tensor& sin,
    const at::Tensor& block_table,  // [num_reqs, max_blocks] int32
    const at::Tensor& query_start_loc,  // [num_reqs + 1] int32
    const at::Tensor& seq_lens,  // [num_reqs] int32
    double scale,
    const at::Tensor& output,  // [T, H, D]
    c10::string_view cache_format,  // plain, or an 8-bit slot encoding (quant.KERNEL_FORMATS)
    double k_scale,  // per-tensor fp8 scales (1 otherwise)
    double v_scale,
    bool shared_kv,  // shared K=V slots [.., D (+ 4)]: one vector, the value and (rotated) the key; expand_t unused
    // int8_per_token_head: the table quantized per output channel (rebuild_kernel.int8_tables), used by the bf16 form
    // where int8_expansion_supported() and D is 32, 64 or 128 (rebuild_kernel.int8_expansion says so)
    const std::optional<at::Tensor>& expand_quads,  // [H_kv, ceil(R / 4), ceil16(D), 4] int8
    const std::optional<at::Tensor>& quad_scale,  // [H_kv, 2, ceil16(D)] float32: channel scales, then 128 * column sums
    // cos / sin transposed [H_cs, D / 2, >= P + 16] float32 (rebuild_kernel.rope_lane_tables): needed by the bf16 form
    const std::optional<at::Tensor>& cos_lanes,
    const std::optional<at::Tensor>& sin_lanes) {
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 4 && output.dim() == 3 && expand_t.dim() == 3 && cos.dim() == 3,
              "expected query [T, H, D], kv_cache [blocks, H_kv, block_size, R + D], expand_t [H_kv, R, D], cos/sin [P, H_cs, D/2], output [T, H, D]");
  const std::string format(cache_format.data(), cache_format.size());
  const bool plain = format == "plain";
  const bool per_token_head = format == "int8_per_token_head" || format == "fp8_per_token_head";
  TORCH_CHECK(plain || per_token_head || format == "fp8_e4m3" || format == "fp8_e5m2", "unknown cache_format '", format,
              "' (plain, fp8_e4m3, fp8_e5m2, int8_per_token_head or fp8_per_token_head)");
  TORCH_CHECK(query.scalar_type() == output.scalar_type() && (!plain || query.scalar_type() == kv_cache.scalar_type()),
              "query, kv_cache and output must share one dtype (query and output with an 8-bit cache)");
  TORCH_CHECK(expand_t.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "expand_t, cos and sin must be float32");
  TORCH_CHECK(expand_t.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes(),
              "expand_t, cos and sin must be contiguous (cos and sin of one shape)");
  TORCH_CHECK(query.stride(-1) == 1 && kv_cache.stride(-1) == 1 && output.stride(-1) == 1, "the channel dim of query, kv_cache and output must be contiguous");
  check_host_index(block_table, "block_table", 2);
  check_host_index(query_start_loc, "query_start_loc", 1);
  check_host_index(seq_lens, "seq_lens", 1);
  const int64_t H = query.size(1), D = query.size(2), H_kv = kv_cache.size(1), R = shared_kv ? D : expand_t.size(1);
  const int64_t block_size = kv_cache.size(2);
  TORCH_CHECK(D % 2 == 0, "D must be even (RoPE pairs)");
  const int64_t data = shared_kv ? D : R + D, vectors = shared_kv ? 1 : 2;
  if (plain) {
    TORCH_CHECK(kv_cache.size(3) == data, "kv_cache rows hold ", kv_cache.size(3), " channels, expected ", shared_kv ? "D = " : "R + D = ", data);
  } else {
    TORCH_CHECK(kv_cache.element_size() == 1, "an 8-bit cache_format needs a 1-byte kv_cache, got ", kv_cache.scalar_type());
    const int64_t expected = data + (per_token_head ? 4 * vectors : 0);
    TORCH_CHECK(kv_cache.size(3) == expected, "kv_cache rows hold ", kv_cache.size(3), " bytes, expected ", expected);
  }
  TORCH_CHECK(shared_kv || (expand_t.size(0) == H_kv && expand_t.size(2) == D), "expand_t must be [H_kv, R, D]");
  TORCH_CHECK(cos.size(1) == H_kv || cos.size(1) == 1, "cos/sin must be [P, H_kv or 1, D / 2]");
  TORCH_CHECK(cos.size(2) == D / 2, "cos/sin must be [P, H_cs, D / 2]");
  TORCH_CHECK(H % H_kv == 0, H, " query heads cannot share ", H_kv, " KV heads");
  TORCH_CHECK(output.size(1) == H && output.size(2) == D, "output must be [T, H, D]");
  const bool pairs_given = expand_pairs.numel() > 0;
  if (pairs_given) {
    TORCH_CHECK(expand_pairs.scalar_type() == at::kBFloat16 && expand_pairs.is_contiguous() && expand_pairs.dim() == 4 &&
                    expand_pairs.size(0) == H_kv && expand_pairs.size(1) == (R + 1) / 2 && expand_pairs.size(2) == (D + 15) / 16 * 16 &&
                    expand_pairs.size(3) == 2,
                "expand_pairs must be a contiguous bfloat16 [H_kv, ceil(R / 2), D rounded up to 16, 2]");
  }
  const int64_t num_reqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_reqs + 1 && block_table.size(0) >= num_reqs, "query_start_loc / block_table do not match ", num_reqs, " requests");

  // shared K=V slots are read by the fp32 form (it widens bf16 too)
  const bool bf16_form = THINKEYS_AVX512BF16 && query.scalar_type() == at::kBFloat16 && bf16_dot_supported() && !shared_kv;
  TORCH_CHECK(!bf16_form || pairs_given, "the bf16 form needs expand_pairs (see rebuild_kernel.prepared_tables)");
  const bool lanes_given = cos_lanes.has_value() && sin_lanes.has_value() && cos_lanes->numel() > 0;
  TORCH_CHECK(!bf16_form || lanes_given, "the bf16 form needs cos_lanes and sin_lanes (see rebuild_kernel.rope_lane_tables)");
  if (lanes_given) {
    TORCH_CHECK(cos_lanes->scalar_type() == at::kFloat && cos_lanes->is_contiguous() && sin_lanes->is_contiguous() &&
                    cos_lanes->sizes() == sin_lanes->sizes() && cos_lanes->dim() == 3 && cos_lanes->size(0) == cos.size(1) &&
                    cos_lanes->size(1) == D / 2 && cos_lanes->size(2) >= cos.size(0) + 16 && sin_lanes->scalar_type() == at::kFloat,
                "cos_lanes / sin_lanes must be contiguous float32 [H_cs, D / 2, >= P + 16], the tables cos / sin transposed");
  }
  const bool quads_given = expand_quads.has_value() && expand_quads->numel() > 0;
  if (quads_given) {
    TORCH_CHECK(expand_quads->scalar_type() == at::kChar && expand_quads->is_contiguous() && expand_quads->dim() == 4 &&
                    expand_quads->size(0) == H_kv && expand_quads->size(1) == (R + 3) / 4 && expand_quads->size(2) == (D + 15) / 16 * 16 &&
                    expand_quads->size(3) == 4,
                "expand_quads must be a contiguous int8 [H_kv, ceil(R / 4), D rounded up to 16, 4]");
    TORCH_CHECK(quad_scale.has_value() && quad_scale->scalar_type() == at::kFloat && quad_scale->is_contiguous() && quad_scale->dim() == 3 &&
                    quad_scale->size(0) == H_kv && quad_scale->size(1) == 2 && quad_scale->size(2) == (D + 15) / 16 * 16,
                "quad_scale must be a contiguous float32 [H_kv, 2, D rounded up to 16] beside expand_quads");
  }
  const bool int8_expansion = bf16_form && quads_given && format == "int8_per_token_head" && int8_expansion_available() && (D == 32 || D == 64 || D == 128);
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
    const int tile = q_len == 1 ? 1 : (bf16_form ? kQueryTileBf16 : kQueryTile);
    for (int64_t h = 0; h < H_kv; ++h)
      for (int q0 = 0; q0 < q_len; q0 += tile) items.push_back({int(i), int(h), q0, std::min(q_len, q0 + tile)});
  }
  if (items.empty()) return;
  const int64_t call = g_calls.fetch_add(1) + 1;

  dispatch_dtype(query.scalar_type(), "thinkeys_rebuild::paged_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    Problem<scalar_t> p{
        query.data_ptr<scalar_t>(), query.stride(0), query.stride(1),
        reinterpret_cast<const scalar_t*>(kv_cache.data_ptr()), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        output.data_ptr<scalar_t>(), output.stride(0), output.stride(1),
        expand_t.data_ptr<float>(), pairs_given ? reinterpret_cast<const uint16_t*>(expand_pairs.data_ptr()) : nullptr,
        cos.data_ptr<float>(), sin.data_ptr<float>(), int(cos.size(1)),
        lanes_given ? cos_lanes->data_ptr<float>() : nullptr, lanes_given ? sin_lanes->data_ptr<float>() : nullptr,
        lanes_given ? cos_lanes->size(2) : 0,
        block_table.data_ptr<int32_t>(), block_table.stride(0),
        qsl, lens,
        int(H_kv), int(H / H_kv), int(R), int(D), int(block_size), float(scale), call,
        plain ? nullptr : static_cast<const uint8_t*>(kv_cache.data_ptr()), float(k_scale), float(v_scale), shared_kv,
        int8_expansion ? expand_quads->data_ptr<int8_t>() : nullptr, int8_expansion ? quad_scale->data_ptr<float>() : nullptr};
#if THINKEYS_AVX512BF16
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bf16_form) {
        at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t begin, int64_t end) {
          ScratchBf16& s = thread_scratch_bf16();
          bool used_brgemm = false;
          auto run = [&](auto enc) {
            for (int64_t k = begin; k < end; ++k) attend_tile_bf16<decltype(enc)>(p, items[k], s, used_brgemm);
          };
          if (plain) run(PlainBf16{});
          else if (int8_expansion) run(Int8Quads{});
          else if (format == "int8_per_token_head") run(Codes8<Int8Code, true>{});
          else if (format == "fp8_per_token_head") run(Codes8<E4m3Code, true>{});
          else if (format == "fp8_e4m3") run(Codes8<E4m3Code, false>{});
          else run(Codes8<E5m2Code, false>{});
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
      auto run = [&](auto slot) {
        for (int64_t k = begin; k < end; ++k) attend_tile<scalar_t, decltype(slot)>(p, items[k], s);
      };
      if (shared_kv) {
        if (plain) run(SharedPlainSlot<scalar_t>{});
        else if (format == "int8_per_token_head") run(SharedPerTokenHeadSlot<Int8Code>{});
        else if (format == "fp8_per_token_head") run(SharedPerTokenHeadSlot<E4m3Code>{});
        else if (format == "fp8_e4m3") run(SharedPerTensorSlot<E4m3Code>{});
        else run(SharedPerTensorSlot<E5m2Code>{});
        return;
      }
      if (plain) run(PlainSlot<scalar_t>{});
      else if (format == "int8_per_token_head") run(PerTokenHeadSlot<Int8Code>{});
      else if (format == "fp8_per_token_head") run(PerTokenHeadSlot<E4m3Code>{});
      else if (format == "fp8_e4m3") run(PerTensorSlot<E4m3Code>{});
      else run(PerTensorSlot<E5m2Code>{});
    });
  });
}

}  // namespace
}  // namespace thinkeys

TORCH_LIBRARY(thinkeys_rebuild, m) {
  m.def("kernel_isa() -> str", &thinkeys::kernel_isa);
  m.def("int8_expansion_supported() -> bool", &thinkeys::int8_expansion_available);
  m.def("paged_attention(Tensor query, Tensor kv_cache, Tensor expand_t, Tensor expand_pairs, Tensor cos, Tensor sin, Tensor block_table, Tensor query_start_loc, Tensor seq_lens, float scale, Tensor(a!) output, str cache_format=\"plain\", float k_scale=1.0, float v_scale=1.0, bool shared_kv=False, Tensor? expand_quads=None, Tensor? quad_scale=None, Tensor? cos_lanes=None, Tensor? sin_lanes=None) -> ()");
}

TORCH_LIBRARY_IMPL(thinkeys_rebuild, CPU, m) {
  m.impl("paged_attention", &thinkeys::paged_attention);
}
