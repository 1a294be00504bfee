// What every op of llmos's native library shares: activations rounded to int8 per block of 32, the x16
// row-group scheme, the onnxruntime kernel around a per-type GEMV, and the list of ops to register.
//
// Each GGUF weight type is one file (q4_0.cc, ...) defining a traits struct T and registering
// `GgufOp<T>` with `static Registered<T> r;`:
//   T::kName   op name in domain "llmos.gguf" (attributes K, N; N a multiple of 16, K of T::QK)
//   T::QK      weights per block of one row in the GGUF (32, or 256 for K-quants)
//   T::BLK     bytes per block of one row in the GGUF (the x16 layout keeps the GGUF's bytes per block)
//   T::gemv_x16(G, nb, x, y, pf)  y[0..15] = the 16 rows of group G (nb blocks of 16*BLK bytes each)
//              against one activation row x (int8 per 32 weights: x.q, x.d, x.s, x.h per 32); pf: bytes
//              to prefetch alongside (the same offset in a group ahead)
//   T::ROWS    optional: T::gemm_x16<R>(G, nb, xs, y, ldy, pf) does R <= ROWS activation rows (xs[r],
//              output y + r*ldy) in one pass, decoding each weight vector once for all of them (prefill);
//              such a type needs no gemv_x16 (one row is gemm_x16<1>)
// The weights input B is uint8 [N, K/QK*BLK]: the GGUF's rows regrouped 16 at a time by
// llmos/gguf_layouts.py, nothing re-rounded. Inputs: A float [..., K], B; output Y float [..., N].
//
// Built header-only against onnxruntime's C/C++ API (ORT_API_MANUAL_INIT, no link to libonnxruntime):
// scripts/build_native.sh. Loaded with SessionOptions.register_custom_ops_library.
#pragma once

#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

// GCC 12 flags its own AVX-512 headers' _mm512_undefined_*() (`__Y = __Y`) as (maybe-)uninitialized
// wherever they are inlined (GCC bug 105593, fixed in 13): silenced for those headers only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "llmos's native ops need AVX2, FMA and F16C (scripts/build_native.sh picks the flags)"
#endif

namespace llmos {

constexpr int QX = 32;              // activations are rounded to int8 per block of 32
constexpr size_t PREFETCH = 16384;  // bytes ahead: measured best of 4-32 KB at 0.5B/1B shapes (Q4_0)

// Horizontal sum of 8 floats.
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One activation row rounded to int8 per block: x ~= d[b] * q[32b..32b+31]; s[b] = sum of the block's q;
// h[b] = sum of its first 16 q (types with 16-weight sub-blocks, Q6_K, offset each half on its own);
// f[b] = sum of the block's unrounded x, for a weight type's per-block offset (Q4_1's m): sum_j m x_j =
// m f exactly, as MatMulNBits's correction computes it, where m d s would add the rounding of 32 values.
struct XQ {
  const int8_t* q;
  const float* d;
  const int32_t* s;
  const int32_t* h;
  const float* f;
};

inline int32_t hsum_epi32(__m256i v) {
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s4 = _mm_hadd_epi32(s4, s4);
  s4 = _mm_hadd_epi32(s4, s4);
  return _mm_cvtsi128_si32(s4);
}

inline void quantize_row_q8(const float* x, int K, int8_t* q, float* d, int32_t* s, int32_t* h, float* f) {
  const int nb = K / QX;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int b = 0; b < nb; ++b) {
    const float* xb = x + b * QX;
    __m256 m = _mm256_setzero_ps(), fsum = _mm256_setzero_ps();
    for (int i = 0; i < QX; i += 8) {
      const __m256 v = _mm256_loadu_ps(xb + i);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v));
      fsum = _mm256_add_ps(fsum, v);
    }
    f[b] = hsum(fsum);
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float db = _mm_cvtss_f32(m4) / 127.0f;
    const __m256 id = _mm256_set1_ps(db != 0.0f ? 1.0f / db : 0.0f);
    d[b] = db;
    __m256i v[4];
    for (int i = 0; i < 4; ++i)
      v[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * i), id),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    h[b] = hsum_epi32(_mm256_add_epi32(v[0], v[1]));
    s[b] = h[b] + hsum_epi32(_mm256_add_epi32(v[2], v[3]));
    // 32 x int32 -> 32 x int8 in order (the packs interleave 128-bit lanes; the permute undoes it)
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QX),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

inline void prefetch_bytes(const uint8_t* p, size_t n) {
  for (size_t l = 0; l < n; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + l), _MM_HINT_T1);
}

template <class T>
struct Job {
  const uint8_t* W;
  int nb, N, M;
  const XQ* xs;
  float* Y;
};

// T::ROWS when the type has a multi-row pass, else 1.
template <class T, class = void>
struct RowsPerPass : std::integral_constant<int, 1> {};
template <class T>
struct RowsPerPass<T, std::void_t<decltype(T::ROWS)>> : std::integral_constant<int, T::ROWS> {};

// One task: one 16-row group, for every activation row (the group's bytes stay in cache across rows),
// ROWS rows per pass where the type has such a pass.
template <class T>
void run_task(void* p, size_t g) {
  const Job<T>& j = *static_cast<const Job<T>*>(p);
  const size_t gbytes = size_t(j.nb) * 16 * T::BLK;
  const size_t ahead = std::max<size_t>(1, PREFETCH / gbytes);
  const uint8_t* G = j.W + g * gbytes;
  int m = 0;
  if constexpr (RowsPerPass<T>::value > 1) {
    constexpr int R = RowsPerPass<T>::value;
    for (; m + R <= j.M; m += R)
      T::template gemm_x16<R>(G, j.nb, j.xs + m, j.Y + size_t(m) * j.N + g * 16, size_t(j.N), G + ahead * gbytes);
  }
  for (; m < j.M; ++m) {  // a type with a multi-row pass does one row with the same code (same sums)
    float* y = j.Y + size_t(m) * j.N + g * 16;
    if constexpr (RowsPerPass<T>::value > 1)
      T::template gemm_x16<1>(G, j.nb, j.xs + m, y, 0, G + ahead * gbytes);
    else
      T::gemv_x16(G, j.nb, j.xs[m], y, G + ahead * gbytes);
  }
}

template <class T>
struct Kernel {
  int64_t K, N;

  explicit Kernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    K = ki.GetAttribute<int64_t>("K");
    N = ki.GetAttribute<int64_t>("N");
    if (K <= 0 || K % T::QK || K % QX) fail("K must be a positive multiple of the block size");
    if (N <= 0 || N % 16) fail("N must be a positive multiple of 16");
  }

  [[noreturn]] static void fail(const std::string& why) {
    ORT_CXX_API_THROW(std::string(T::kName) + ": " + why, ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto A = ctx.GetInput(0);
    auto B = ctx.GetInput(1);
    const auto a_info = A.GetTensorTypeAndShapeInfo();
    std::vector<int64_t> shape = a_info.GetShape();
    if (shape.empty() || shape.back() != K) fail("A's last dimension must be K");
    const int nb = int(K / T::QK), nx = int(K / QX);
    if (B.GetTensorTypeAndShapeInfo().GetElementCount() != size_t(nb) * T::BLK * size_t(N))
      fail("B must hold N * K/QK * BLK bytes");
    const int M = int(a_info.GetElementCount() / size_t(K));
    shape.back() = N;
    float* Y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
    if (M == 0) return;
    const float* Ap = A.GetTensorData<float>();

    // the activations in q8 form, once per call (buffers kept per calling thread)
    thread_local std::vector<int8_t> q;
    thread_local std::vector<float> d;
    thread_local std::vector<int32_t> s;
    thread_local std::vector<int32_t> h;
    thread_local std::vector<float> f;
    thread_local std::vector<XQ> xs;
    q.resize(size_t(M) * K);
    d.resize(size_t(M) * nx);
    s.resize(size_t(M) * nx);
    h.resize(size_t(M) * nx);
    f.resize(size_t(M) * nx);
    xs.resize(M);
    for (int m = 0; m < M; ++m) {
      int8_t* qm = q.data() + size_t(m) * K;
      float* dm = d.data() + size_t(m) * nx;
      int32_t* sm = s.data() + size_t(m) * nx;
      int32_t* hm = h.data() + size_t(m) * nx;
      float* fm = f.data() + size_t(m) * nx;
      quantize_row_q8(Ap + size_t(m) * K, int(K), qm, dm, sm, hm, fm);
      xs[m] = XQ{qm, dm, sm, hm, fm};
    }
    Job<T> job{B.GetTensorData<uint8_t>(), nb, int(N), M, xs.data(), Y};
    ctx.ParallelFor(run_task<T>, size_t(N / 16), 0, &job);
  }
};

template <class T>
struct GgufOp : Ort::CustomOpBase<GgufOp<T>, Kernel<T>> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new Kernel<T>(info); }
  const char* GetName() const { return T::kName; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

// The ops RegisterCustomOps adds (gguf_ops.cc); filled by static initializers when the library loads.
inline std::vector<OrtCustomOp*>& registered_ops() {
  static std::vector<OrtCustomOp*> ops;
  return ops;
}

template <class T>
struct Registered {
  Registered() {
    static GgufOp<T> op;
    registered_ops().push_back(&op);
  }
};

// AVX2's dpbusd for 8 int32 lanes: acc + sum of 4 products of unsigned w bytes and signed x bytes (pairs
// of products must fit int16: w < 128 with |x| <= 127, which every caller's weights satisfy).
inline __m256i dpbusd8(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

}  // namespace llmos
