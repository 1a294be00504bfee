// llmos's onnxruntime custom op for GGUF Q4_0 weights, regrouped 16 rows at a time ("Q4_0x16").
//
//   domain "llmos.gguf", op "GgufMatMulQ4_0x16", attributes K, N (N a multiple of 16, K of 32)
//   inputs : A float [..., K]; B uint8 [N, K/32*18] in the x16 layout below
//   output : Y float [..., N] = A @ W^T with W[n, 32b+j] = d[n, b] * (q[n, b, j] - 8), the GGUF's own
//            Q4_0 values (llmos/quant.py regroups the file's bytes; nothing is re-rounded)
//
// x16 layout, 18 bytes per 32 weights as in the GGUF: group g holds rows 16g..16g+15; for each block b
// of 32 weights, 288 bytes: the 16 rows' fp16 scales d (32 bytes), then 4 chunks of 64 bytes, where
// bytes 4r..4r+3 of chunk k are the GGUF quant bytes qs[4k..4k+3] of row r (low nibbles: weights
// 4k..4k+3, high nibbles: weights 16+4k..16+4k+3). One 512-bit load then feeds 16 rows at once.
//
// Activations are rounded to int8 per block of 32 (as llama.cpp's q8_0 and MatMulNBits at
// accuracy_level 4 do), then integer dot products: AVX-512 VNNI, or AVX2 (with AVX-VNNI when built
// for it). Rows are split over onnxruntime's intra-op threads; weights are prefetched ~16 KB ahead.
//
// Built header-only against onnxruntime's C/C++ API (ORT_API_MANUAL_INIT, no link to libonnxruntime):
// scripts/build_native.sh. Loaded with SessionOptions.register_custom_ops_library.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "gguf_ops.cc needs AVX2, FMA and F16C (scripts/build_native.sh picks the flags)"
#endif

namespace {

constexpr int QK = 32;           // weights per block
constexpr int BLK = 18;          // bytes per block of one row: fp16 d + 16 nibble bytes
constexpr int GBLK = 16 * BLK;   // bytes per block of a 16-row group
constexpr size_t PREFETCH = 16384;  // bytes ahead: measured best of 4-32 KB at 0.5B/1B shapes

// One activation row rounded to int8 per block: x ~= d[b] * q[32b..32b+31]; s[b] = sum of the block's q.
struct XQ {
  const int8_t* q;
  const float* d;
  const int32_t* s;
};

void quantize_row_q8(const float* x, int K, int8_t* q, float* d, int32_t* s) {
  const int nb = K / QK;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int b = 0; b < nb; ++b) {
    const float* xb = x + b * QK;
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < QK; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + i)));
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
    const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_hadd_epi32(s4, s4);
    s4 = _mm_hadd_epi32(s4, s4);
    s[b] = _mm_cvtsi128_si32(s4);
    // 32 x int32 -> 32 x int8 in order (the packs interleave 128-bit lanes; the permute undoes it)
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
}

inline void prefetch_block(const uint8_t* p) {
  for (int l = 0; l < GBLK; l += 64) _mm_prefetch(reinterpret_cast<const char*>(p + l), _MM_HINT_T1);
}

// y[0..15] = the 16 rows of group G against one activation row; pf: the bytes to prefetch alongside.
// Per block: sum_j (u_j - 8) * q_j = sum_j u_j * q_j - 8 * s, with u the unsigned nibble (dpbusd's
// unsigned operand) and the -8 s term seeded into the accumulator.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
void gemv_x16(const uint8_t* G, int nb, const XQ& x, float* y, const uint8_t* pf) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const int32_t* xq = reinterpret_cast<const int32_t*>(x.q);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_block(pf + size_t(b) * GBLK);
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
inline __m256i dot8(__m256i acc, __m256i w, __m256i x) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, w, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

void gemv_x16(const uint8_t* G, int nb, const XQ& x, float* y, const uint8_t* pf) {
  __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const int32_t* xq = reinterpret_cast<const int32_t*>(x.q);
  for (int b = 0; b < nb; ++b) {
    const uint8_t* p = G + size_t(b) * GBLK;
    prefetch_block(pf + size_t(b) * GBLK);
    const __m256 dx = _mm256_set1_ps(x.d[b]);
    const __m256 s0 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), dx);
    const __m256 s1 = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))), dx);
    const int32_t* xb = xq + b * 8;
    __m256i a0 = _mm256_set1_epi32(-8 * x.s[b]), a1 = a0;
    for (int k = 0; k < 4; ++k) {
      const __m256i xl = _mm256_set1_epi32(xb[k]), xh = _mm256_set1_epi32(xb[k + 4]);
      const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 + k * 64));
      const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64 + k * 64));
      a0 = dot8(a0, _mm256_and_si256(v0, m4), xl);
      a0 = dot8(a0, _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4), xh);
      a1 = dot8(a1, _mm256_and_si256(v1, m4), xl);
      a1 = dot8(a1, _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4), xh);
    }
    f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a0), s0, f0);
    f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a1), s1, f1);
  }
  _mm256_storeu_ps(y, f0);
  _mm256_storeu_ps(y + 8, f1);
}
#endif

struct Job {
  const uint8_t* W;
  int nb, N, M, groups_per_task;
  const XQ* xs;
  float* Y;
};

// One task: a run of 16-row groups, for every activation row (a group's bytes stay in cache across rows).
void run_task(void* p, size_t t) {
  const Job& j = *static_cast<const Job*>(p);
  const int g0 = int(t) * j.groups_per_task;
  const int g1 = std::min(j.N / 16, g0 + j.groups_per_task);
  const size_t gbytes = size_t(j.nb) * GBLK;
  const size_t ahead = std::max<size_t>(1, PREFETCH / gbytes);
  for (int g = g0; g < g1; ++g) {
    const uint8_t* G = j.W + size_t(g) * gbytes;
    for (int m = 0; m < j.M; ++m)
      gemv_x16(G, j.nb, j.xs[m], j.Y + size_t(m) * j.N + size_t(g) * 16, G + ahead * gbytes);
  }
}

struct Kernel {
  int64_t K, N;

  explicit Kernel(const OrtKernelInfo* info) {
    Ort::ConstKernelInfo ki(info);
    K = ki.GetAttribute<int64_t>("K");
    N = ki.GetAttribute<int64_t>("N");
    if (K <= 0 || K % QK) ORT_CXX_API_THROW("GgufMatMulQ4_0x16: K must be a positive multiple of 32", ORT_INVALID_ARGUMENT);
    if (N <= 0 || N % 16) ORT_CXX_API_THROW("GgufMatMulQ4_0x16: N must be a positive multiple of 16", ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    auto A = ctx.GetInput(0);
    auto B = ctx.GetInput(1);
    const auto a_info = A.GetTensorTypeAndShapeInfo();
    std::vector<int64_t> shape = a_info.GetShape();
    if (shape.empty() || shape.back() != K) ORT_CXX_API_THROW("GgufMatMulQ4_0x16: A's last dimension must be K", ORT_INVALID_ARGUMENT);
    const int nb = int(K / QK);
    if (B.GetTensorTypeAndShapeInfo().GetElementCount() != size_t(nb) * BLK * size_t(N))
      ORT_CXX_API_THROW("GgufMatMulQ4_0x16: B must hold N*K/32*18 bytes", ORT_INVALID_ARGUMENT);
    const int M = int(a_info.GetElementCount() / size_t(K));
    shape.back() = N;
    float* Y = ctx.GetOutput(0, shape).GetTensorMutableData<float>();
    if (M == 0) return;
    const float* Ap = A.GetTensorData<float>();

    // the activations in q8 form, once per call (buffers kept per calling thread)
    thread_local std::vector<int8_t> q;
    thread_local std::vector<float> d;
    thread_local std::vector<int32_t> s;
    thread_local std::vector<XQ> xs;
    q.resize(size_t(M) * K);
    d.resize(size_t(M) * nb);
    s.resize(size_t(M) * nb);
    xs.resize(M);
    for (int m = 0; m < M; ++m) {
      int8_t* qm = q.data() + size_t(m) * K;
      float* dm = d.data() + size_t(m) * nb;
      int32_t* sm = s.data() + size_t(m) * nb;
      quantize_row_q8(Ap + size_t(m) * K, int(K), qm, dm, sm);
      xs[m] = XQ{qm, dm, sm};
    }
    Job job{B.GetTensorData<uint8_t>(), nb, int(N), M, 1, xs.data(), Y};
    ctx.ParallelFor(run_task, size_t(N / 16), 0, &job);
  }
};

struct Op : Ort::CustomOpBase<Op, Kernel> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const { return new Kernel(info); }
  const char* GetName() const { return "GgufMatMulQ4_0x16"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    return i == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

Op g_op;
std::vector<Ort::CustomOpDomain> g_domains;  // must outlive every session that registered them
std::mutex g_mu;

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  try {
    Ort::CustomOpDomain domain{"llmos.gguf"};
    domain.Add(&g_op);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(g_mu);
    g_domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
