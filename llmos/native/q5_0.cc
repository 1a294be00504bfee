// GGUF Q5_0 weights, regrouped 16 rows at a time ("Q5_0x16"): op GgufMatMulQ5_0x16 (see gguf_ops.h).
//
// W[n, 32b+j] = d[n, b] * (u[n, b, j] - 16), u = nibble | high bit << 4: the GGUF's own Q5_0 values.
// In the GGUF a block is 22 bytes: fp16 d, 4 bytes qh (bit j: the high bit of weight j), 16 bytes qs
// (low nibble of byte j: weight j, high nibble: weight 16 + j).
// x16 layout, the same 22 bytes per 32 weights: group g holds rows 16g..16g+15; for each block b of 32
// weights, 352 bytes: the 16 rows' fp16 scales d (32 bytes), the 16 rows' qh (64 bytes: bytes
// 4r..4r+3 are row r's, so each row's high bits sit in its own 32-bit lane), then 4 chunks of 64 bytes,
// where bytes 4r..4r+3 of chunk k are the GGUF quant bytes qs[4k..4k+3] of row r, as in Q4_0x16.
//
// In chunk k, byte i of a row's lane holds weights 4k+i (low nibble) and 16+4k+i (high nibble), whose
// high bits are bit 4(k&1)+i of qh's byte k/2 and of its byte 2+k/2: a byte shuffle copies that qh byte
// into all 4 bytes of the lane, a per-byte bit mask tests the bit, and 16 is added where it is set.
// Then as Q4_0: sum_j (u_j - 16) x_j = sum_j u_j x_j - 16 s, u unsigned (at most 31), the -16 s seeded.
#include "gguf_ops.h"

namespace llmos {
namespace {

struct Q5_0 {
  static constexpr const char* kName = "GgufMatMulQ5_0x16";
  static constexpr int QK = 32;          // weights per block
  static constexpr int BLK = 22;         // bytes per block of one row: fp16 d, 4 bytes qh, 16 nibble bytes
  static constexpr int GBLK = 16 * BLK;  // bytes per block of a 16-row group

// Shuffle control copying byte m of each 32-bit lane into all 4 of its bytes (within 128-bit lanes).
static constexpr int32_t rep(int m) { return m * 0x01010101; }
static constexpr int32_t kLaneOffsets[4] = {0, 0x04040404, 0x08080808, 0x0C0C0C0C};
// Bit i of the byte for byte i of a lane: the even chunks' bits 0-3, the odd chunks' bits 4-7.
static constexpr int32_t kBitsEven = 0x08040201, kBitsOdd = int32_t(0x80402010u);

// y + r*ldy [0..15] = the 16 rows of group G against activation rows x[0..R-1], each weight vector
// loaded and expanded to 5 bits once for the R rows; pf: the bytes to prefetch alongside.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
static constexpr int ROWS = 4;

template <int R>
static void gemm_x16(const uint8_t* G, int nb, const XQ* x, float* y, size_t ldy, const uint8_t* pf) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0F), h16 = _mm512_set1_epi8(0x10);
  const __m512i bits[2] = {_mm512_set1_epi32(kBitsEven), _mm512_set1_epi32(kBitsOdd)};
  __m512i shuf[4];
  for (int m = 0; m < 4; ++m)
    shuf[m] = _mm512_broadcast_i32x4(_mm_add_epi32(
        _mm_set1_epi32(rep(m)), _mm_setr_epi32(kLaneOffsets[0], kLaneOffsets[1], kLaneOffsets[2], kLaneOffsets[3])));
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i qh = _mm512_loadu_si512(p + 32);
    __m512i a0[R], a1[R];
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm512_set1_epi32(-16 * x[r].s[b]);
      a1[r] = _mm512_setzero_si512();
    }
    for (int k = 0; k < 4; ++k) {
      const __m512i v = _mm512_loadu_si512(p + 96 + k * 64);
      __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
      const __mmask64 hl = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, shuf[k >> 1]), bits[k & 1]);
      const __mmask64 hh = _mm512_test_epi8_mask(_mm512_shuffle_epi8(qh, shuf[2 + (k >> 1)]), bits[k & 1]);
      lo = _mm512_mask_add_epi8(lo, hl, lo, h16);
      hi = _mm512_mask_add_epi8(hi, hh, hi, h16);
      for (int r = 0; r < R; ++r) {
        const int32_t* xb = reinterpret_cast<const int32_t*>(x[r].q) + b * 8;  // 8 groups of 4 int8
        a0[r] = _mm512_dpbusd_epi32(a0[r], lo, _mm512_set1_epi32(xb[k]));
        a1[r] = _mm512_dpbusd_epi32(a1[r], hi, _mm512_set1_epi32(xb[k + 4]));
      }
    }
    for (int r = 0; r < R; ++r)
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[r], a1[r])),
                               _mm512_mul_ps(d, _mm512_set1_ps(x[r].d[b])), acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * ldy, acc[r]);
}
#else
static constexpr int ROWS = 2;  // 16 ymm registers

// AVX2: each 64-byte chunk (and qh) is rows 0-7 (32 bytes) then rows 8-15. u is at most 31, so maddubs's
// int16 pairs (2 * 31 * 127) do not saturate.

// The nibbles with 16 added where the tested high bit (byte-replicated qh `h` & `bits`) is set.
static inline __m256i with_high(__m256i nib, __m256i h, __m256i bits) {
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(h, bits), bits);
  return _mm256_or_si256(nib, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
}

template <int R>
static void gemm_x16(const uint8_t* G, int nb, const XQ* x, float* y, size_t ldy, const uint8_t* pf) {
  __m256 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i bits[2] = {_mm256_set1_epi32(kBitsEven), _mm256_set1_epi32(kBitsOdd)};
  const __m256i lanes = _mm256_setr_epi32(kLaneOffsets[0], kLaneOffsets[1], kLaneOffsets[2], kLaneOffsets[3],
                                          kLaneOffsets[0], kLaneOffsets[1], kLaneOffsets[2], kLaneOffsets[3]);
  __m256i shuf[4];
  for (int m = 0; m < 4; ++m) shuf[m] = _mm256_add_epi32(_mm256_set1_epi32(rep(m)), lanes);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_bytes(pf + size_t(b) * GBLK, GBLK);
    __m256i a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_set1_epi32(-16 * x[r].s[b]);
    for (int h = 0; h < 2; ++h) {  // rows 0-7, rows 8-15
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 + h * 32));
      for (int k = 0; k < 4; ++k) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 96 + k * 64 + h * 32));
        const __m256i lo = with_high(_mm256_and_si256(v, m4), _mm256_shuffle_epi8(qh, shuf[k >> 1]), bits[k & 1]);
        const __m256i hi = with_high(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                                     _mm256_shuffle_epi8(qh, shuf[2 + (k >> 1)]), bits[k & 1]);
        for (int r = 0; r < R; ++r) {
          const int32_t* xb = reinterpret_cast<const int32_t*>(x[r].q) + b * 8;
          a[r][h] = dpbusd8(dpbusd8(a[r][h], lo, _mm256_set1_epi32(xb[k])), hi, _mm256_set1_epi32(xb[k + 4]));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
      for (int r = 0; r < R; ++r)
        f[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r][h]), _mm256_mul_ps(d, _mm256_set1_ps(x[r].d[b])), f[r][h]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(y + r * ldy, f[r][0]);
    _mm256_storeu_ps(y + r * ldy + 8, f[r][1]);
  }
}
#endif
};

Registered<Q5_0> registered;

}  // namespace
}  // namespace llmos
