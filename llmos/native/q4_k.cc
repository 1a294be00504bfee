// GGUF Q4_K weights, regrouped 16 rows at a time ("Q4_Kx16"): op GgufMatMulQ4_Kx16 (see gguf_ops.h).
//
// W[n, 32i + j] = d[n] * sc[n, i] * q[n, 32i + j] - dmin[n] * m[n, i] per super-block of 256 weights: q a
// nibble, sc and m 6-bit per 32 weights (packed in 12 bytes), d and dmin fp16 — the GGUF's own values.
// x16 layout, 144 bytes per 256 weights as in the GGUF (llmos/gguf_layouts.py q4_k_x16): per group and
// super-block, 2304 bytes: the 16 rows' d (32 bytes), dmin (32), the 12 scale bytes field by field (16
// bytes each: byte k of every row), then 32 chunks of 64 bytes: chunk 8g+c holds qs[32g+4c..+3] of row r
// at bytes 4r..4r+3 (low nibbles: weights 64g+4c.., sub-block 2g; high: 64g+32+4c.., sub-block 2g+1).
//
// Sub-blocks are 32 wide, as the activation blocks: per block, the integer dot of the nibbles (dpbusd's
// unsigned operand) times sc to float times dx; the mins need only the activations' block sums:
// sum_i m[i] * dx[i] * s[i], times dmin once per super-block.
#include "gguf_ops.h"

namespace llmos {
namespace {

struct Q4_K {
  static constexpr const char* kName = "GgufMatMulQ4_Kx16";
  static constexpr int QK = 256;         // weights per super-block
  static constexpr int BLK = 144;        // bytes per super-block of one row
  static constexpr int GBLK = 16 * BLK;  // bytes per super-block of a 16-row group
  static constexpr int SC = 64;          // offset of the 12 scale fields in a group's super-block
  static constexpr int QS = SC + 12 * 16;  // offset of the quant chunks

  // The 8 scales and 8 mins of `rows` rows (16 or 8: bytes of each field read), 6 bits each, from the 12
  // fields (as llama.cpp's get_scale_min_k4: sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7,
  // sub-blocks 4-7 as nibbles of bytes 8-11 with their top 2 bits in the top bits of bytes 0-3 / 4-7).
  static void scales_mins(const uint8_t* f, int stride_off, __m128i sc[8], __m128i mn[8]) {
    const __m128i m6 = _mm_set1_epi8(0x3F), m4 = _mm_set1_epi8(0x0F), hi2 = _mm_set1_epi8(0x30);
    __m128i B[12];
    for (int k = 0; k < 12; ++k) B[k] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(f + 16 * k + stride_off));
    for (int i = 0; i < 4; ++i) {
      sc[i] = _mm_and_si128(B[i], m6);
      mn[i] = _mm_and_si128(B[4 + i], m6);
      // (byte >> 6) << 4 is (byte >> 2) & 0x30; the 16-bit shifts' spill from the next byte is masked
      sc[4 + i] = _mm_or_si128(_mm_and_si128(B[8 + i], m4), _mm_and_si128(_mm_srli_epi16(B[i], 2), hi2));
      mn[4 + i] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(B[8 + i], 4), m4),
                               _mm_and_si128(_mm_srli_epi16(B[4 + i], 2), hi2));
    }
  }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  static void gemv_x16(const uint8_t* G, int nb, const XQ& x, float* y, const uint8_t* pf) {
    __m512 acc = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const int32_t* xq = reinterpret_cast<const int32_t*>(x.q);
    for (int b = 0; b < nb; ++b) {
      const uint8_t* p = G + size_t(b) * GBLK;
      prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
      __m128i sc[8], mn[8];
      scales_mins(p + SC, 0, sc, mn);
      __m512 sb = _mm512_setzero_ps(), ms = _mm512_setzero_ps();  // the scaled dots; the mins' sums
      for (int g = 0; g < 4; ++g) {
        __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
        const int32_t* xc = xq + 64 * b + 16 * g;  // weights 64g + 4c: xc[c]; 64g + 32 + 4c: xc[8 + c]
        for (int c = 0; c < 8; ++c) {
          const __m512i v = _mm512_loadu_si512(p + QS + 64 * (8 * g + c));
          lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(v, m4), _mm512_set1_epi32(xc[c]));
          hi = _mm512_dpbusd_epi32(hi, _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), _mm512_set1_epi32(xc[8 + c]));
        }
        for (int k = 0; k < 2; ++k) {
          const int i = 2 * g + k, xb = 8 * b + i;
          const __m512i dot = _mm512_mullo_epi32(k ? hi : lo, _mm512_cvtepu8_epi32(sc[i]));
          sb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(x.d[xb]), sb);
          ms = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn[i])), _mm512_set1_ps(x.d[xb] * float(x.s[xb])), ms);
        }
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      const __m512 dmin = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
      acc = _mm512_fnmadd_ps(ms, dmin, _mm512_fmadd_ps(sb, d, acc));
    }
    _mm512_storeu_ps(y, acc);
  }
#else
  // AVX2: rows 0-7 then rows 8-15 of each super-block (the first 32 bytes of every 64-byte chunk, then
  // the last 32; the second pass reads from L1).
  static void gemv_x16(const uint8_t* G, int nb, const XQ& x, float* y, const uint8_t* pf) {
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const int32_t* xq = reinterpret_cast<const int32_t*>(x.q);
    for (int b = 0; b < nb; ++b) {
      const uint8_t* p = G + size_t(b) * GBLK;
      prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
      for (int half = 0; half < 2; ++half) {
        __m128i sc[8], mn[8];
        scales_mins(p + SC, 8 * half, sc, mn);  // bytes 0-7 of each: this half's 8 rows
        __m256 sb = _mm256_setzero_ps(), ms = _mm256_setzero_ps();
        for (int g = 0; g < 4; ++g) {
          __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
          const int32_t* xc = xq + 64 * b + 16 * g;
          for (int c = 0; c < 8; ++c) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + QS + 64 * (8 * g + c) + 32 * half));
            lo = dpbusd8(lo, _mm256_and_si256(v, m4), _mm256_set1_epi32(xc[c]));
            hi = dpbusd8(hi, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), _mm256_set1_epi32(xc[8 + c]));
          }
          for (int k = 0; k < 2; ++k) {
            const int i = 2 * g + k, xb = 8 * b + i;
            const __m256i dot = _mm256_mullo_epi32(k ? hi : lo, _mm256_cvtepu8_epi32(sc[i]));
            sb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(x.d[xb]), sb);
            ms = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn[i])),
                                 _mm256_set1_ps(x.d[xb] * float(x.s[xb])), ms);
          }
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * half)));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 + 16 * half)));
        acc[half] = _mm256_fnmadd_ps(ms, dmin, _mm256_fmadd_ps(sb, d, acc[half]));
      }
    }
    _mm256_storeu_ps(y, acc[0]);
    _mm256_storeu_ps(y + 8, acc[1]);
  }
#endif
};

Registered<Q4_K> registered;

}  // namespace
}  // namespace llmos
