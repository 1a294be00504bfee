// GGUF Q8_0 weights, regrouped 16 rows at a time ("Q8_0x16"): op GgufMatMulQ8_0x16 (see gguf_ops.h).
//
// W[n, 32b+j] = d[n, b] * q[n, b, j] with q int8, the GGUF's own Q8_0 values (nothing is re-rounded).
// x16 layout, 34 bytes per 32 weights as in the GGUF: group g holds rows 16g..16g+15; for each block b
// of 32 weights, 544 bytes: the 16 rows' fp16 scales d (32 bytes), then 8 chunks of 64 bytes, where
// bytes 4r..4r+3 of chunk k are the GGUF quant bytes qs[4k..4k+3] of row r. One 512-bit load then
// feeds 16 rows at once (two 256-bit loads on AVX2: rows 0-7, then rows 8-15).
//
// Both operands are signed, but the integer dot products multiply unsigned by signed bytes:
// - with VNNI (AVX-512 or AVX-VNNI), the weights are flipped to unsigned, u = q ^ 0x80 = q + 128, and
//   sum_j u_j x_j = sum_j q_j x_j + 128 s: the -128 s term (s = the activation block's sum) is seeded
//   into the accumulator, exact for every int8 q including -128;
// - with plain AVX2 (maddubs adds pairs into saturating int16), |q| times x carrying q's sign: pairs
//   reach at most 2 * 128 * 127 < 32767, since activations are rounded into [-127, 127].
#include "gguf_ops.h"

namespace llmos {
namespace {

struct Q8_0 {
  static constexpr const char* kName = "GgufMatMulQ8_0x16";
  static constexpr int QK = 32;          // weights per block
  static constexpr int BLK = 34;         // bytes per block of one row: fp16 d + 32 int8
  static constexpr int GBLK = 16 * BLK;  // bytes per block of a 16-row group

// y[0..15] = the 16 rows of group G against one activation row; pf: the bytes to prefetch alongside.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
static void gemv_x16(const uint8_t* G, int nb, const XQ& x, float* y, const uint8_t* pf) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  const int32_t* xq = reinterpret_cast<const int32_t*>(x.q);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
    const __m512 sc = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                                    _mm512_set1_ps(x.d[b]));
    const int32_t* xb = xq + b * 8;  // the block's 32 int8 activations as 8 groups of 4
    __m512i a0 = _mm512_set1_epi32(-128 * x.s[b]), a1 = _mm512_setzero_si512();
    for (int k = 0; k < 8; k += 2) {  // two dependency chains
      const __m512i v0 = _mm512_loadu_si512(p + 32 + k * 64);
      const __m512i v1 = _mm512_loadu_si512(p + 96 + k * 64);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(v0, flip), _mm512_set1_epi32(xb[k]));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_xor_si512(v1, flip), _mm512_set1_epi32(xb[k + 1]));
    }
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
    if (b & 1)
      acc1 = _mm512_fmadd_ps(dot, sc, acc1);
    else
      acc0 = _mm512_fmadd_ps(dot, sc, acc0);
  }
  _mm512_storeu_ps(y, _mm512_add_ps(acc0, acc1));
}
#else
#if defined(__AVXVNNI__)
static inline __m256i dot8(__m256i acc, __m256i w, __m256i x) {
  return _mm256_dpbusd_avx_epi32(acc, _mm256_xor_si256(w, _mm256_set1_epi8(char(0x80))), x);
}
static inline int32_t seed(int32_t s) { return -128 * s; }
#else
static inline __m256i dot8(__m256i acc, __m256i w, __m256i x) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
static inline int32_t seed(int32_t) { return 0; }
#endif

static void gemv_x16(const uint8_t* G, int nb, const XQ& x, float* y, const uint8_t* pf) {
  __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
  const int32_t* xq = reinterpret_cast<const int32_t*>(x.q);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
    const __m256 dx = _mm256_set1_ps(x.d[b]);
    const __m256 s0 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), dx);
    const __m256 s1 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))), dx);
    const int32_t* xb = xq + b * 8;
    __m256i a0 = _mm256_set1_epi32(seed(x.s[b])), a1 = a0;
    for (int k = 0; k < 8; ++k) {  // each 64-byte chunk: rows 0-7, then rows 8-15
      const __m256i xk = _mm256_set1_epi32(xb[k]);
      a0 = dot8(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 + k * 64)), xk);
      a1 = dot8(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 + k * 64)), xk);
    }
    f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), s0, f0);
    f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), s1, f1);
  }
  _mm256_storeu_ps(y, f0);
  _mm256_storeu_ps(y + 8, f1);
}
#endif
};

Registered<Q8_0> registered;

}  // namespace
}  // namespace llmos
