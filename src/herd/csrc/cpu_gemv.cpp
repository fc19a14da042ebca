// herd's CPU decode kernels: y = x @ W^T for a few rows of x (decode, up to 4 rows per pass over the weights) and
// weights streamed once from memory: bf16, int8 per output channel, or int4 in groups along K.
//
// Decode on a CPU is bound by memory bandwidth, so each kernel reads every weight byte once, keeps x in L1, and
// spends few instructions per weight byte. Each thread takes a contiguous range of output rows, cuts it into RB
// (2-8) equal parts and walks them side by side, one row of each at a time: RB long sequential streams per core,
// which keeps many more cache misses in flight than one stream (or RB short ones from adjacent rows) does. On this
// project's 2-core machine that took the bf16 kernel from ~80% to ~90% of the read bandwidth and int8 from ~65% to
// ~86%. The small loops over rows are unrolled by pragma so every accumulator stays in a register.
//
// bf16: `vdpbf16ps` on bf16 x (exact products, fp32 sums).
// int8: integer dot products (`vpdpwssd`, int16 x int16 -> int32) against x rounded to int16 with one fp32 scale
//   per 64 of K, so the rounding error is at most 2^-16 of the block's largest |x|; every block's integer sum is
//   converted to fp32 and scaled. Dropped: int8 -> fp32 + FMA per weight (compute-bound at ~70% of one core's
//   bandwidth).
// int4: `vpdpbusd` (unsigned nibble x int8 x, 4 products per int32 lane) against x rounded to int8 with one scale
//   per weight group, as llama.cpp rounds x for its 4-bit types (error at most 2^-8 of the group's largest |x|, far
//   below the 4-bit weights' own). Half the instructions per weight byte of the int16-x form this replaced (which
//   ran at about the memory rate of one core even with its data in cache), +2-3% decode alone, more where a core has
//   more bandwidth. Dropped: int4 via the bf16 "0x4300 | nibble" trick and `vdpbf16ps` (~60%; that instruction
//   issues every other cycle here).
//
// Layouts (row-major, one row per output channel):
//   bf16  w (N, K) bf16.
//   int8  w (N, K) int8, scales (N,) fp32: W = w * scale.
//   int4  w (N, K/2) uint8, scales and mins (N, K/G) bf16: W = q * scale + min, q in 0..15. Every 64 weights of a
//         row are 32 bytes, byte j holding q[j] in its low nibble and q[j + 32] in its high nibble.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define HERD_AVX512 1
#endif

#ifndef HERD_PREFETCH
// Bytes ahead to software-prefetch each weight row: more misses in flight per core (+15-20% for int8/int4 here).
#define HERD_PREFETCH 512
#endif

namespace {

constexpr int64_t kMaxRows = 4;  // rows of x handled per pass over the weights

inline void prefetch(const void* p) {
  if constexpr (HERD_PREFETCH > 0) _mm_prefetch(static_cast<const char*>(p) + HERD_PREFETCH, _MM_HINT_T0);
}

constexpr bool supported() {
#ifdef HERD_AVX512
  return true;
#else
  return false;
#endif
}

void check_x(const at::Tensor& x, int64_t K, int64_t multiple) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be (M, K) with K = ", K);
  TORCH_CHECK(K % multiple == 0, "K = ", K, " must be a multiple of ", multiple);
  TORCH_CHECK(x.device().is_cpu(), "herd CPU kernels take CPU tensors");
}

#ifdef HERD_AVX512

// Run fn(row_begin, row_end) over [0, N) in blocks of `block` rows, split across torch's intra-op threads.
template <typename F>
void for_rows(int64_t N, int64_t block, const F& fn) {
  int64_t nb = (N + block - 1) / block;
  at::parallel_for(0, nb, 1, [&](int64_t b, int64_t e) { fn(b * block, std::min(N, e * block)); });
}

// ---- bf16 -------------------------------------------------------------------------------------------------

template <int MR, int RB>
void bf16_rows(const uint16_t* x, const uint16_t* w, float* y, int64_t n, int64_t stride, int64_t K, int64_t N) {
  __m512 acc[MR][RB];
  #pragma GCC unroll 16
  for (int m = 0; m < MR; m++)
    #pragma GCC unroll 16
    for (int r = 0; r < RB; r++) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh wv[RB];
    #pragma GCC unroll 16
    for (int r = 0; r < RB; r++) {
      prefetch(w + (n + r * stride) * K + k);
      wv[r] = (__m512bh)_mm512_loadu_si512(w + (n + r * stride) * K + k);
    }
    #pragma GCC unroll 16
    for (int m = 0; m < MR; m++) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      #pragma GCC unroll 16
      for (int r = 0; r < RB; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < MR; m++)
    #pragma GCC unroll 16
    for (int r = 0; r < RB; r++) y[m * N + n + r * stride] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int MR>
void bf16_pass(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N) {
  constexpr int RB = MR == 1 ? 8 : (MR == 2 ? 4 : 2);  // streams per thread
  for_rows(N, 16, [&](int64_t b, int64_t e) {
    const int64_t q = (e - b) / RB;
    for (int64_t i = 0; i < q; i++) bf16_rows<MR, RB>(x, w, y, b + i, q, K, N);
    for (int64_t n = b + RB * q; n < e; n++) bf16_rows<MR, 1>(x, w, y, n, 1, K, N);
  });
}

// ---- quantized activations --------------------------------------------------------------------------------

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Where x[k] goes in the int4 kernel's int8 x: quarters 1 and 2 of every 128 swapped, so one 64-byte load of packed
// weights (low nibbles: weights 0-31 and 64-95, high nibbles: 32-63 and 96-127) meets x in its own order.
inline int64_t int4_x_pos(int64_t k) {
  const int64_t q = (k / 32) % 4;
  return q == 1 ? k + 32 : (q == 2 ? k - 32 : k);
}

// x (M, K) fp32 or bf16 -> xq (M, K) int16 (int8 weights) or int8 (int4 weights, in int4_x_pos order), one fp32
// scale per block of B (a multiple of 16) in xs (M, K/B), and xsum (M, K/B) = the block sums of the dequantized x.
// Round to nearest even, as std::nearbyint.
template <typename Q, typename T>
void quantize_x(const T* x, int64_t M, int64_t K, int64_t B, Q* xq, float* xs, float* xsum) {
  constexpr bool i16 = std::is_same_v<Q, int16_t>;
  constexpr float qmax = i16 ? 32767.f : 127.f;
  for (int64_t m = 0; m < M; m++) {
    for (int64_t b = 0; b < K / B; b++) {
      const T* xb = x + m * K + b * B;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t i = 0; i < B; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(xb + i)));
      const float a = _mm512_reduce_max_ps(amax);
      const float scale = a > 0.f ? a / qmax : 1.f;
      const __m512 inv = _mm512_set1_ps(1.f / scale);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t i = 0; i < B; i += 16) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16(xb + i), inv));
        sum = _mm512_add_epi32(sum, q);
        if constexpr (i16) _mm256_storeu_si256((__m256i*)(xq + m * K + b * B + i), _mm512_cvtsepi32_epi16(q));
        else _mm_storeu_si128((__m128i*)(xq + m * K + int4_x_pos(b * B + i)), _mm512_cvtsepi32_epi8(q));
      }
      xs[m * (K / B) + b] = scale;
      xsum[m * (K / B) + b] = static_cast<float>(_mm512_reduce_add_epi32(sum)) * scale;
    }
  }
}

// ---- int8 -------------------------------------------------------------------------------------------------

constexpr int64_t kInt8Block = 64;

template <int MR, int RB>
void int8_rows(const int16_t* xq, const float* xs, const int8_t* w, const float* s, float* y, int64_t n, int64_t stride,
               int64_t K, int64_t N) {
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[MR][RB];
  #pragma GCC unroll 16
  for (int m = 0; m < MR; m++)
    #pragma GCC unroll 16
    for (int r = 0; r < RB; r++) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kInt8Block) {
    __m512i w0[RB], w1[RB];
    #pragma GCC unroll 16
    for (int r = 0; r < RB; r++) {
      const int8_t* wr = w + (n + r * stride) * K + k;
      prefetch(wr);
      w0[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)wr));
      w1[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(wr + 32)));
    }
    #pragma GCC unroll 16
    for (int m = 0; m < MR; m++) {
      const __m512i x0 = _mm512_loadu_si512(xq + m * K + k), x1 = _mm512_loadu_si512(xq + m * K + k + 32);
      const __m512 sx = _mm512_set1_ps(xs[m * (K / kInt8Block) + k / kInt8Block]);
      #pragma GCC unroll 16
      for (int r = 0; r < RB; r++) {
        __m512i t = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(zero, x0, w0[r]), x1, w1[r]);
        acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sx, acc[m][r]);
      }
    }
  }
  #pragma GCC unroll 16
  for (int m = 0; m < MR; m++)
    #pragma GCC unroll 16
    for (int r = 0; r < RB; r++) y[m * N + n + r * stride] = _mm512_reduce_add_ps(acc[m][r]) * s[n + r * stride];
}

template <int MR>
void int8_pass(const int16_t* xq, const float* xs, const int8_t* w, const float* s, float* y, int64_t K, int64_t N) {
  constexpr int RB = MR == 1 ? 8 : (MR == 2 ? 4 : 2);  // streams per thread
  for_rows(N, 16, [&](int64_t b, int64_t e) {
    const int64_t q = (e - b) / RB;
    for (int64_t i = 0; i < q; i++) int8_rows<MR, RB>(xq, xs, w, s, y, b + i, q, K, N);
    for (int64_t n = b + RB * q; n < e; n++) int8_rows<MR, 1>(xq, xs, w, s, y, n, 1, K, N);
  });
}

// ---- int4 -------------------------------------------------------------------------------------------------

// xq/xs/xsum: x as int8 in int4_x_pos order, in blocks of G (one x scale per weight group). Each step takes 128
// weights of a row (one 64-byte load): low nibbles are weights 0-31 and 64-95, high nibbles 32-63 and 96-127, and
// `vpdpbusd` (u8 nibble x s8 x, 4 products per int32 lane) multiplies them with the two halves of x. Lanes 0-7 hold
// weights 0-63 of the 128 and lanes 8-15 weights 64-127, which is how groups of 32 and 64 are told apart.
template <int MR, int RB, int G>
void int4_rows(const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w, const uint16_t* sc,
               const uint16_t* mn, float* y, int64_t n, int64_t stride, int64_t K, int64_t N) {
  const int64_t ng = K / G;
  const __m512i zero = _mm512_setzero_si512(), nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[MR][RB];
  __m512i part[MR][RB];  // the current group's integer sums (G >= 128)
  #pragma GCC unroll 16
  for (int m = 0; m < MR; m++)
    #pragma GCC unroll 16
    for (int r = 0; r < RB; r++) acc[m][r] = _mm512_setzero_ps(), part[m][r] = zero;
  // The next rows' scales and mins, which the hardware prefetcher (following the weight streams) does not fetch:
  // short reads that otherwise miss at every row start and end (+5% int4 decode here).
  #pragma GCC unroll 16
  for (int r = 0; r < RB; r++) {
    const int64_t next = std::min(n + r * stride + 1, N - 1) * ng;
    for (int64_t g = 0; g < ng; g += 32) {
      _mm_prefetch((const char*)(sc + next + g), _MM_HINT_T0);
      _mm_prefetch((const char*)(mn + next + g), _MM_HINT_T0);
    }
  }
  // the fp32 multiplier of each group, weight scale * x scale, computed 16 groups at a time into a per-thread buffer
  thread_local std::vector<float> mul_buf;
  if (mul_buf.size() < static_cast<size_t>(MR * RB * ng)) mul_buf.resize(MR * RB * ng);
  float* mul = mul_buf.data();
  #pragma GCC unroll 16
  for (int m = 0; m < MR; m++)
    #pragma GCC unroll 16
    for (int r = 0; r < RB; r++)
      for (int64_t g = 0; g < ng; g += 16) {
        const __mmask16 mask = ng - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (ng - g)) - 1);
        const __m512 ws = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, sc + (n + r * stride) * ng + g)), 16));
        _mm512_mask_storeu_ps(mul + (m * RB + r) * ng + g, mask,
                              _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(mask, xs + m * ng + g)));
      }
  auto mult = [&](int m, int r, int64_t g) { return _mm512_set1_ps(mul[(m * RB + r) * ng + g]); };
  auto mult2 = [&](int m, int r, int64_t g0, int64_t g1) {  // lanes 0-7: group g0's multiplier, 8-15: g1's
    const float* p = mul + (m * RB + r) * ng;
    return _mm512_insertf32x8(_mm512_set1_ps(p[g0]), _mm256_set1_ps(p[g1]), 1);
  };
  for (int64_t k = 0; k < K; k += 128) {
    __m512i xl[MR], xh[MR];
    #pragma GCC unroll 16
    for (int m = 0; m < MR; m++) xl[m] = _mm512_loadu_si512(xq + m * K + k), xh[m] = _mm512_loadu_si512(xq + m * K + k + 64);
    #pragma GCC unroll 16
    for (int r = 0; r < RB; r++) {  // unpack one row's 128 nibbles, use them for every x row
      const uint8_t* wr = w + (n + r * stride) * (K / 2) + k / 2;
      prefetch(wr);
      const __m512i b = _mm512_loadu_si512(wr);
      const __m512i lo = _mm512_and_si512(b, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
      #pragma GCC unroll 16
      for (int m = 0; m < MR; m++) {
        if constexpr (G == 32) {  // lo: groups g and g + 2, hi: g + 1 and g + 3
          const int64_t g = k / 32;
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, lo, xl[m])), mult2(m, r, g, g + 2),
                                      acc[m][r]);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, hi, xh[m])),
                                      mult2(m, r, g + 1, g + 3), acc[m][r]);
        } else if constexpr (G == 64) {  // lanes 0-7: group g, 8-15: g + 1
          const int64_t g = k / 64;
          const __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, xl[m]), hi, xh[m]);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), mult2(m, r, g, g + 1), acc[m][r]);
        } else {
          part[m][r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(part[m][r], lo, xl[m]), hi, xh[m]);
          if ((k + 128) % G == 0) {  // group done: scale its integer sum into the fp32 accumulator
            acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(part[m][r]), mult(m, r, k / G), acc[m][r]);
            part[m][r] = zero;
          }
        }
      }
    }
  }
  // + sum_g min_g * xsum_g, 16 groups at a time
  #pragma GCC unroll 16
  for (int r = 0; r < RB; r++) {
    __m512 off[MR];
    #pragma GCC unroll 16
    for (int m = 0; m < MR; m++) off[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; g += 16) {
      const __mmask16 mask = ng - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (ng - g)) - 1);
      const __m512 mins = _mm512_castsi512_ps(
          _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, mn + (n + r * stride) * ng + g)), 16));
      #pragma GCC unroll 16
      for (int m = 0; m < MR; m++) off[m] = _mm512_fmadd_ps(mins, _mm512_maskz_loadu_ps(mask, xsum + m * ng + g), off[m]);
    }
    #pragma GCC unroll 16
    for (int m = 0; m < MR; m++) y[m * N + n + r * stride] = _mm512_reduce_add_ps(acc[m][r]) + _mm512_reduce_add_ps(off[m]);
  }
}

template <int MR, int G>
void int4_pass(const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w, const uint16_t* sc,
               const uint16_t* mn, float* y, int64_t K, int64_t N) {
  constexpr int RB = MR == 1 ? 8 : (MR == 2 ? 4 : 2);  // streams per thread
  for_rows(N, 16, [&](int64_t b, int64_t e) {
    const int64_t q = (e - b) / RB;
    for (int64_t i = 0; i < q; i++) int4_rows<MR, RB, G>(xq, xs, xsum, w, sc, mn, y, b + i, q, K, N);
    for (int64_t n = b + RB * q; n < e; n++) int4_rows<MR, 1, G>(xq, xs, xsum, w, sc, mn, y, n, 1, K, N);
  });
}

template <int G>
void int4_dispatch(int64_t mr, const int8_t* xq, const float* xs, const float* xsum, const uint8_t* w,
                   const uint16_t* sc, const uint16_t* mn, float* y, int64_t K, int64_t N) {
  switch (mr) {
    case 1: int4_pass<1, G>(xq, xs, xsum, w, sc, mn, y, K, N); break;
    case 2: int4_pass<2, G>(xq, xs, xsum, w, sc, mn, y, K, N); break;
    case 3: int4_pass<3, G>(xq, xs, xsum, w, sc, mn, y, K, N); break;
    default: int4_pass<4, G>(xq, xs, xsum, w, sc, mn, y, K, N);
  }
}

// Dispatch M rows of x in passes of up to kMaxRows; `pass(MR, row0)` runs one pass.
template <typename P>
void in_passes(int64_t M, const P& pass) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) pass(std::min(kMaxRows, M - m0), m0);
}

#endif  // HERD_AVX512

// Per-call buffers live in thread-local scratch and the fp32 results are converted into the caller's dtype here:
// a decode step makes ~113 kernel calls, and a tensor allocation plus an ATen dtype copy on each side of every call
// cost ~2 ms per token (4% of an int8 1B step) before this.
template <typename T>
T* scratch(std::vector<T>& buf, int64_t n) {
  if (buf.size() < static_cast<size_t>(n)) buf.resize(n);
  return buf.data();
}

// the fp32 results of this thread's current linear call (read by to_output before the next call)
float* y_scratch(int64_t n) {
  thread_local std::vector<float> buf;
  return scratch(buf, n);
}

// fp32 y (M, N) -> a new (M, N) tensor of x's dtype (bf16 rounded to nearest even, as Tensor.to does)
at::Tensor to_output(const float* y, int64_t M, int64_t N, const at::Tensor& x) {
  const int64_t n = M * N;
  if (x.scalar_type() == at::kFloat) {
    auto out = at::empty({M, N}, x.options());
    std::memcpy(out.data_ptr<float>(), y, n * sizeof(float));
    return out;
  }
  if (x.scalar_type() == at::kBFloat16) {
    auto out = at::empty({M, N}, x.options());
    auto o = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
    int64_t i = 0;
#ifdef HERD_AVX512
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256((__m256i*)(o + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(y + i)));
#endif
    for (; i < n; i++) o[i] = c10::BFloat16(y[i]);
    return out;
  }
  return at::from_blob(const_cast<float*>(y), {M, N}, x.options().dtype(at::kFloat)).to(x.scalar_type());
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(supported(), "herd CPU kernels were built without AVX-512 BF16/VNNI");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  check_x(x, K, 32);
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "w must be contiguous bf16 (N, K)");
  auto xb = x.to(at::kBFloat16).contiguous();
  float* y = y_scratch(M * N);
#ifdef HERD_AVX512
  auto xp = (const uint16_t*)xb.data_ptr();
  auto wp = (const uint16_t*)w.data_ptr();
  in_passes(M, [&](int64_t mr, int64_t m0) {
    auto xm = xp + m0 * K;
    auto ym = y + m0 * N;
    switch (mr) {
      case 1: bf16_pass<1>(xm, wp, ym, K, N); break;
      case 2: bf16_pass<2>(xm, wp, ym, K, N); break;
      case 3: bf16_pass<3>(xm, wp, ym, K, N); break;
      default: bf16_pass<4>(xm, wp, ym, K, N);
    }
  });
#endif
  return to_output(y, M, N, x);
}

#ifdef HERD_AVX512
// x rows quantized (quantize_x) in blocks of B, in thread-local scratch (valid until this thread's next call)
template <typename Q>
struct QuantRows {
  const Q* xq;        // (M, K)
  const float* xs;    // (M, K/B) scales
  const float* xsum;  // (M, K/B) block sums of the dequantized x
};

template <typename Q>
QuantRows<Q> quant_rows(const at::Tensor& x, int64_t B) {
  const int64_t M = x.size(0), K = x.size(1);
  thread_local std::vector<Q> q;
  thread_local std::vector<float> s, sum;
  Q* xq = scratch(q, M * K);
  float* xs = scratch(s, M * (K / B));
  float* xsum = scratch(sum, M * (K / B));
  auto xc = x.contiguous();
  if (xc.scalar_type() == at::kBFloat16) {
    quantize_x(reinterpret_cast<const c10::BFloat16*>(xc.data_ptr()), M, K, B, xq, xs, xsum);
  } else {
    auto xf = xc.to(at::kFloat);
    quantize_x(xf.data_ptr<float>(), M, K, B, xq, xs, xsum);
  }
  return {xq, xs, xsum};
}
#endif

at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  TORCH_CHECK(supported(), "herd CPU kernels were built without AVX-512 BF16/VNNI");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  check_x(x, K, 64);
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "w must be contiguous int8 (N, K)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N, "scales must be fp32 (N,)");
  auto sf = scales.contiguous();
  float* y = y_scratch(M * N);
#ifdef HERD_AVX512
  const QuantRows<int16_t> xr = quant_rows<int16_t>(x, kInt8Block);
  auto wp = w.data_ptr<int8_t>();
  auto sp = sf.data_ptr<float>();
  in_passes(M, [&](int64_t mr, int64_t m0) {
    auto q = xr.xq + m0 * K;
    auto s = xr.xs + m0 * (K / kInt8Block);
    auto ym = y + m0 * N;
    switch (mr) {
      case 1: int8_pass<1>(q, s, wp, sp, ym, K, N); break;
      case 2: int8_pass<2>(q, s, wp, sp, ym, K, N); break;
      case 3: int8_pass<3>(q, s, wp, sp, ym, K, N); break;
      default: int8_pass<4>(q, s, wp, sp, ym, K, N);
    }
  });
#endif
  return to_output(y, M, N, x);
}

at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins,
                       int64_t group_size) {
  TORCH_CHECK(supported(), "herd CPU kernels were built without AVX-512 BF16/VNNI");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1) * 2, G = group_size;
  check_x(x, K, 128);
  TORCH_CHECK((G == 32 || G == 64 || G == 128 || G == 256) && K % G == 0, "group size ", G,
              " must be 32, 64, 128 or 256 and divide K");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8 (N, K/2)");
  for (auto* t : {&scales, &mins})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->numel() == N * (K / G),
                "scales and mins must be contiguous bf16 (N, K/G)");
  float* y = y_scratch(M * N);
#ifdef HERD_AVX512
  const QuantRows<int8_t> xr = quant_rows<int8_t>(x, G);
  auto wp = w.data_ptr<uint8_t>();
  auto sp = (const uint16_t*)scales.data_ptr();
  auto mp = (const uint16_t*)mins.data_ptr();
  in_passes(M, [&](int64_t mr, int64_t m0) {
    auto q = xr.xq + m0 * K;
    auto s = xr.xs + m0 * (K / G);
    auto su = xr.xsum + m0 * (K / G);
    auto ym = y + m0 * N;
    switch (G) {
      case 32: int4_dispatch<32>(mr, q, s, su, wp, sp, mp, ym, K, N); break;
      case 64: int4_dispatch<64>(mr, q, s, su, wp, sp, mp, ym, K, N); break;
      case 128: int4_dispatch<128>(mr, q, s, su, wp, sp, mp, ym, K, N); break;
      default: int4_dispatch<256>(mr, q, s, su, wp, sp, mp, ym, K, N);
    }
  });
#endif
  return to_output(y, M, N, x);
}

// int4 -> bf16 (N, K) in one pass (prefill of a quantized model: dequantize, then one bf16 matmul).
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& mins, int64_t group_size) {
  TORCH_CHECK(supported(), "herd CPU kernels were built without AVX-512 BF16/VNNI");
  const int64_t N = w.size(0), K = w.size(1) * 2, G = group_size, ng = K / G;
  TORCH_CHECK(K % 64 == 0 && G % 32 == 0 && K % G == 0, "bad int4 shape: K = ", K, ", group size ", G);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous(), "w must be contiguous uint8 (N, K/2)");
  for (auto* t : {&scales, &mins})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->numel() == N * ng,
                "scales and mins must be contiguous bf16 (N, K/G)");
  auto out = at::empty({N, K}, w.options().dtype(at::kBFloat16));
#ifdef HERD_AVX512
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* sp = (const uint16_t*)scales.data_ptr();
  const uint16_t* mp = (const uint16_t*)mins.data_ptr();
  uint16_t* op = (uint16_t*)out.data_ptr();
  auto bf16 = [](uint16_t b) { return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int32_t>(b) << 16)); };
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; n++) {
      for (int64_t k = 0; k < K; k += 32) {  // 32 weights: low or high nibbles of 32 bytes
        const int64_t block = k / 64, half = (k / 32) % 2, g = k / G;
        const __m256i bytes = _mm256_loadu_si256((const __m256i*)(wp + n * (K / 2) + block * 32));
        __m512i q = _mm512_cvtepu8_epi16(bytes);
        q = half ? _mm512_srli_epi16(q, 4) : _mm512_and_si512(q, _mm512_set1_epi16(0x0F));
        const __m512 s = bf16(sp[n * ng + g]), m = bf16(mp[n * ng + g]);
        const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(q))), s, m);
        const __m512 hi =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(q, 1))), s, m);
        _mm512_storeu_si512(op + n * K + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
  });
#endif
  return out;
}

// ---- one-token attention over the KV cache -----------------------------------------------------------------

#ifdef HERD_AVX512
// e^x for x <= 0, 16 lanes: 2^(x log2 e) = 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, and 2^f from its degree-6
// minimax polynomial (a few ulp); inputs below -100 are clamped (e^-100 ~ 4e-44: a weight of zero in a softmax).
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-100.f)), _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Scores p (R, S), -inf where a slot is masked -> in place e^(score - row max), masked slots exactly 0; returns each
// row's sum (0 when no slot is allowed).
std::vector<float> softmax_rows(float* p, int64_t R, int64_t S) {
  std::vector<float> denom(R);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  for (int64_t r = 0; r < R; r++) {
    __m512 mx = neg_inf;
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 n = S - s >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (S - s)) - 1);
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(neg_inf, n, p + r * S + s));
    }
    const float top = _mm512_reduce_max_ps(mx);
    const __m512 m = _mm512_set1_ps(top == -INFINITY ? 0.f : top);
    __m512 total = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 n = S - s >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (S - s)) - 1);
      const __m512 x = _mm512_maskz_loadu_ps(n, p + r * S + s);
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, neg_inf, _CMP_NEQ_OQ), exp_nonpositive(_mm512_sub_ps(x, m)));
      _mm512_mask_storeu_ps(p + r * S + s, n, e);
      total = _mm512_add_ps(total, _mm512_maskz_mov_ps(n, e));
    }
    denom[r] = _mm512_reduce_add_ps(total);
  }
  return denom;
}

// 16 vectors -> one vector of their 16 sums (v[j]'s sum in lane j): a transposing tree of 45 instructions, about a
// third of 16 separate horizontal sums.
inline __m512 sum16(const __m512* v) {
  __m512 x[8], y[4];
  for (int i = 0; i < 8; i++)  // per 128-bit lane: v[2i] and v[2i+1] folded to pairs
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; i++)  // per 128-bit lane: the lane sums of v[4i .. 4i+3]
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44), _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  const __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(y[0], y[1], 0x88), _mm512_shuffle_f32x4(y[0], y[1], 0xDD));
  const __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(y[2], y[3], 0x88), _mm512_shuffle_f32x4(y[2], y[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

// Where slot s of one (batch row, KV head)'s keys or values lives: the kernels below read slot s at slots(s).
// A cache row (decode_attention): base + s * stride.
template <typename T>
struct RowSlots {
  const T* base;
  int64_t stride;
  const T* operator()(int64_t s) const { return base + s * stride; }
};

// A paged pool (paged_decode_attention): slot s is offset s % bs of block table[s / bs], bs = 2^shift; base points
// at the KV head in block 0. Each read also prefetches the slot HERD_PAGED_AHEAD further on (capped at the last slot,
// so only the table entries in use are read): the hardware prefetcher follows a contiguous cache's one stream per
// head but loses it at every block boundary of a pool (without this, 13-20% slower than the contiguous cache at
// 1024-4096 slots; with it within a few %, 1B shape, block size 16; 8, 16, 32 or 64 slots ahead measured alike).
#ifndef HERD_PAGED_AHEAD
#define HERD_PAGED_AHEAD 16
#endif
template <typename T>
struct PagedSlots {
  const T* base;
  const int32_t* table;
  int64_t block_stride, slot_stride, shift, last, row_bytes;
  const T* at(int64_t s) const {
    return base + table[s >> shift] * block_stride + (s & ((int64_t{1} << shift) - 1)) * slot_stride;
  }
  const T* operator()(int64_t s) const {
    const char* ahead = reinterpret_cast<const char*>(at(std::min<int64_t>(s + HERD_PAGED_AHEAD, last)));
    for (int64_t i = 0; i < row_bytes; i += 64) _mm_prefetch(ahead + i, _MM_HINT_T0);
    return at(s);
  }
};

// One (batch row, KV head): its R query heads against the S cache slots whose mask is set, in fp32. Scores are
// taken 16 slots at a time and summed across lanes together (sum16); masked slots score -inf and are skipped when
// weighting v, so whatever an unused cache slot holds never reaches the output.
template <typename T, typename Slots>
void attend_kv_head(const T* q, Slots k, Slots v, const bool* mask, int64_t mask_stride, T* out,
                    int64_t R, int64_t S, int64_t D, float scale) {
  thread_local std::vector<float> qf_buf, p_buf, acc_buf;
  float* qf = scratch(qf_buf, R * D);
  float* p = scratch(p_buf, R * S);
  float* acc = scratch(acc_buf, R * D);
  for (int64_t i = 0; i < R * D; i++) qf[i] = static_cast<float>(q[i]) * scale;
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  __m512 part[16];
  for (int64_t s0 = 0; s0 < S; s0 += 16) {  // scores q . k_s, 16 slots at a time
    const int64_t n = std::min<int64_t>(16, S - s0);
    __mmask16 live = 0;
    const T* ks[16];
    for (int64_t j = 0; j < n; j++)
      if (!mask || mask[(s0 + j) * mask_stride]) live |= (__mmask16)(1u << j), ks[j] = k(s0 + j);
    for (int64_t r = 0; r < R; r++) {
      for (int64_t j = 0; j < 16; j++) {
        __m512 a = _mm512_setzero_ps();
        if (live >> j & 1) {
          for (int64_t d = 0; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + r * D + d), load16(ks[j] + d), a);
        }
        part[j] = a;
      }
      const __m512 sc = _mm512_mask_blend_ps(live, neg_inf, sum16(part));
      _mm512_mask_storeu_ps(p + r * S + s0, (__mmask16)((1u << n) - 1), sc);
    }
  }
  const std::vector<float> denom = softmax_rows(p, R, S);
  std::fill(acc, acc + R * D, 0.f);
  for (int64_t s = 0; s < S; s++) {  // softmax weights times v_s
    if (mask && !mask[s * mask_stride]) continue;
    const T* vs = v(s);
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 vv = load16(vs + d);
      for (int64_t r = 0; r < R; r++)
        _mm512_storeu_ps(acc + r * D + d, _mm512_fmadd_ps(_mm512_set1_ps(p[r * S + s]), vv, _mm512_loadu_ps(acc + r * D + d)));
    }
  }
  for (int64_t r = 0; r < R; r++) {
    const float inv = denom[r] > 0.f ? 1.f / denom[r] : 0.f;  // no slot allowed: zeros
    for (int64_t d = 0; d < D; d++) out[r * D + d] = static_cast<T>(acc[r * D + d] * inv);
  }
}

// The bf16 form for the head sizes Llama uses (D = 32 * NC: 64 or 128): scores by `vdpbf16ps` on the raw bf16 q
// and k (exact products, fp32 sums, the scale applied after), each k row loaded once for all R query heads (tiles
// of 16 / R slots x R heads when R divides 16); the weighted sum of v with its accumulators in registers.
// ~2-3x the generic form above at 1B/8B shapes (it converted every k and v element to fp32 once per query head).
template <int NC, typename Slots>
void attend_kv_head_bf16(const c10::BFloat16* q, Slots k, Slots v, const bool* mask, int64_t mask_stride,
                         c10::BFloat16* out, int64_t R, int64_t S, float scale) {
  constexpr int64_t D = 32 * NC, ND = D / 16;
  thread_local std::vector<float> p_buf;
  float* p = scratch(p_buf, R * S);
  auto live = [&](int64_t s) { return s < S && (!mask || mask[s * mask_stride]); };
  const int64_t rb = 16 % R == 0 ? R : 1, js = 16 / rb;  // a tile: js slots x rb query heads = 16 sums
  __m512 part[16];
  alignas(64) float sums[16];
  for (int64_t r0 = 0; r0 < R; r0 += rb) {
    for (int64_t s0 = 0; s0 < S; s0 += js) {
      for (int64_t j = 0; j < js; j++) {
        __m512bh kv[NC];
        const bool on = live(s0 + j);
        #pragma GCC unroll 4
        for (int c = 0; c < NC; c++)
          kv[c] = on ? (__m512bh)_mm512_loadu_si512(k(s0 + j) + 32 * c) : (__m512bh)_mm512_setzero_si512();
        for (int64_t rr = 0; rr < rb; rr++) {
          __m512 a = _mm512_setzero_ps();
          #pragma GCC unroll 4
          for (int c = 0; c < NC; c++)
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + (r0 + rr) * D + 32 * c), kv[c]);
          part[rr * js + j] = a;
        }
      }
      _mm512_store_ps(sums, _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale)));
      for (int64_t rr = 0; rr < rb; rr++)
        for (int64_t j = 0; j < js && s0 + j < S; j++)
          p[(r0 + rr) * S + s0 + j] = live(s0 + j) ? sums[rr * js + j] : -INFINITY;
    }
  }
  const std::vector<float> denom = softmax_rows(p, R, S);
  constexpr int64_t RB = 16 / ND > 0 ? 16 / ND : 1;  // query heads per pass over v: RB x ND accumulators
  for (int64_t r0 = 0; r0 < R; r0 += RB) {
    const int64_t rn = std::min(RB, R - r0);
    __m512 acc[RB][ND];
    #pragma GCC unroll 16
    for (int64_t rr = 0; rr < RB; rr++)
      #pragma GCC unroll 16
      for (int64_t c = 0; c < ND; c++) acc[rr][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s++) {
      if (mask && !mask[s * mask_stride]) continue;  // never read an unused slot (it may hold anything)
      const c10::BFloat16* vs = v(s);
      __m512 vv[ND];
      #pragma GCC unroll 16
      for (int64_t c = 0; c < ND; c++) vv[c] = load16(vs + 16 * c);
      #pragma GCC unroll 16
      for (int64_t rr = 0; rr < RB; rr++) {
        if (rr >= rn) break;
        const __m512 e = _mm512_set1_ps(p[(r0 + rr) * S + s]);
        #pragma GCC unroll 16
        for (int64_t c = 0; c < ND; c++) acc[rr][c] = _mm512_fmadd_ps(e, vv[c], acc[rr][c]);
      }
    }
    for (int64_t rr = 0; rr < rn; rr++) {
      const float d = denom[r0 + rr];
      const __m512 inv = _mm512_set1_ps(d > 0.f ? 1.f / d : 0.f);  // no slot allowed: zeros
      for (int64_t c = 0; c < ND; c++)
        _mm256_storeu_si256((__m256i*)(out + (r0 + rr) * D + 16 * c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[rr][c], inv)));
    }
  }
}

// One (batch row, KV head) by the form that fits: bf16 at D = 64 or 128, else the generic one.
template <typename T, typename Slots>
void attend(const T* q, Slots k, Slots v, const bool* mask, int64_t mask_stride, T* out, int64_t R,
            int64_t S, int64_t D, float scale) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (D == 64) return attend_kv_head_bf16<2>(q, k, v, mask, mask_stride, out, R, S, scale);
    if (D == 128) return attend_kv_head_bf16<4>(q, k, v, mask, mask_stride, out, R, S, scale);
  }
  attend_kv_head<T>(q, k, v, mask, mask_stride, out, R, S, D, scale);
}

// fn(tag, b, h) for every (batch row b, KV head h), split across torch's threads; tag is a null T*, T = dtype's type.
template <typename F>
void each_kv_head(at::ScalarType dtype, int64_t B, int64_t KVH, const F& fn) {
  auto run = [&](auto* tag) {
    at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i++) fn(tag, i / KVH, i % KVH);
    });
  };
  if (dtype == at::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<c10::BFloat16*>(nullptr));
}
#endif

void check_attention_dtypes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              "q, k, v must share one dtype, bf16 or fp32");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "herd CPU kernels take CPU tensors");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v need unit stride along D");
}

// q (B, H, 1, D); k, v (>= B, KVH, S, D) with unit stride along D (cache views); mask None or bool, broadcastable
// to (B, 1, 1, S) -> (B, H, 1, D). Query head h reads KV head h / (H / KVH), Meta's grouping; scale 1/sqrt(D).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(supported(), "herd CPU kernels were built without AVX-512 BF16/VNNI");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes(),
              "decode_attention takes q (B, H, 1, D) and k, v (B, KVH, S, D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), KVH = k.size(1), S = k.size(2);
  TORCH_CHECK(KVH > 0 && D > 0 && k.size(0) >= B && k.size(3) == D && H % KVH == 0 && D % 16 == 0,
              "bad shapes for decode_attention");
  check_attention_dtypes(q, k, v);
  auto qc = q.contiguous();
  auto out = at::empty({B, H, 1, D}, q.options());
  at::Tensor m;
  int64_t mb = 0, ms = 0;
  if (mask.has_value()) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && m.size(1) == 1 && m.size(2) == 1 &&
                    (m.size(0) == B || m.size(0) == 1) && m.size(3) == S,
                "mask must be bool, broadcastable to (B, 1, 1, S)");
    mb = m.size(0) == 1 ? 0 : m.stride(0);
    ms = m.stride(3);
  }
  const int64_t R = H / KVH;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
#ifdef HERD_AVX512
  each_kv_head(q.scalar_type(), B, KVH, [&](auto* tag, int64_t b, int64_t h) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const RowSlots<T> ks{k.data_ptr<T>() + b * k.stride(0) + h * k.stride(1), k.stride(2)};
    const RowSlots<T> vs{v.data_ptr<T>() + b * v.stride(0) + h * v.stride(1), v.stride(2)};
    const int64_t o = (b * H + h * R) * D;
    attend(qc.data_ptr<T>() + o, ks, vs, m.defined() ? m.data_ptr<bool>() + b * mb : nullptr, ms,
           out.data_ptr<T>() + o, R, S, D, scale);
  });
#endif
  return out;
}

// q (B, H, 1, D); k_pool, v_pool (num_blocks, KVH, block_size, D) with unit stride along D, block_size a power of
// two; block_table (B, max_blocks) and seq_lens (B,) int32 -> (B, H, 1, D). Row b attends to its positions
// 0 .. seq_lens[b] - 1 (none: zeros), position p at offset p % block_size of block block_table[b, p / block_size];
// grouping and scale as decode_attention. Only the table entries a row needs are read (and checked), and only the
// pool slots they list up to its length.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                                  const at::Tensor& block_table, const at::Tensor& seq_lens) {
  TORCH_CHECK(supported(), "herd CPU kernels were built without AVX-512 BF16/VNNI");
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes(),
              "paged_decode_attention takes q (B, H, 1, D) and k_pool, v_pool (num_blocks, KVH, block_size, D)");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), NB = k_pool.size(0), KVH = k_pool.size(1),
                BS = k_pool.size(2);
  TORCH_CHECK(KVH > 0 && D > 0 && k_pool.size(3) == D && H % KVH == 0 && D % 16 == 0,
              "bad shapes for paged_decode_attention");
  TORCH_CHECK(BS > 0 && (BS & (BS - 1)) == 0, "block_size must be a power of two, got ", BS);
  check_attention_dtypes(q, k_pool, v_pool);
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == B &&
                  block_table.device().is_cpu(),
              "block_table must be an int32 CPU tensor (B, max_blocks)");
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == B &&
                  seq_lens.device().is_cpu(),
              "seq_lens must be an int32 CPU tensor (B,)");
  auto table = block_table.contiguous(), lens = seq_lens.contiguous();
  const int32_t* tp = table.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  const int64_t MB = table.size(1);
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= MB * BS, "seq_lens[", b, "] = ", lp[b], " is outside [0, max_blocks * ",
                "block_size] = [0, ", MB * BS, "]");
    for (int64_t j = 0; j < (lp[b] + BS - 1) / BS; j++)
      TORCH_CHECK(tp[b * MB + j] >= 0 && tp[b * MB + j] < NB, "block_table[", b, ", ", j, "] = ", tp[b * MB + j],
                  " is not a block id in [0, ", NB, ")");
  }
  auto qc = q.contiguous();
  auto out = at::empty({B, H, 1, D}, q.options());
  const int64_t R = H / KVH;
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t shift = __builtin_ctzll(static_cast<uint64_t>(BS));
#ifdef HERD_AVX512
  each_kv_head(q.scalar_type(), B, KVH, [&](auto* tag, int64_t b, int64_t h) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int64_t S = lp[b], row = D * static_cast<int64_t>(sizeof(T));
    const PagedSlots<T> ks{k_pool.data_ptr<T>() + h * k_pool.stride(1), tp + b * MB, k_pool.stride(0),
                           k_pool.stride(2), shift, S - 1, row};
    const PagedSlots<T> vs{v_pool.data_ptr<T>() + h * v_pool.stride(1), tp + b * MB, v_pool.stride(0),
                           v_pool.stride(2), shift, S - 1, row};
    const int64_t o = (b * H + h * R) * D;
    attend(qc.data_ptr<T>() + o, ks, vs, nullptr, 0, out.data_ptr<T>() + o, R, S, D, scale);
  });
#endif
  return out;
}

// Read bandwidth probe for the benchmark: sums a buffer as int32 lanes with four independent streams per thread.
int64_t read_sum(const at::Tensor& buf) {
  const int64_t n = buf.numel() * buf.element_size() / 4;
  const int32_t* p = (const int32_t*)buf.data_ptr();
  std::vector<int64_t> parts(at::get_num_threads() + 1, 0);
  const int64_t quarter = n / 4;
  at::parallel_for(0, quarter, 1 << 14, [&](int64_t b, int64_t e) {
    int64_t s = 0;
#ifdef HERD_AVX512
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = b;
    for (; i + 16 <= e; i += 16) {
      a0 = _mm512_add_epi32(a0, _mm512_loadu_si512(p + i));
      a1 = _mm512_add_epi32(a1, _mm512_loadu_si512(p + quarter + i));
      a2 = _mm512_add_epi32(a2, _mm512_loadu_si512(p + 2 * quarter + i));
      a3 = _mm512_add_epi32(a3, _mm512_loadu_si512(p + 3 * quarter + i));
    }
    s = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
    b = i;
#endif
    for (int64_t i = b; i < e; i++) s += p[i] + p[quarter + i] + p[2 * quarter + i] + p[3 * quarter + i];
    parts[at::get_thread_num()] += s;
  });
  int64_t total = 0;
  for (auto v : parts) total += v;
  return total;
}

}  // namespace

TORCH_LIBRARY(herd, m) {
  m.def("linear_bf16(Tensor x, Tensor w) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("linear_int4(Tensor x, Tensor w, Tensor scales, Tensor mins, int group_size) -> Tensor");
  m.def("dequantize_int4(Tensor w, Tensor scales, Tensor mins, int group_size) -> Tensor");
  m.def("read_sum(Tensor buf) -> int");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
  m.def("paged_decode_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor block_table, Tensor seq_lens) -> Tensor");
}

TORCH_LIBRARY_IMPL(herd, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_int4", &linear_int4);
  m.impl("dequantize_int4", &dequantize_int4);
  m.impl("read_sum", &read_sum);
  m.impl("decode_attention", &decode_attention);
  m.impl("paged_decode_attention", &paged_decode_attention);
}
