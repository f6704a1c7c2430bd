// AVX2 ternary x int8 GEMM for bitflux's `2bit` packing (see cpu_avx2.py for the design notes).
//
//   acc[m, n] = sum_k xq[m, k] * T[n, k]           exact int32
//             = sum_k U[n, k] * xq[m, k] - rowsum(xq)[m],   U = T + 1 in {0, 1, 2} (u8)
//
// U is the unsigned operand of vpmaddubsw and xq the signed one: every 16-bit pair sum is at most
// 2 * 2 * 127 = 508 in magnitude, so KC / 32 <= 64 k-steps accumulate in int16 without overflow
// (64 * 508 = 32512 < 32767) before widening to int32 with vpmaddwd.
//
// The weights are decoded per call, per thread, in panels of NB rows x KC codes (a few KiB, L1),
// straight from the packed bytes; there is no weight cache. A 32-byte load of packed codes holds
// 128 codes; field i of byte j (code 4j + i of the group) goes to byte j of decoded vector i, so
// the activations are permuted once per call into the same order: A[g*128 + 32i + j] = xq[g*128 + 4j + i].
//
// Light headers on purpose (no torch/extension.h: 4x the compile time): the Python wrapper checks
// shapes and dtypes, allocates the output and passes data pointers; this file only computes.
// Built with -fopenmp so that at::parallel_for runs on torch's OpenMP pool (the same libgomp).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t GROUP = 128;  // codes per decode unit (32 packed bytes)
constexpr int64_t KC = 1024;    // codes per k-block (<= 2048: int16 accumulators)
constexpr int64_t NB = 12;      // weight rows per panel (decoded panel: NB * KC bytes)
constexpr int64_t MC = 256;     // activation rows per m-block (MC * KC bytes of A stay in L2)
constexpr int MR = 4;           // microkernel tile: MR activation rows x NR weight rows
constexpr int NR = 2;            // (4 x 2: 8 accumulators, no spills; 4 x 3 spilled and ran ~20% slower)

static_assert(KC % GROUP == 0 && KC <= 2048, "KC");
static_assert(NB % NR == 0, "NB");

// Decode codes [kb, kb + kc) of rows [n0, n0 + nb) into dst (row r at dst + r * KC) as U = T + 1.
// Bytes at or past `cols` read as 0 (code 0: U = 1, against zero-padded activations).
inline void decode_panel(const uint8_t* qw, int64_t ldq, int64_t cols, int64_t n0, int64_t nb, int64_t kb,
                         int64_t kc, uint8_t* dst) {
  // field 00 -> code 0 -> U 1; 01 -> +1 -> 2; 10 -> -1 -> 0; 11 (invalid) -> 0 -> 1 (as `unpack`)
  const __m256i lut = _mm256_setr_epi8(1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                       1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i m3 = _mm256_set1_epi8(3);
  for (int64_t r = 0; r < nb; ++r) {
    const uint8_t* src = qw + (n0 + r) * ldq;
    uint8_t* d = dst + r * KC;
    for (int64_t g = 0; g < kc; g += GROUP) {
      const int64_t b0 = (kb + g) / 4;
      __m256i v;
      if (b0 + 32 <= cols) {
        v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b0));
      } else {
        alignas(32) uint8_t tmp[32] = {0};
        if (b0 < cols) std::memcpy(tmp, src + b0, static_cast<size_t>(cols - b0));
        v = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
      }
      __m256i* o = reinterpret_cast<__m256i*>(d + g);
      _mm256_store_si256(o + 0, _mm256_shuffle_epi8(lut, _mm256_and_si256(v, m3)));
      _mm256_store_si256(o + 1, _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 2), m3)));
      _mm256_store_si256(o + 2, _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), m3)));
      _mm256_store_si256(o + 3, _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 6), m3)));
    }
  }
}

// C[i * ldc + j] += sum_k U[j][k] * A[i][k] for an mr x nr tile over kc codes (kc % 32 == 0).
template <int mr, int nr>
void micro(const int8_t* A, int64_t lda, const uint8_t* W, int64_t kc, int32_t* C, int64_t ldc) {
  __m256i acc[mr][nr];
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kc; k += 32) {
    for (int j = 0; j < nr; ++j) {
      const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(W + j * KC + k));
      for (int i = 0; i < mr; ++i) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k));
        acc[i][j] = _mm256_add_epi16(acc[i][j], _mm256_maddubs_epi16(w, a));
      }
    }
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int i = 0; i < mr; ++i) {
    __m256i v[4];
    for (int j = 0; j < 4; ++j) v[j] = j < nr ? _mm256_madd_epi16(acc[i][j < nr ? j : 0], ones) : _mm256_setzero_si256();
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    alignas(16) int32_t t[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(t), s);
    for (int j = 0; j < nr; ++j) C[i * ldc + j] += t[j];
  }
}

using MicroFn = void (*)(const int8_t*, int64_t, const uint8_t*, int64_t, int32_t*, int64_t);

inline MicroFn pick(int mr, int nr) {
  static const MicroFn table[MR][NR] = {
      {micro<1, 1>, micro<1, 2>},
      {micro<2, 1>, micro<2, 2>},
      {micro<3, 1>, micro<3, 2>},
      {micro<4, 1>, micro<4, 2>},
  };
  return table[mr - 1][nr - 1];
}

// q (Kp,) natural order, zero past K -> ar (Kp,) in the decode order; *sum = sum of q.
inline void permute_row(const int8_t* q, int64_t Kp, int8_t* ar, int32_t* sum) {
  int32_t s = 0;
  for (int64_t g = 0; g < Kp; g += GROUP)
    for (int64_t j = 0; j < 32; ++j)
      for (int64_t i = 0; i < 4; ++i) {
        const int8_t v = q[g + 4 * j + i];
        ar[g + 32 * i + j] = v;
        s += v;
      }
  *sum = s;
}

// Per-token symmetric int8, bit-identical to `reference.quantize_act_int8`, fused with the
// permutation and row sums: xscale = max(amax|x|, 1e-8) / 127 and xq = clamp(round(x / xscale))
// with IEEE f32 division and round-half-to-even, as torch computes them.
template <typename T>
void quantize_activations(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, int8_t* A, int32_t* rowsum,
                          float* xscale) {
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    std::vector<float> xf(static_cast<size_t>(K) + 8);
    std::vector<int8_t> q(static_cast<size_t>(Kp), 0);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    for (int64_t m = m0; m < m1; ++m) {
      const T* xr = x + m * ldx;
      if constexpr (std::is_same_v<T, int8_t>) {  // already quantised: permute and sum only
        for (int64_t k = 0; k < K; ++k) q[k] = xr[k];
        permute_row(q.data(), Kp, A + m * Kp, rowsum + m);
        continue;
      }
      for (int64_t k = 0; k < K; ++k) xf[k] = static_cast<float>(xr[k]);
      __m256 vmax = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(&xf[k])));
      alignas(32) float t[8];
      _mm256_store_ps(t, vmax);
      float amax = 0.0f;
      for (int j = 0; j < 8; ++j) amax = std::max(amax, t[j]);
      for (; k < K; ++k) amax = std::max(amax, std::fabs(xf[k]));
      const float s = std::max(amax, 1e-8f) / 127.0f;
      xscale[m] = s;
      const __m256 vs = _mm256_set1_ps(s);
      k = 0;
      for (; k + 8 <= K; k += 8) {
        __m256 v = _mm256_div_ps(_mm256_loadu_ps(&xf[k]), vs);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        const __m256i i32 = _mm256_cvtps_epi32(v);
        alignas(32) int32_t iv[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(iv), i32);
        for (int j = 0; j < 8; ++j) q[k + j] = static_cast<int8_t>(iv[j]);
      }
      for (; k < K; ++k) {
        const float v = std::nearbyint(xf[k] / s);
        q[k] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, v)));
      }
      permute_row(q.data(), Kp, A + m * Kp, rowsum + m);
    }
  });
}

struct Epilogue {
  const float* xscale = nullptr;   // (M,)
  const float* colscale = nullptr; // (N,)
  const float* bias = nullptr;     // (N,) or null
};

// y = float(acc) * (xscale[m] * colscale[n]) + bias[n], rounded step by step in fp32 (no FMA:
// built with -ffp-contract=off) exactly as the reference's torch ops, then cast to the output.
template <typename T>
inline void store_panel(const int32_t* acc, int64_t mb, int64_t nb, int64_t m0, int64_t n0, const int32_t* rowsum,
                        const Epilogue& ep, T* out, int64_t N) {
  for (int64_t i = 0; i < mb; ++i) {
    const int64_t m = m0 + i;
    T* o = out + m * N + n0;
    const int32_t* ac = acc + i * NB;
    if constexpr (std::is_same_v<T, int32_t>) {
      for (int64_t r = 0; r < nb; ++r) o[r] = ac[r] - rowsum[m];
    } else {
      const float xs = ep.xscale[m];
      for (int64_t r = 0; r < nb; ++r) {
        const float s = xs * ep.colscale[n0 + r];
        float y = static_cast<float>(ac[r] - rowsum[m]) * s;
        if (ep.bias) y = y + ep.bias[n0 + r];
        o[r] = static_cast<T>(y);
      }
    }
  }
}

template <typename T>
void gemm(const int8_t* A, int64_t M, int64_t Kp, const int32_t* rowsum, const uint8_t* qw, int64_t ldq,
          int64_t cols, int64_t N, const Epilogue& ep, T* out) {
  const int64_t panels = (N + NB - 1) / NB;
  for (int64_t mc0 = 0; mc0 < M; mc0 += MC) {
    const int64_t mb = std::min(MC, M - mc0);
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      uint8_t* wbuf = static_cast<uint8_t*>(std::aligned_alloc(64, NB * KC));
      std::vector<int32_t> acc(static_cast<size_t>(mb * NB));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * NB, nb = std::min(NB, N - n0);
        std::fill(acc.begin(), acc.end(), 0);
        for (int64_t kb = 0; kb < Kp; kb += KC) {
          const int64_t kc = std::min(KC, Kp - kb);
          decode_panel(qw, ldq, cols, n0, nb, kb, kc, wbuf);
          for (int64_t i0 = 0; i0 < mb; i0 += MR) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, mb - i0));
            const int8_t* a = A + (mc0 + i0) * Kp + kb;
            for (int64_t r0 = 0; r0 < nb; r0 += NR) {
              const int nr = static_cast<int>(std::min<int64_t>(NR, nb - r0));
              pick(mr, nr)(a, Kp, wbuf + r0 * KC, kc, acc.data() + i0 * NB + r0, NB);
            }
          }
        }
        store_panel<T>(acc.data(), mb, nb, mc0, n0, rowsum, ep, out, N);
      }
      std::free(wbuf);
    });
  }
}

// Entry: x (M, K) rows at stride ldx (elements) of dtype `code`: 0 int8 (already quantised;
// out is the exact int32 sums), 1 float32, 2 bfloat16, 3 float16 (quantised here as the
// reference does; out in x's dtype). qweight (N, ldq-strided rows) uint8 `2bit`, of which the
// first `cols` bytes of a row are read. scale (N,) f32, bias (N,) f32 or 0, out (M, N) contiguous.
void run(int64_t code, uintptr_t x, int64_t ldx, int64_t M, int64_t K, uintptr_t qweight, int64_t ldq, int64_t cols,
         int64_t N, uintptr_t scale, uintptr_t bias, uintptr_t out) {
  if (M <= 0 || N <= 0) return;
  const int64_t Kp = std::max<int64_t>(GROUP, (K + GROUP - 1) / GROUP * GROUP);
  cols = std::min<int64_t>(cols, (K + 3) / 4);  // bytes holding codes < K
  std::vector<int8_t> A(static_cast<size_t>(M * Kp));
  std::vector<int32_t> rowsum(static_cast<size_t>(M));
  std::vector<float> xscale(static_cast<size_t>(M));
  const auto* q = reinterpret_cast<const uint8_t*>(qweight);
  Epilogue ep;
  ep.xscale = xscale.data();
  ep.colscale = reinterpret_cast<const float*>(scale);
  ep.bias = reinterpret_cast<const float*>(bias);
  int8_t* a = A.data();
  int32_t* rs = rowsum.data();
  float* xs = xscale.data();
  switch (code) {
    case 0:
      quantize_activations(reinterpret_cast<const int8_t*>(x), ldx, M, K, Kp, a, rs, xs);
      gemm(a, M, Kp, rs, q, ldq, cols, N, ep, reinterpret_cast<int32_t*>(out));
      break;
    case 1:
      quantize_activations(reinterpret_cast<const float*>(x), ldx, M, K, Kp, a, rs, xs);
      gemm(a, M, Kp, rs, q, ldq, cols, N, ep, reinterpret_cast<float*>(out));
      break;
    case 2:
      quantize_activations(reinterpret_cast<const c10::BFloat16*>(x), ldx, M, K, Kp, a, rs, xs);
      gemm(a, M, Kp, rs, q, ldq, cols, N, ep, reinterpret_cast<c10::BFloat16*>(out));
      break;
    case 3:
      quantize_activations(reinterpret_cast<const c10::Half*>(x), ldx, M, K, Kp, a, rs, xs);
      gemm(a, M, Kp, rs, q, ldq, cols, N, ep, reinterpret_cast<c10::Half*>(out));
      break;
    default:
      throw std::invalid_argument("cpu_avx2: unknown dtype code");
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("run", &run, "ternary 2bit x int8 GEMM on raw pointers (see cpu_avx2.py)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}
