// GGUF Q4_1 weights, regrouped 16 rows at a time ("Q4_1x16"): op GgufMatMulQ4_1x16 (see gguf_ops.h).
//
// W[n, 32b+j] = d[n, b] * q[n, b, j] + m[n, b], q the unsigned nibble: the GGUF's own Q4_1 values.
// x16 layout, 20 bytes per 32 weights as in the GGUF (fp16 d, fp16 m, 16 nibble bytes): group g holds
// rows 16g..16g+15; for each block b of 32 weights, 320 bytes: the 16 rows' fp16 d (32 bytes), their
// fp16 m (32 bytes), then 4 chunks of 64 bytes, where bytes 4r..4r+3 of chunk k are the GGUF quant bytes
// qs[4k..4k+3] of row r (as in Q4_0x16).
//
// Per block, with activations x ~= dx * xq (XQ): W_j = d (q_j - 8) + (m + 8 d), and
//   sum_j W_j x_j ~= d dx sum_j (q_j - 8) xq_j + (m + 8 d) f,
// f the block's sum of the unrounded activations (XQ::f). Only the centred part d (q - 8) meets the
// rounded activations, as in MatMulNBits (whose correction is the same m + 8 d times exact block sums):
// rounding errors then meet weights of mean ~0. Uncentred, d q (mean 7.5 d) times rounded activations, or
// llama.cpp's all-rounded m dx s, add a biased error per block: on SmolLM2-135M Q4_1 the uncentred form
// took the worst teacher-forced cosine against the exact graph to 0.978 (MatMulNBits: 0.9967).
#include "gguf_ops.h"

namespace llmos {
namespace {

struct Q4_1 {
  static constexpr const char* kName = "GgufMatMulQ4_1x16";
  static constexpr int QK = 32;          // weights per block
  static constexpr int BLK = 20;         // bytes per block of one row: fp16 d, fp16 m, 16 nibble bytes
  static constexpr int GBLK = 16 * BLK;  // bytes per block of a 16-row group

// y + r*ldy [0..15] = the 16 rows of group G against activation rows x[0..R-1], each weight vector
// loaded and unpacked once for the R rows; pf: the bytes to prefetch alongside.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
static constexpr int ROWS = 4;

template <int R>
static void gemm_x16(const uint8_t* G, int nb, const XQ* x, float* y, size_t ldy, const uint8_t* pf) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
    __m512i a0[R], a1[R];
    const __m512 mc = _mm512_fmadd_ps(d, _mm512_set1_ps(8.0f), m);  // m + 8 d
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_set1_epi32(-8 * x[r].s[b]);  // sum_j (q_j - 8) xq_j
      a1[r] = _mm512_setzero_si512();
    }
    for (int k = 0; k < 4; ++k) {
      const __m512i v = _mm512_loadu_si512(p + 64 + k * 64);
      const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      for (int r = 0; r < R; ++r) {
        const int32_t* xb = reinterpret_cast<const int32_t*>(x[r].q) + b * 8;  // 8 groups of 4 int8
        a0[r] = _mm512_dpbusd_epi32(a0[r], lo, _mm512_set1_epi32(xb[k]));
        a1[r] = _mm512_dpbusd_epi32(a1[r], hi, _mm512_set1_epi32(xb[k + 4]));
      }
    }
    for (int r = 0; r < R; ++r) {  // d dx dot + (m + 8 d) f
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[r], a1[r])),
                               _mm512_mul_ps(d, _mm512_set1_ps(x[r].d[b])), acc[r]);
      acc[r] = _mm512_fmadd_ps(mc, _mm512_set1_ps(x[r].f[b]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, acc[r]);
}
#else
static constexpr int ROWS = 2;  // 16 ymm registers

// AVX2: each 64-byte chunk is rows 0-7 (32 bytes) then rows 8-15.

template <int R>
static void gemm_x16(const uint8_t* G, int nb, const XQ* x, float* y, size_t ldy, const uint8_t* pf) {
  __m256 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
    __m256i a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_set1_epi32(-8 * x[r].s[b]);  // q - 8
    for (int k = 0; k < 4; ++k) {
      for (int h = 0; h < 2; ++h) {  // rows 0-7, rows 8-15
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 + k * 64 + h * 32));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        for (int r = 0; r < R; ++r) {
          const int32_t* xb = reinterpret_cast<const int32_t*>(x[r].q) + b * 8;
          a[r][h] = dpbusd8(dpbusd8(a[r][h], lo, _mm256_set1_epi32(xb[k])), hi, _mm256_set1_epi32(xb[k + 4]));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 + 16 * h)));
      const __m256 mc = _mm256_fmadd_ps(d, _mm256_set1_ps(8.0f), m);  // m + 8 d
      for (int r = 0; r < R; ++r) {  // d dx dot + (m + 8 d) f
        const __m256 ddx = _mm256_mul_ps(d, _mm256_set1_ps(x[r].d[b]));
        const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][h]), ddx, f[r][h]);
        f[r][h] = _mm256_fmadd_ps(mc, _mm256_set1_ps(x[r].f[b]), t);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * ldy, f[r][0]);
    _mm256_storeu_ps(y + r * ldy + 8, f[r][1]);
  }
}
#endif
};

Registered<Q4_1> registered;

}  // namespace
}  // namespace llmos
