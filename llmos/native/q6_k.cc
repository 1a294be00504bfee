// GGUF Q6_K weights, regrouped 16 rows at a time ("Q6_Kx16"): op GgufMatMulQ6_Kx16 (see gguf_ops.h).
//
// W[n, 16i + j] = d[n] * sc[n, i] * (q[n, 16i + j] - 32) per super-block of 256 weights: q 6 bits (low
// nibble in ql, high 2 bits in qh), sc int8 per 16 weights, d fp16 — the GGUF's own values.
// x16 layout, 210 bytes per 256 weights as in the GGUF (llmos/gguf_layouts.py q6_k_x16): per group and
// super-block, 3360 bytes: the 16 rows' fp16 d (32 bytes); the scales, 16 bytes per sub-block i (byte r:
// sc[r, i]); then for half h = 0, 1 (128 weights) and c = 0..7, 192 bytes: three 64-byte chunks (row r
// at bytes 4r..4r+3) of ql[64h+4c..], ql[64h+32+4c..] and qh[32h+4c..], which hold the 6 bits of weights
// 128h + {0, 32, 64, 96} + 4c..4c+3. One 512-bit load of each feeds 16 rows x 4 weights of four
// activation blocks.
//
// Per activation block of 32 (int8, one scale dx): two 16-weight sub-blocks, each an integer dot of the
// unsigned 6-bit q (dpbusd's unsigned operand) seeded with -32 * (the 16 activations' sum, x.h) for the
// -32 offset, times the row's int8 scale; the block's integer goes to float once, times dx; d once per
// super-block.
#include "gguf_ops.h"

namespace llmos {
namespace {

struct Q6_K {
  static constexpr const char* kName = "GgufMatMulQ6_Kx16";
  static constexpr int QK = 256;          // weights per super-block
  static constexpr int BLK = 210;         // bytes per super-block of one row
  static constexpr int GBLK = 16 * BLK;   // bytes per super-block of a 16-row group
  static constexpr int SC = 32;           // offset of the scales in a group's super-block
  static constexpr int QS = SC + 16 * 16;  // offset of the quant chunks

  // -32 * the activations' sum over the 16 weights of sub-block `sub` (0, 1) of activation block xb
  static int32_t offset_seed(const XQ& x, int xb, int sub) {
    return -32 * (sub ? x.s[xb] - x.h[xb] : x.h[xb]);
  }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  static void gemv_x16(const uint8_t* G, int nb, const XQ& x, float* y, const uint8_t* pf) {
    __m512 acc = _mm512_setzero_ps();
    const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x30);
    const int32_t* xq = reinterpret_cast<const int32_t*>(x.q);
    for (int b = 0; b < nb; ++b) {
      const uint8_t* p = G + size_t(b) * GBLK;
      prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
      __m512 sb = _mm512_setzero_ps();  // sum over the super-block's activation blocks of dx * integer
      for (int h = 0; h < 2; ++h) {
        const int xb = 8 * b + 4 * h;  // activation block of weights 128h..128h+31
        __m512i in[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                         _mm512_setzero_si512()};
        for (int sub = 0; sub < 2; ++sub) {
          __m512i a[4];
          for (int j = 0; j < 4; ++j) a[j] = _mm512_set1_epi32(offset_seed(x, xb + j, sub));
          for (int c = 4 * sub; c < 4 * sub + 4; ++c) {
            const uint8_t* u = p + QS + (8 * h + c) * 192;
            const __m512i la = _mm512_loadu_si512(u), lb = _mm512_loadu_si512(u + 64);
            const __m512i qh = _mm512_loadu_si512(u + 128);
            const __m512i v0 = _mm512_or_si512(_mm512_and_si512(la, m4), _mm512_and_si512(_mm512_slli_epi16(qh, 4), m2));
            const __m512i v1 = _mm512_or_si512(_mm512_and_si512(lb, m4), _mm512_and_si512(_mm512_slli_epi16(qh, 2), m2));
            const __m512i v2 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(la, 4), m4), _mm512_and_si512(qh, m2));
            const __m512i v3 =
                _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lb, 4), m4), _mm512_and_si512(_mm512_srli_epi16(qh, 2), m2));
            const int32_t* xc = xq + 64 * b + 32 * h + c;  // weights 128h + 32j + 4c: xc[8j]
            a[0] = _mm512_dpbusd_epi32(a[0], v0, _mm512_set1_epi32(xc[0]));
            a[1] = _mm512_dpbusd_epi32(a[1], v1, _mm512_set1_epi32(xc[8]));
            a[2] = _mm512_dpbusd_epi32(a[2], v2, _mm512_set1_epi32(xc[16]));
            a[3] = _mm512_dpbusd_epi32(a[3], v3, _mm512_set1_epi32(xc[24]));
          }
          for (int j = 0; j < 4; ++j) {  // sub-block 8h + 2j + sub's int8 scales
            const __m128i s8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + SC + 16 * (8 * h + 2 * j + sub)));
            in[j] = _mm512_add_epi32(in[j], _mm512_mullo_epi32(a[j], _mm512_cvtepi8_epi32(s8)));
          }
        }
        for (int j = 0; j < 4; ++j) sb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(in[j]), _mm512_set1_ps(x.d[xb + j]), sb);
      }
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      acc = _mm512_fmadd_ps(sb, d, acc);
    }
    _mm512_storeu_ps(y, acc);
  }
#else
  // AVX2: rows 0-7 then rows 8-15 of each super-block (the first 32 bytes of every 64-byte chunk, then
  // the last 32; the second pass reads from L1).
  static void gemv_x16(const uint8_t* G, int nb, const XQ& x, float* y, const uint8_t* pf) {
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    const int32_t* xq = reinterpret_cast<const int32_t*>(x.q);
    for (int b = 0; b < nb; ++b) {
      const uint8_t* p = G + size_t(b) * GBLK;
      prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
      for (int half = 0; half < 2; ++half) {
        __m256 sb = _mm256_setzero_ps();
        for (int h = 0; h < 2; ++h) {
          const int xb = 8 * b + 4 * h;
          __m256i in[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                           _mm256_setzero_si256()};
          for (int sub = 0; sub < 2; ++sub) {
            __m256i a[4];
            for (int j = 0; j < 4; ++j) a[j] = _mm256_set1_epi32(offset_seed(x, xb + j, sub));
            for (int c = 4 * sub; c < 4 * sub + 4; ++c) {
              const uint8_t* u = p + QS + (8 * h + c) * 192 + 32 * half;
              const __m256i la = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u));
              const __m256i lb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 64));
              const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u + 128));
              const __m256i v0 = _mm256_or_si256(_mm256_and_si256(la, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
              const __m256i v1 = _mm256_or_si256(_mm256_and_si256(lb, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
              const __m256i v2 =
                  _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), m4), _mm256_and_si256(qh, m2));
              const __m256i v3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), m4),
                                                 _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
              const int32_t* xc = xq + 64 * b + 32 * h + c;
              a[0] = dpbusd8(a[0], v0, _mm256_set1_epi32(xc[0]));
              a[1] = dpbusd8(a[1], v1, _mm256_set1_epi32(xc[8]));
              a[2] = dpbusd8(a[2], v2, _mm256_set1_epi32(xc[16]));
              a[3] = dpbusd8(a[3], v3, _mm256_set1_epi32(xc[24]));
            }
            for (int j = 0; j < 4; ++j) {
              const __m128i s8 =
                  _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + SC + 16 * (8 * h + 2 * j + sub) + 8 * half));
              in[j] = _mm256_add_epi32(in[j], _mm256_mullo_epi32(a[j], _mm256_cvtepi8_epi32(s8)));
            }
          }
          for (int j = 0; j < 4; ++j)
            sb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(in[j]), _mm256_set1_ps(x.d[xb + j]), sb);
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * half)));
        acc[half] = _mm256_fmadd_ps(sb, d, acc[half]);
      }
    }
    _mm256_storeu_ps(y, acc[0]);
    _mm256_storeu_ps(y + 8, acc[1]);
  }
#endif
};

Registered<Q6_K> registered;

}  // namespace
}  // namespace llmos
