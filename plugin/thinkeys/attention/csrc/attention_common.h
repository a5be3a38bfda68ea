// Helpers shared by the thin-key kernel (paged_attention.cpp) and the rebuild-at-read kernel
// (rebuild_attention.cpp): element conversion, the AVX2 fp32 hot loops (scores eight tokens at a
// time, online softmax, P.V with register accumulators), and, in builds with -DTHINKEYS_BF16_FORM,
// the AVX512-BF16 section (vdpbf16ps scores and P.V, the 16 x 16 transpose that packs keys into
// channel pairs, the fp32 online softmax of a row, oneDNN's AMX brgemm switch). Everything is in
// an anonymous namespace: each extension library gets its own copy, so two libraries loaded in one
// process never interpose each other's symbols.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(THINKEYS_BF16_FORM) && defined(__AVX2__)
#include <string>
#include <ATen/native/CPUBlas.h>  // brgemm: oneDNN's AMX micro-kernel
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

// Hot helpers that must be inlined into their loops (a call would keep register arrays in memory)
#define THINKEYS_ALWAYS_INLINE inline __attribute__((always_inline))

namespace thinkeys {
namespace {

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

// ---- 8-bit codes -------------------------------------------------------------------------------
// Each code type turns bytes into fp32 up to a constant factor kMul that the caller folds into the
// scale: int8 is its integer value; fp8 goes through a half (see paged_attention.cpp's header
// comment). Shared by both kernels' 8-bit reads.

struct Int8Code {
  static constexpr float kMul = 1.0f;
  static float scalar(uint8_t b) { return float(int8_t(b)); }
#if THINKEYS_AVX2
  static __m256 load8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
#endif
};

struct E5m2Code {  // fp8 e5m2 = the high byte of an IEEE half
  static constexpr float kMul = 1.0f;
  static float scalar(uint8_t b) { return static_cast<float>(c10::Half(uint16_t(b) << 8, c10::Half::from_bits())); }
#if THINKEYS_AVX2
  static __m256 load8(const uint8_t* p) {
    const __m128i u = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtph_ps(_mm_slli_epi16(u, 8));
  }
#endif
};

struct E4m3Code {  // fp8 e4m3fn (bias 7) placed in a half (bias 15): value = half * 2^8
  static constexpr float kMul = 256.0f;
  static float scalar(uint8_t b) {
    const uint16_t h = uint16_t((b & 0x80) << 8) | uint16_t((b & 0x7F) << 7);
    return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
  }
#if THINKEYS_AVX2
  static __m256 load8(const uint8_t* p) {
    const __m128i u = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i sign = _mm_slli_epi16(_mm_and_si128(u, _mm_set1_epi16(0x80)), 8);
    const __m128i em = _mm_slli_epi16(_mm_and_si128(u, _mm_set1_epi16(0x7F)), 7);
    return _mm256_cvtph_ps(_mm_or_si128(sign, em));
  }
#endif
};


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

// dst[0 : n] = decode(src[0 : n]) * scale
template <typename Code>
inline void dequant_f32(const uint8_t* __restrict src, float* __restrict dst, int n, float scale) {
  const float s = scale * Code::kMul;
  int i = 0;
#if THINKEYS_AVX2
  const __m256 sv = _mm256_set1_ps(s);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_mul_ps(Code::load8(src + i), sv));
#endif
  for (; i < n; ++i) dst[i] = Code::scalar(src[i]) * s;
}

// ---- slot formats: one cache row (key | value [| scales]) to fp32 key [R] and value [D] ----------

template <typename T>
struct PlainSlot {
  static void load(const uint8_t* row, float* k, float* v, int R, int D, float, float) {
    const T* x = reinterpret_cast<const T*>(row);
    load_f32(x, k, R);
    load_f32(x + R, v, D);
  }
};

template <typename Code>
struct PerTensorSlot {
  static void load(const uint8_t* row, float* k, float* v, int R, int D, float k_scale, float v_scale) {
    dequant_f32<Code>(row, k, R, k_scale);
    dequant_f32<Code>(row + R, v, D, v_scale);
  }
};

template <typename Code>
struct PerTokenHeadSlot {
  static void load(const uint8_t* row, float* k, float* v, int R, int D, float, float) {
    float scales[2];
    std::memcpy(scales, row + R + D, sizeof(scales));  // not 4-byte aligned in general
    dequant_f32<Code>(row, k, R, scales[0]);
    dequant_f32<Code>(row + R, v, D, scales[1]);
  }
};


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

// One step of a row's online (flash-style) softmax over a chunk of n scores: s becomes exp(s - new
// maximum), the row's running maximum and sum are updated, and the factor its earlier accumulator
// must be scaled by is returned (0 on the row's first chunk).
THINKEYS_ALWAYS_INLINE float online_softmax_step(float* __restrict s, int n, float& row_max, float& row_sum) {
  const float prev_max = row_max;
  const float new_max = row_max_of(s, n, prev_max);
  const float sum = exp_and_sum(s, n, new_max);
  const float alpha = prev_max == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(prev_max - new_max);
  row_sum = row_sum * alpha + sum;
  row_max = new_max;
  return alpha;
}

// Software prefetch of n cache rows of `width` bytes, `stride` bytes apart.
inline void prefetch_rows(const uint8_t* first, int n, int64_t stride, int64_t width) {
  constexpr int kLine = 64;
  if (stride == width) {  // contiguous rows (head-major pages): one run
    const int64_t bytes = int64_t(n) * width;
    for (int64_t o = 0; o < bytes; o += kLine) __builtin_prefetch(first + o, 0, 3);
    return;
  }
  for (int j = 0; j < n; ++j) {
    const uint8_t* p = first + j * stride;
    for (int64_t o = 0; o < width; o += kLine) __builtin_prefetch(p + o, 0, 3);
  }
}

// ---- the AVX512-BF16 section (see paged_attention.cpp's bf16 form) -------------------------------
#if defined(THINKEYS_BF16_FORM) && defined(__AVX2__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#define THINKEYS_AVX512BF16 1

// 16 codes to fp32 (up to Code::kMul), the 512-bit form of Code::load8.
template <typename Code>
__m512 codes16(const uint8_t* p);
template <>
inline __m512 codes16<Int8Code>(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
template <>
inline __m512 codes16<E5m2Code>(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 8));
}
template <>
inline __m512 codes16<E4m3Code>(const uint8_t* p) {
  const __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x80)), 8);
  const __m256i em = _mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x7F)), 7);
  return _mm512_cvtph_ps(_mm256_or_si256(sign, em));
}

// An 8-bit slot's codes to bf16, exactly (int8 integers and fp8 values have <= 8 significant bits);
// the caller folds Code::kMul into the factor of the codes. 32 codes per step (two 16-wide
// conversions packed by one vcvtne2ps2bf16), then 16, 8 and single codes for the tail.
template <typename Code>
inline void codes_to_bf16(const uint8_t* __restrict src, uint16_t* __restrict dst, int n) {
  int i = 0;
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(codes16<Code>(src + i + 16), codes16<Code>(src + i)));
  for (; i + 16 <= n; i += 16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(codes16<Code>(src + i)));
  for (; i + 8 <= n; i += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), (__m128i)_mm256_cvtneps_pbh(Code::load8(src + i)));
  for (; i < n; ++i) dst[i] = c10::BFloat16(Code::scalar(src[i])).x;
}

// One 8-bit slot (key R | value D [| float32 k_scale, v_scale]) as R + D bf16 codes in dst, and the
// factors that turn its key and value codes into values (the slot's or the tensor's scale, times kMul).
template <typename Code, bool kPerTokenHead>
inline void widen_slot_bf16(const uint8_t* __restrict row, uint16_t* __restrict dst, int R, int D, float k_scale, float v_scale, float& ks,
                            float& vs) {
  codes_to_bf16<Code>(row, dst, R + D);
  if (kPerTokenHead) {
    float scales[2];
    std::memcpy(scales, row + R + D, sizeof(scales));  // not 4-byte aligned in general
    k_scale = scales[0], v_scale = scales[1];
  }
  ks = k_scale * Code::kMul;
  vs = v_scale * Code::kMul;
}

constexpr int kAmxRows = 16;  // tiles with at least this many rows (query tokens x G) use brgemm

// In-register transpose of a 16 x 16 matrix of 32-bit elements (row i of r becomes column i).
THINKEYS_ALWAYS_INLINE void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // u[4b + k], 128-bit lane L: rows 4b .. 4b + 3 of column 4L + k
    t[k] = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88);
    t[4 + k] = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD);
    t[8 + k] = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(t[k], t[8 + k], 0xDD);
    r[4 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(t[4 + k], t[12 + k], 0xDD);
  }
}

THINKEYS_ALWAYS_INLINE __m512 dp_bf16(__m512 acc, __m512i a, __m512i b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }

// n <= 32 bf16 (16-bit) elements from p, zeros after them
THINKEYS_ALWAYS_INLINE __m512i load_bf16_32(const uint16_t* p, int n) {
  return n >= 32 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(__mmask32((uint64_t(1) << std::max(n, 0)) - 1), p);
}

// exp(x) for x <= 0, as exp_nonpositive8 (the 2^n through vscalefps)
THINKEYS_ALWAYS_INLINE __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}


// s[16 g0 : 16 (g0 + NB)] = q . keys of token groups g0 .. g0 + NB - 1 (K^T rows of nt tokens)
template <int NB>
THINKEYS_ALWAYS_INLINE void score_groups(const int32_t* __restrict qp, const int32_t* __restrict kt, int P, int nt, int g0, float* __restrict s) {
  __m512 a[NB];
  for (int b = 0; b < NB; ++b) a[b] = _mm512_setzero_ps();
  for (int p = 0; p < P; ++p) {
    const __m512i qv = _mm512_set1_epi32(qp[p]);
    const int32_t* k = kt + int64_t(p) * nt + g0 * 16;
    for (int b = 0; b < NB; ++b) a[b] = dp_bf16(a[b], _mm512_loadu_si512(k + 16 * b), qv);
  }
  for (int b = 0; b < NB; ++b) _mm512_storeu_ps(s + (g0 + b) * 16, a[b]);
}

// Online softmax step of one row over the page's raw scores sr[0 : vis): for each 16 tokens from 0,
// emit(j, p) gets p = exp(logit - new max) (zero from vis; times the value's factor vs where given);
// then the running max / sum are updated and the accumulators ar rescaled. Returns where emit stopped
// (vis rounded up to 16). ks / vs (8-bit pages, else null): per-token factors of the scores and of the
// values. emit may overwrite sr[j : j + 16] (read before it is called).
template <typename Emit>
THINKEYS_ALWAYS_INLINE int online_softmax_step(const float* sr, int vis, float scale, float& row_max, float& row_sum, float* __restrict ar,
                                               int acc_width, const float* __restrict ks, const float* __restrict vs, Emit&& emit) {
  const __mmask16 tail = __mmask16((1u << (vis & 15)) - 1);
  const __m512 sv = _mm512_set1_ps(scale);
  auto logits = [&](int j) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(sr + j), sv);
    return ks ? _mm512_mul_ps(x, _mm512_loadu_ps(ks + j)) : x;
  };
  __m512 mv = _mm512_set1_ps(row_max);
  int j = 0;
  for (; j + 16 <= vis; j += 16) mv = _mm512_max_ps(mv, logits(j));
  if (j < vis) mv = _mm512_mask_max_ps(mv, tail, mv, logits(j));
  const float prev_max = row_max;
  const float new_max = _mm512_reduce_max_ps(mv);
  const __m512 nm = _mm512_set1_ps(new_max);
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j < vis; j += 16) {
    __m512 e = exp_nonpositive16(_mm512_sub_ps(logits(j), nm));
    if (j + 16 > vis) e = _mm512_maskz_mov_ps(tail, e);  // masked tokens get p = 0
    sum = _mm512_add_ps(sum, e);
    emit(j, vs ? _mm512_mul_ps(e, _mm512_loadu_ps(vs + j)) : e);  // the value's factor rides on p
  }
  const float alpha = prev_max == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(prev_max - new_max);
  row_sum = row_sum * alpha + _mm512_reduce_add_ps(sum);
  row_max = new_max;
  if (alpha != 1.0f) {
    const __m512 av = _mm512_set1_ps(alpha);
    for (int c = 0; c < acc_width; c += 16) _mm512_storeu_ps(ar + c, _mm512_mul_ps(_mm512_loadu_ps(ar + c), av));
  }
  return j;
}

// online_softmax_step with the probabilities stored as bf16 in pr (zero from vis up to `width`).
inline void softmax_row(const float* __restrict sr, int vis, int width, float scale, uint16_t* __restrict pr,
                        float& row_max, float& row_sum, float* __restrict ar, int acc_width,
                        const float* __restrict ks, const float* __restrict vs) {
  const int j = online_softmax_step(sr, vis, scale, row_max, row_sum, ar, acc_width, ks, vs, [&](int j, __m512 p) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + j), (__m256i)_mm512_cvtneps_pbh(p));
  });
  if (j < width) std::memset(pr + j, 0, sizeof(uint16_t) * (width - j));
}

// Position, in a row of pv_block's accumulators, of output channel c: vpunpck[lh]wd interleave
// the low / high four channels of each 128-bit lane, so a 32-channel chunk's accumulators hold
// channels 0-3, 8-11, 16-19, 24-27, then 4-7, 12-15, 20-23, 28-31.
inline int pv_position(int c) {
  const int chunk = c & ~31, w = c & 31, lane = w >> 3, k = w & 7;
  return chunk + (k < 4 ? 0 : 16) + 4 * lane + (k & 3);
}

// RB rows x NC 32-channel chunks (from chunk c0) of acc += P V over `pairs` token pairs of a page,
// values read in place (token 2j + 1 >= n reads as zeros), accumulators in registers.
template <int RB, int NC>
THINKEYS_ALWAYS_INLINE void pv_block(const uint16_t* __restrict probs, int srow, const uint16_t* __restrict values, int64_t row_elems, int pairs, int n,
                     int D, int c0, float* __restrict acc, int acc_stride) {
  __m512 a[RB][2 * NC];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < 2 * NC; ++v) a[r][v] = _mm512_loadu_ps(acc + int64_t(r) * acc_stride + 32 * c0 + 16 * v);
  int m[NC];
  for (int k = 0; k < NC; ++k) m[k] = std::min(32, D - 32 * (c0 + k));
  for (int j = 0; j < pairs; ++j) {
    const uint16_t* v0 = values + int64_t(2 * j) * row_elems + 32 * c0;
    const bool has1 = 2 * j + 1 < n;
    __m512i lo[NC], hi[NC];
    for (int k = 0; k < NC; ++k) {
      const __m512i x0 = load_bf16_32(v0 + 32 * k, m[k]);
      const __m512i x1 = has1 ? load_bf16_32(v0 + row_elems + 32 * k, m[k]) : _mm512_setzero_si512();
      lo[k] = _mm512_unpacklo_epi16(x0, x1);
      hi[k] = _mm512_unpackhi_epi16(x0, x1);
    }
    for (int r = 0; r < RB; ++r) {
      const __m512i pb = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(probs + int64_t(r) * srow)[j]);
      for (int k = 0; k < NC; ++k) {
        a[r][2 * k] = dp_bf16(a[r][2 * k], lo[k], pb);
        a[r][2 * k + 1] = dp_bf16(a[r][2 * k + 1], hi[k], pb);
      }
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < 2 * NC; ++v) _mm512_storeu_ps(acc + int64_t(r) * acc_stride + 32 * c0 + 16 * v, a[r][v]);
}

// acc[rows][32 C] += probs[rows][0 : vis rounded up to pairs] . values of the page, in blocks of
// up to 4 rows x 2 chunks (16 accumulators)
inline void pv_page(const uint16_t* probs, int srow, int rows, const uint16_t* values, int64_t row_elems, int vis, int n, int D, int C,
                    float* acc) {
  const int pairs = (vis + 1) / 2;
  for (int r0 = 0; r0 < rows; r0 += 4) {
    const int rb = std::min(4, rows - r0);
    const uint16_t* pr = probs + int64_t(r0) * srow;
    float* ar = acc + int64_t(r0) * C * 32;
    for (int c0 = 0; c0 < C; c0 += 2) {
      const bool two = c0 + 2 <= C;
#define THINKEYS_PV(RB)                                                                         \
  (two ? pv_block<RB, 2>(pr, srow, values, row_elems, pairs, n, D, c0, ar, C * 32)             \
       : pv_block<RB, 1>(pr, srow, values, row_elems, pairs, n, D, c0, ar, C * 32))
      switch (rb) {
        case 4: THINKEYS_PV(4); break;
        case 3: THINKEYS_PV(3); break;
        case 2: THINKEYS_PV(2); break;
        default: THINKEYS_PV(1); break;
      }
#undef THINKEYS_PV
    }
  }
}

// brgemm (AMX) for prefill tiles and the rebuild kernel's prefill expansion: compiled in when torch's
// CPUBlas has it, used when oneDNN can pack bf16 here (a CPU with AMX). On by default since session 10,
// whose Xeon (AMX) ran the tests on these paths and found prefill attention 2-3.5x faster than by
// vdpbf16ps; THINKEYS_KERNEL_NO_AMX=1 (or THINKEYS_KERNEL_AMX=0) forces vdpbf16ps, as on AVX512-BF16
// CPUs without AMX. Decode tiles (fewer than kAmxRows rows) never use it.
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
bool amx_brgemm_supported() {
  static const bool ok = [] {
    const char* on = std::getenv("THINKEYS_KERNEL_AMX");
    return at::native::cpublas::could_pack(at::kBFloat16) && std::getenv("THINKEYS_KERNEL_NO_AMX") == nullptr && !(on && std::string(on) == "0");
  }();
  return ok;
}
#else
bool amx_brgemm_supported() { return false; }
#endif


// ---- one page of a bf16 tile (shared by both kernels' bf16 forms) ---------------------------------
// A tile is nq query tokens x G heads = `rows` rows (row = token * G + head). Its state lives in the
// caller's scratch: the query as bf16 channel pairs, per-page scores and bf16 probabilities, fp32
// accumulators of 32 C channels per row (pv_block's permuted order, or plain order when the tile uses
// brgemm), running max and sum per row.
struct TileBf16 {
  int nq, G, rows;
  int P;  // channel pairs of a key (whole 32-channel loads)
  int C, D;  // 32-channel chunks of a value, value width
  int srow;  // scores / probs row stride (>= any page's packed tokens)
  int context, q_begin;  // the request's cached tokens before its first query; the tile's first query
  float scale;
  bool use_brgemm;
  const int32_t* q;  // [rows][P]
  float* scores;  // [rows][srow]
  uint16_t* probs;  // [rows][srow]
  float* acc;  // [rows][32 C]
  float* row_max;
  float* row_sum;
};

// K^T of one page: keys [n][>= width] bf16 (`stride` elements apart) into channel pairs
// kt [P][nt], 16 tokens x 16 pairs at a time through an in-register transpose; tokens past n are
// zeros. nt (returned): n rounded up to whole blocks of 8 (or 4) groups of 16 tokens, what
// attend_page_bf16's scoring loops read.
inline int packed_tokens(int n) {
  const int ng = (n + 15) / 16;
  return (ng >= 8 ? (ng + 7) / 8 * 8 : (ng + 3) / 4 * 4) * 16;
}

// Groups [g_begin, g_end) of 16 tokens of pack_keys_bf16 (keys points at the page's token 0; a
// page can be packed piecewise as its keys are produced).
inline void pack_key_groups(const uint16_t* __restrict keys, int64_t stride, int width, int n, int P, int nt, int g_begin, int g_end,
                            int32_t* __restrict kt) {
  for (int gi = g_begin; gi < g_end; ++gi) {
    for (int c = 0; c < P; c += 16) {
      __m512i r[16];
      for (int t = 0; t < 16; ++t) {
        const int tok = gi * 16 + t;
        r[t] = tok < n ? load_bf16_32(keys + tok * stride + 2 * c, std::min(32, width - 2 * c)) : _mm512_setzero_si512();
      }
      transpose16x16_epi32(r);
      for (int k = 0; k < 16; ++k) _mm512_storeu_si512(kt + int64_t(c + k) * nt + gi * 16, r[k]);
    }
  }
}

inline int pack_keys_bf16(const uint16_t* __restrict keys, int64_t stride, int width, int n, int P, int32_t* __restrict kt) {
  const int nt = packed_tokens(n);
  pack_key_groups(keys, stride, width, n, P, nt, 0, nt / 16, kt);
  return nt;
}

// Values of one page [n][>= D] bf16 into brgemm's VNNI layout vp [pairs][32 C][2]: tokens 2j and
// 2j + 1 interleaved per channel; a token past n is zeros.
inline void pack_values_vnni(const uint16_t* __restrict values, int64_t stride, int n, int D, int C, uint16_t* __restrict vp) {
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                          39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  const int pairs = (n + 1) / 2;
  for (int j = 0; j < pairs; ++j) {
    const uint16_t* v0 = values + (2 * j) * stride;
    const uint16_t* v1 = v0 + stride;
    const bool has1 = 2 * j + 1 < n;
    for (int c = 0; c < C; ++c) {
      const int m = std::min(32, D - 32 * c);
      const __m512i x0 = load_bf16_32(v0 + 32 * c, m);
      const __m512i x1 = has1 ? load_bf16_32(v1 + 32 * c, m) : _mm512_setzero_si512();
      _mm512_storeu_si512(vp + (int64_t(j) * C + c) * 64, _mm512_permutex2var_epi16(x0, lo_idx, x1));
      _mm512_storeu_si512(vp + (int64_t(j) * C + c) * 64 + 32, _mm512_permutex2var_epi16(x0, hi_idx, x1));
    }
  }
}

// One page for every row of the tile: scores against kt ([P][nt], the page's first n tokens valid
// for this tile), causal mask, online softmax, acc += P V. With t.use_brgemm both products are
// brgemm calls (vp: the page's values packed by pack_values_vnni); otherwise vdpbf16ps scores and
// P.V read the values in place (`values`, v_stride elements apart). ks / vs: 8-bit pages' per-token
// factors (null for bf16 pages). scored: the vdpbf16ps branch finds the raw scores in t.scores already
// (the rebuild kernel's decodes compute them as they expand the keys) and does not read kt.
inline void attend_page_bf16(const TileBf16& t, const int32_t* __restrict kt, int nt, int n, int page_start,
                             const uint16_t* __restrict values, int64_t v_stride, const uint16_t* __restrict vp,
                             const float* ks, const float* vs, bool scored = false) {
  const int P = t.P, C = t.C, srow = t.srow;
#if defined(CPUBLAS_BRGEMM_BF16BF16F32)
  if (t.use_brgemm) {  // rows x tokens scores, softmax per row, rows x D += P V
    const int ng = (n + 15) / 16;
    const int pairs = (n + 1) / 2;
    at::native::cpublas::brgemm(t.rows, ng * 16, 2 * P, 2 * P, nt, srow, false, reinterpret_cast<const at::BFloat16*>(t.q),
                                reinterpret_cast<const at::BFloat16*>(kt), t.scores);
    for (int i = 0; i < t.nq; ++i) {
      const int vis = std::min(n, t.context + t.q_begin + i + 1 - page_start);
      for (int g = 0; g < t.G; ++g) {
        const int row = i * t.G + g;
        if (vis <= 0) {
          std::memset(t.probs + int64_t(row) * srow, 0, sizeof(uint16_t) * 2 * pairs);
          continue;
        }
        softmax_row(t.scores + int64_t(row) * srow, vis, 2 * pairs, t.scale, t.probs + int64_t(row) * srow, t.row_max[row],
                    t.row_sum[row], t.acc + int64_t(row) * C * 32, C * 32, ks, vs);
      }
    }
    at::native::cpublas::brgemm(t.rows, C * 32, 2 * pairs, srow, C * 32, C * 32, true, reinterpret_cast<const at::BFloat16*>(t.probs),
                                reinterpret_cast<const at::BFloat16*>(vp), t.acc);
    return;
  }
#endif
  // vdpbf16ps: scores and softmax row by row, then P.V for all rows straight from the page
  const int ng_pad = nt / 16;
  const int max_vis = std::min(n, t.context + t.q_begin + t.nq - page_start);  // the tile's last query
  const int width = (max_vis + 1) / 2 * 2;  // probabilities P.V reads per row (zeros past a row's vis)
  for (int i = 0; i < t.nq; ++i) {
    const int vis = std::min(n, t.context + t.q_begin + i + 1 - page_start);  // causal limit in this page
    const int vg = (vis + 15) / 16;
    for (int g = 0; g < t.G; ++g) {
      const int row = i * t.G + g;
      uint16_t* pr = t.probs + int64_t(row) * srow;
      if (vis <= 0) {
        std::memset(pr, 0, sizeof(uint16_t) * width);
        continue;
      }
      float* sr = t.scores + int64_t(row) * srow;
      const int32_t* qp = t.q + row * P;
      int g0 = scored ? vg : 0;  // scored: the scores are in t.scores already (the vdpbf16ps branch only)
      for (; g0 + 8 <= vg || (g0 + 4 < vg && g0 + 8 <= ng_pad); g0 += 8) score_groups<8>(qp, kt, P, nt, g0, sr);
      for (; g0 < vg; g0 += 4) score_groups<4>(qp, kt, P, nt, g0, sr);
      softmax_row(sr, vis, width, t.scale, pr, t.row_max[row], t.row_sum[row], t.acc + int64_t(row) * C * 32, C * 32, ks, vs);
    }
  }
  pv_page(t.probs, srow, t.rows, values, v_stride, max_vis, n, t.D, C, t.acc);
}

// Normalized output of row `row` (acc / sum) into dst [D] as T.
template <typename T>
inline void store_row_bf16(const TileBf16& t, int row, T* __restrict dst) {
  const float inv = 1.0f / t.row_sum[row];
  const float* ar = t.acc + int64_t(row) * t.C * 32;
  if (!t.use_brgemm) {  // pv_block's channel order
    for (int c = 0; c < t.D; ++c) dst[c] = static_cast<T>(ar[pv_position(c)] * inv);
  } else {
    for (int c = 0; c < t.D; ++c) dst[c] = static_cast<T>(ar[c] * inv);
  }
}

// Whether this process runs the AVX512-BF16 form (compiled in, and the CPU has it).
bool bf16_dot_supported() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return ok;
}
#pragma GCC pop_options
#else
#define THINKEYS_AVX512BF16 0
inline bool bf16_dot_supported() { return false; }
inline bool amx_brgemm_supported() { return false; }
#endif

}  // namespace
}  // namespace thinkeys
