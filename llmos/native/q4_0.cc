// GGUF Q4_0 weights, regrouped 16 rows at a time ("Q4_0x16"): op GgufMatMulQ4_0x16 (see gguf_ops.h).
//
// W[n, 32b+j] = d[n, b] * (q[n, b, j] - 8), the GGUF's own Q4_0 values (nothing is re-rounded).
// x16 layout, 18 bytes per 32 weights as in the GGUF: group g holds rows 16g..16g+15; for each block b
// of 32 weights, 288 bytes: the 16 rows' fp16 scales d (32 bytes), then 4 chunks of 64 bytes, where
// bytes 4r..4r+3 of chunk k are the GGUF quant bytes qs[4k..4k+3] of row r (low nibbles: weights
// 4k..4k+3, high nibbles: weights 16+4k..16+4k+3). One 512-bit load then feeds 16 rows at once.
//
// Integer dot products: AVX-512 VNNI, or AVX2 (with AVX-VNNI when built for it); weights are
// prefetched ~16 KB ahead.
#include "gguf_ops.h"

namespace llmos {
namespace {

struct Q4_0 {
  static constexpr const char* kName = "GgufMatMulQ4_0x16";
  static constexpr int QK = 32;            // weights per block
  static constexpr int BLK = 18;           // bytes per block of one row: fp16 d + 16 nibble bytes
  static constexpr int GBLK = 16 * BLK;    // bytes per block of a 16-row group

// y[0..15] = the 16 rows of group G against one activation row; pf: the bytes to prefetch alongside.
// Per block: sum_j (u_j - 8) * q_j = sum_j u_j * q_j - 8 * s, with u the unsigned nibble (dpbusd's
// unsigned operand) and the -8 s term seeded into the accumulator.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
static void gemv_x16(const uint8_t* G, int nb, const XQ& x, float* y, const uint8_t* pf) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const int32_t* xq = reinterpret_cast<const int32_t*>(x.q);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
    const __m512 sc = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))),
                                    _mm512_set1_ps(x.d[b]));
    const int32_t* xb = xq + b * 8;  // the block's 32 int8 activations as 8 groups of 4
    __m512i a0 = _mm512_set1_epi32(-8 * x.s[b]), a1 = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k) {
      const __m512i v = _mm512_loadu_si512(p + 32 + k * 64);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(v, m4), _mm512_set1_epi32(xb[k]));
      a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), _mm512_set1_epi32(xb[k + 4]));
    }
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1));
    if (b & 1)  // two accumulators: the FMA latency chain is halved
      acc1 = _mm512_fmadd_ps(dot, sc, acc1);
    else
      acc0 = _mm512_fmadd_ps(dot, sc, acc0);
  }
  _mm512_storeu_ps(y, _mm512_add_ps(acc0, acc1));
}
#else
// AVX2: each 64-byte chunk is rows 0-7 (32 bytes) then rows 8-15.

static void gemv_x16(const uint8_t* G, int nb, const XQ& x, float* y, const uint8_t* pf) {
  __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const int32_t* xq = reinterpret_cast<const int32_t*>(x.q);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
    const __m256 dx = _mm256_set1_ps(x.d[b]);
    const __m256 s0 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), dx);
    const __m256 s1 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))), dx);
    const int32_t* xb = xq + b * 8;
    __m256i a0 = _mm256_set1_epi32(-8 * x.s[b]), a1 = a0;
    for (int k = 0; k < 4; ++k) {
      const __m256i xl = _mm256_set1_epi32(xb[k]), xh = _mm256_set1_epi32(xb[k + 4]);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 + k * 64));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 + k * 64));
      a0 = dpbusd8(a0, _mm256_and_si256(v0, m4), xl);
      a0 = dpbusd8(a0, _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4), xh);
      a1 = dpbusd8(a1, _mm256_and_si256(v1, m4), xl);
      a1 = dpbusd8(a1, _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4), xh);
    }
    f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), s0, f0);
    f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), s1, f1);
  }
  _mm256_storeu_ps(y, f0);
  _mm256_storeu_ps(y + 8, f1);
}
#endif

};

Registered<Q4_0> registered;

}  // namespace
}  // namespace llmos
