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

// y + r*ldy [0..15] = the 16 rows of group G against activation rows x[0..R-1], each weight vector loaded
// and flipped once for the R rows; pf: the bytes to prefetch alongside.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
static constexpr int ROWS = 4;

template <int R>
static void gemm_x16(const uint8_t* G, int nb, const XQ* x, float* y, size_t ldy, const uint8_t* pf) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    __m512i a0[R], a1[R];  // two dependency chains per row
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_set1_epi32(-128 * x[r].s[b]);
      a1[r] = _mm512_setzero_si512();
    }
    for (int k = 0; k < 8; k += 2) {
      const __m512i u0 = _mm512_xor_si512(_mm512_loadu_si512(p + 32 + k * 64), flip);
      const __m512i u1 = _mm512_xor_si512(_mm512_loadu_si512(p + 96 + k * 64), flip);
      for (int r = 0; r < R; ++r) {
        const int32_t* xb = reinterpret_cast<const int32_t*>(x[r].q) + b * 8;  // 8 groups of 4 int8
        a0[r] = _mm512_dpbusd_epi32(a0[r], u0, _mm512_set1_epi32(xb[k]));
        a1[r] = _mm512_dpbusd_epi32(a1[r], u1, _mm512_set1_epi32(xb[k + 1]));
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[r], a1[r])),
                               _mm512_mul_ps(d, _mm512_set1_ps(x[r].d[b])), acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, acc[r]);
}
#else
static constexpr int ROWS = 2;  // 16 ymm registers: 2 rows x 2 halves of int and float accumulators

#if defined(__AVXVNNI__)
static inline __m256i dot8(__m256i acc, __m256i u, __m256i x) { return _mm256_dpbusd_avx_epi32(acc, u, x); }
static inline __m256i prep(__m256i w) { return _mm256_xor_si256(w, _mm256_set1_epi8(char(0x80))); }
static inline int32_t seed(int32_t s) { return -128 * s; }
#else
// prep keeps w signed; dot8 multiplies |w| by x carrying w's sign
static inline __m256i dot8(__m256i acc, __m256i w, __m256i x) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}
static inline __m256i prep(__m256i w) { return w; }
static inline int32_t seed(int32_t) { return 0; }
#endif

template <int R>
static void gemm_x16(const uint8_t* G, int nb, const XQ* x, float* y, size_t ldy, const uint8_t* pf) {
  __m256 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm256_setzero_ps();
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
    const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
    __m256i a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_set1_epi32(seed(x[r].s[b]));
    for (int k = 0; k < 8; ++k) {  // each 64-byte chunk: rows 0-7, then rows 8-15
      const __m256i w0 = prep(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 + k * 64)));
      const __m256i w1 = prep(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 + k * 64)));
      for (int r = 0; r < R; ++r) {
        const __m256i xk = _mm256_set1_epi32(reinterpret_cast<const int32_t*>(x[r].q)[b * 8 + k]);
        a[r][0] = dot8(a[r][0], w0, xk);
        a[r][1] = dot8(a[r][1], w1, xk);
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 dx = _mm256_set1_ps(x[r].d[b]);
      f[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][0]), _mm256_mul_ps(d0, dx), f[r][0]);
      f[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][1]), _mm256_mul_ps(d1, dx), f[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * ldy, f[r][0]);
    _mm256_storeu_ps(y + r * ldy + 8, f[r][1]);
  }
}
#endif
};

Registered<Q8_0> registered;

}  // namespace
}  // namespace llmos
