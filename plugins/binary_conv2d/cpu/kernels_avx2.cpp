// AVX2 path: popcount by the nibble lookup table (two PSHUFB per 256 bits), counts kept in bytes
// and folded into 64-bit lanes with PSADBW every 31 steps (31 x 8 < 256). Same tiling idea as
// the AVX-512 path with 4 columns per vector and 4 output channels per tile (16 registers).
#include "binary_conv2d_cpu.h"

#if defined(TOD_BCONV_X86)

#include <immintrin.h>

#include <algorithm>

#define TOD_AVX2 __attribute__((target("avx2")))

namespace tod {
namespace bconv {
namespace {

TOD_AVX2 inline __m256i popcount_bytes(__m256i v, __m256i lut, __m256i low) {
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

template <int kZeroSign>
TOD_AVX2 void pack_block_impl(const Problem& p, int64_t n, int64_t c0, int nch, int64_t y, int64_t rows, uint64_t* sign_out,
                              uint64_t* nz_out) {
  const Geometry& g = p.g;
  const int64_t w = g.w * rows;  // rows y .. y + rows - 1 of a channel are one contiguous span
  const int64_t plane = g.h * g.w;
  const float* base = p.x + ((n * g.c + c0) * g.h + y) * g.w;
  const uint64_t valid = valid_bits(nch, 0);
  for (int64_t x = 0; x < w; x += 4) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sign_out + x), _mm256_setzero_si256());
    if (nz_out) {
      const __m256i init = kZeroSign == 0 ? _mm256_setzero_si256() : _mm256_set1_epi64x(static_cast<long long>(valid));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(nz_out + x), init);
    }
  }
  const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int c = 0; c < nch; ++c) {
    const float* row = base + c * plane;
    const float* ahead = c + 2 < nch ? row + 2 * plane : nullptr;  // see the AVX-512 path
    const __m256 thr = _mm256_set1_ps(p.threshold[c0 + c]);
    const __m256i bit = _mm256_set1_epi64x(static_cast<long long>(uint64_t(1) << c));
    for (int64_t x = 0; x < w; x += 8) {
      if (ahead && (x & 15) == 0) _mm_prefetch(reinterpret_cast<const char*>(ahead + x), _MM_HINT_T0);
      const int64_t left = w - x;
      __m256 v;
      if (left >= 8) {
        v = _mm256_loadu_ps(row + x);
      } else {
        const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)), lane_index);
        v = _mm256_maskload_ps(row + x, keep);
      }
      const __m256 ks = kZeroSign > 0 ? _mm256_cmp_ps(v, thr, _CMP_NLT_UQ) : _mm256_cmp_ps(v, thr, _CMP_GT_OQ);
      const __m256i ki = _mm256_castps_si256(ks);
      // widen the 8 x 32-bit compare masks to two 4 x 64-bit masks
      const __m256i k0 = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(ki));
      const __m256i k1 = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(ki, 1));
      __m256i* out = reinterpret_cast<__m256i*>(sign_out + x);
      _mm256_storeu_si256(out, _mm256_or_si256(_mm256_loadu_si256(out), _mm256_and_si256(k0, bit)));
      _mm256_storeu_si256(out + 1, _mm256_or_si256(_mm256_loadu_si256(out + 1), _mm256_and_si256(k1, bit)));
      if (kZeroSign == 0 && nz_out) {
        const __m256i kz = _mm256_castps_si256(_mm256_cmp_ps(v, thr, _CMP_NEQ_OQ));
        const __m256i z0 = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(kz));
        const __m256i z1 = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(kz, 1));
        __m256i* zout = reinterpret_cast<__m256i*>(nz_out + x);
        _mm256_storeu_si256(zout, _mm256_or_si256(_mm256_loadu_si256(zout), _mm256_and_si256(z0, bit)));
        _mm256_storeu_si256(zout + 1, _mm256_or_si256(_mm256_loadu_si256(zout + 1), _mm256_and_si256(z1, bit)));
      }
    }
  }
}

// The words of one tap for every column vector and output channel of a tile, in byte counters that
// are flushed into the 64-bit ones every kFlushEvery steps: acc += popc(s ^ w), or with kMaskTap
// acc += popc((s ^ w) & n) and cnt += popc(n).
template <int V, int O, bool kMaskTap>
TOD_AVX2 __attribute__((always_inline)) inline void accumulate_tap(__m256i (&acc8)[V][O], __m256i (&acc)[V][O], __m256i (&cnt8)[V],
                                                                   __m256i (&cnt)[V], int& steps, const uint64_t* sgn,
                                                                   const uint64_t* nzp, int64_t idx, int64_t jstep,
                                                                   int64_t words, const uint64_t* wtap, int64_t ostride,
                                                                   __m256i lut, __m256i low) {
  constexpr int kFlushEvery = 31;  // byte counters grow by <= 8 per step
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t j = 0; j < words; ++j, idx += jstep) {
    __m256i sv[V];
    __m256i mv[V] = {};
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      sv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sgn + idx + 4 * v));
      if constexpr (kMaskTap) {
        mv[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nzp + idx + 4 * v));
        cnt8[v] = _mm256_add_epi8(cnt8[v], popcount_bytes(mv[v], lut, low));
      }
    }
#pragma GCC unroll 4
    for (int o = 0; o < O; ++o) {
      const __m256i wv = _mm256_set1_epi64x(static_cast<long long>(wtap[o * ostride + j]));
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        __m256i d = _mm256_xor_si256(sv[v], wv);
        if constexpr (kMaskTap) d = _mm256_and_si256(d, mv[v]);
        acc8[v][o] = _mm256_add_epi8(acc8[v][o], popcount_bytes(d, lut, low));
      }
    }
    if (++steps == kFlushEvery) {
      steps = 0;
      for (int v = 0; v < V; ++v) {
        cnt[v] = _mm256_add_epi64(cnt[v], _mm256_sad_epu8(cnt8[v], zero));
        cnt8[v] = zero;
        for (int o = 0; o < O; ++o) {
          acc[v][o] = _mm256_add_epi64(acc[v][o], _mm256_sad_epu8(acc8[v][o], zero));
          acc8[v][o] = zero;
        }
      }
    }
  }
}

// One tile: output columns [x0, x0 + 4V) x output channels [o0, o0 + 4) of group grp, row y.
// A masked tile reads the nonzero plane only for the taps that may read a 0 (see the AVX-512 path).
template <int V, bool kMasked>
TOD_AVX2 void tile(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y, int64_t x0) {
  constexpr int O = 4;
  const Geometry& g = p.g;
  const ActLayout& a = p.a;
  const int64_t image = n * a.image_words();
  const uint64_t* sgn = p.sign + image;
  const uint64_t* nzp = kMasked ? p.nonzero + image : nullptr;
  const uint64_t* wt = p.weights + weight_index(g, grp, o0, 0, 0);
  const int64_t ostride = g.taps * g.words;
  const int64_t jstep = a.word_step();
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2,
                                       3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();

  __m256i acc8[V][O], acc[V][O], cnt8[V], cnt[V];
  for (int v = 0; v < V; ++v) {
    cnt8[v] = cnt[v] = zero;
    for (int o = 0; o < O; ++o) acc8[v][o] = acc[v][o] = zero;
  }
  int steps = 0;
  int64_t whole_taps = 0;  // taps of a masked tile that read no 0: each counts g.cg channels
  for (int64_t kx = 0; kx < g.kw; ++kx) {
    const int64_t col = a.column(x0 * g.sw + kx * g.dw);
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const uint64_t* wtap = wt + (ky * g.kw + kx) * g.words;
      const int64_t idx = a.row_base(y * g.sh + ky * g.dh, grp * g.words) + col;
      if (kMasked && tap_may_read_zero(p, y, x0, std::min<int64_t>(x0 + 4 * V, g.wo) - 1, ky, kx)) {
        accumulate_tap<V, O, true>(acc8, acc, cnt8, cnt, steps, sgn, nzp, idx, jstep, g.words, wtap, ostride, lut, low);
      } else {
        accumulate_tap<V, O, false>(acc8, acc, cnt8, cnt, steps, sgn, nzp, idx, jstep, g.words, wtap, ostride, lut, low);
        ++whole_taps;
      }
    }
  }
  if constexpr (kMasked) {
    for (int v = 0; v < V; ++v) cnt[v] = _mm256_add_epi64(cnt[v], _mm256_set1_epi64x(whole_taps * g.cg));
  }
  for (int v = 0; v < V; ++v) {
    cnt[v] = _mm256_add_epi64(cnt[v], _mm256_sad_epu8(cnt8[v], zero));
    for (int o = 0; o < O; ++o) acc[v][o] = _mm256_add_epi64(acc[v][o], _mm256_sad_epu8(acc8[v][o], zero));
  }

  const int64_t o_count = std::min<int64_t>(O, g.cog - o0);
  const __m256i full = _mm256_set1_epi64x(g.taps * g.cg);
  const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  for (int o = 0; o < o_count; ++o) {
    const int64_t og = grp * g.cog + o0 + o;
    const __m128 alpha = _mm_set1_ps(p.alpha[og]);
    const __m128 bias = _mm_set1_ps(p.bias ? p.bias[og] : 0.0f);
    const int64_t row = ((n * g.cout + og) * g.ho + y) * g.wo;
    for (int v = 0; v < V; ++v) {
      const int64_t xs = x0 + 4 * v;
      if (xs >= g.wo) break;
      const int64_t left = g.wo - xs;
      const __m256i s64 = _mm256_sub_epi64(kMasked ? cnt[v] : full, _mm256_slli_epi64(acc[v][o], 1));
      const __m128i s32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(s64, low_dwords));
      const __m128 f = _mm_add_ps(_mm_mul_ps(_mm_cvtepi32_ps(s32), alpha), bias);
      if (left >= 4) {
        _mm_storeu_ps(p.out + row + xs, f);
        if (p.sums) _mm_storeu_si128(reinterpret_cast<__m128i*>(p.sums + row + xs), s32);
      } else {
        const __m128i keep = _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(left)), _mm_setr_epi32(0, 1, 2, 3));
        _mm_maskstore_ps(p.out + row + xs, keep, f);
        if (p.sums) _mm_maskstore_epi32(p.sums + row + xs, keep, s32);
      }
    }
  }
}

}  // namespace

TOD_AVX2 void pack_block_avx2(const Problem& p, int64_t n, int64_t c0, int nch, int64_t y, int64_t rows, uint64_t* sign_out,
                              uint64_t* nz_out) {
  if (p.g.zero_sign > 0) {
    pack_block_impl<1>(p, n, c0, nch, y, rows, sign_out, nz_out);
  } else if (p.g.zero_sign < 0) {
    pack_block_impl<-1>(p, n, c0, nch, y, rows, sign_out, nz_out);
  } else {
    pack_block_impl<0>(p, n, c0, nch, y, rows, sign_out, nz_out);
  }
}

TOD_AVX2 void compute_row_avx2(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y) {
  constexpr int kFast = 2;    // 8 columns x 4 channels of byte counters
  constexpr int kMasked = 1;  // plus the nonzero plane and its counters
  const Geometry& g = p.g;
  const bool row_pad = touches_padding(y, y, g.sh, g.dh, g.kh, g.pt, g.h);
  for (int64_t half = o0; half < o0 + 8 && half < g.cog; half += 4) {
    for (int64_t x0 = 0; x0 < g.wo;) {
      const int64_t x1 = std::min<int64_t>(x0 + 4 * kFast, g.wo) - 1;
      if (!tile_masked(p, row_pad, x0, x1)) {
        tile<kFast, false>(p, n, grp, half, y, x0);
        x0 += 4 * kFast;
      } else {
        tile<kMasked, true>(p, n, grp, half, y, x0);
        x0 += 4 * kMasked;
      }
    }
  }
}

TOD_AVX2 void finish_row_avx2(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y) {
  finish_row_body(p, n, grp, o0, y);
}

}  // namespace bconv
}  // namespace tod

#endif  // TOD_BCONV_X86
