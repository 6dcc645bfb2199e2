// AVX-512 path (F, BW, VL, DQ, VPOPCNTDQ): 64-bit popcount per lane in one instruction.
//
// Lanes are 8 consecutive output columns (the phase-split activation layout makes their input
// words consecutive for any stride/dilation); a tile holds V vectors of columns x 8 output
// channels of int64 accumulators in registers, so each activation load is reused 8 times and
// each weight broadcast V times. Output stores are then contiguous along x (NCHW).
#include "binary_conv2d_cpu.h"

#if defined(TOD_BCONV_X86)

#include <immintrin.h>

#include <algorithm>

#define TOD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq")))

namespace tod {
namespace bconv {
namespace {

template <int kZeroSign>
TOD_AVX512 void pack_block_impl(const Problem& p, int64_t n, int64_t c0, int nch, int64_t y, int64_t rows, uint64_t* sign_out,
                                uint64_t* nz_out) {
  const Geometry& g = p.g;
  const int64_t w = g.w * rows;  // rows y .. y + rows - 1 of a channel are one contiguous span
  const int64_t plane = g.h * g.w;
  const float* base = p.x + ((n * g.c + c0) * g.h + y) * g.w;
  const uint64_t valid = valid_bits(nch, 0);
  // Outputs have >= 32 words of slack past w, so whole 16-column chunks may be stored.
  for (int64_t x = 0; x < w; x += 8) {
    _mm512_storeu_si512(sign_out + x, _mm512_setzero_si512());
    if (nz_out) _mm512_storeu_si512(nz_out + x, kZeroSign == 0 ? _mm512_setzero_si512() : _mm512_set1_epi64(valid));
  }
  for (int c = 0; c < nch; ++c) {
    const float* row = base + c * plane;
    // Channel rows are a plane apart: the hardware prefetcher restarts on each, so fetch the
    // row after next ahead of time (packing is otherwise bound by those restarts).
    const float* ahead = c + 2 < nch ? row + 2 * plane : nullptr;
    const __m512 thr = _mm512_set1_ps(p.threshold[c0 + c]);
    const __m512i bit = _mm512_set1_epi64(static_cast<long long>(uint64_t(1) << c));
    for (int64_t x = 0; x < w; x += 16) {
      if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + x), _MM_HINT_T0);
      const int64_t left = w - x;
      const __mmask16 lanes = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(lanes, row + x);
      // +1 where x > t, and where x == t (or NaN) if zero_sign is +1: "not less than", unordered.
      const __mmask16 ks = kZeroSign > 0 ? _mm512_cmp_ps_mask(v, thr, _CMP_NLT_UQ) : _mm512_cmp_ps_mask(v, thr, _CMP_GT_OQ);
      __m512i a = _mm512_loadu_si512(sign_out + x);
      __m512i b = _mm512_loadu_si512(sign_out + x + 8);
      a = _mm512_mask_or_epi64(a, __mmask8(ks), a, bit);
      b = _mm512_mask_or_epi64(b, __mmask8(ks >> 8), b, bit);
      _mm512_storeu_si512(sign_out + x, a);
      _mm512_storeu_si512(sign_out + x + 8, b);
      if (kZeroSign == 0 && nz_out) {
        const __mmask16 kz = _mm512_cmp_ps_mask(v, thr, _CMP_NEQ_OQ);
        __m512i za = _mm512_loadu_si512(nz_out + x);
        __m512i zb = _mm512_loadu_si512(nz_out + x + 8);
        za = _mm512_mask_or_epi64(za, __mmask8(kz), za, bit);
        zb = _mm512_mask_or_epi64(zb, __mmask8(kz >> 8), zb, bit);
        _mm512_storeu_si512(nz_out + x, za);
        _mm512_storeu_si512(nz_out + x + 8, zb);
      }
    }
  }
}

// The words of one tap for every column vector and output channel of a tile: acc += popc(s ^ w), or
// with kMaskTap acc += popc((s ^ w) & n) and cnt += popc(n).
template <int V, bool kMaskTap>
TOD_AVX512 __attribute__((always_inline)) inline void accumulate_tap(__m512i (&acc)[V][8], __m512i (&cnt)[V], const uint64_t* sgn,
                                                                     const uint64_t* nzp, int64_t idx, int64_t jstep,
                                                                     int64_t words, const uint64_t* wtap, int64_t ostride) {
  for (int64_t j = 0; j < words; ++j, idx += jstep) {
    __m512i sv[V];
    __m512i mv[V] = {};
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      sv[v] = _mm512_loadu_si512(sgn + idx + 8 * v);
      if constexpr (kMaskTap) {
        mv[v] = _mm512_loadu_si512(nzp + idx + 8 * v);
        cnt[v] = _mm512_add_epi64(cnt[v], _mm512_popcnt_epi64(mv[v]));
      }
    }
#pragma GCC unroll 8
    for (int o = 0; o < 8; ++o) {
      const __m512i wv = _mm512_set1_epi64(static_cast<long long>(wtap[o * ostride + j]));
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) {
        __m512i d;
        if constexpr (kMaskTap) {
          // (sign ^ weight) & nonzero as one ternary-logic op: 0xF0 ^ 0xCC = 0x3C, & 0xAA = 0x28.
          d = _mm512_ternarylogic_epi64(sv[v], wv, mv[v], 0x28);
        } else {
          d = _mm512_xor_si512(sv[v], wv);
        }
        acc[v][o] = _mm512_add_epi64(acc[v][o], _mm512_popcnt_epi64(d));
      }
    }
  }
}

// One tile: output columns [x0, x0 + 8V) x output channels [o0, o0 + 8) of group grp, row y.
// A masked tile (some tap may read a 0) reads the nonzero plane only for the taps that can: with no
// zeros in the input, those are the taps that reach into zero padding, 3 of 9 on an edge of a 3x3
// conv; every other tap counts all its channels, as in an unmasked tile.
template <int V, bool kMasked>
TOD_AVX512 void tile(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y, int64_t x0) {
  const Geometry& g = p.g;
  const ActLayout& a = p.a;
  const int64_t image = n * a.image_words();
  const uint64_t* sgn = p.sign + image;
  const uint64_t* nzp = kMasked ? p.nonzero + image : nullptr;
  const uint64_t* wt = p.weights + weight_index(g, grp, o0, 0, 0);
  const int64_t ostride = g.taps * g.words;
  const int64_t jstep = a.word_step();
  const int64_t x1 = std::min<int64_t>(x0 + 8 * V, g.wo) - 1;  // last column stored

  __m512i acc[V][8];
  __m512i cnt[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) {
    cnt[v] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int o = 0; o < 8; ++o) acc[v][o] = _mm512_setzero_si512();
  }
  int64_t whole_taps = 0;  // taps of a masked tile that read no 0: each counts g.cg channels
  for (int64_t kx = 0; kx < g.kw; ++kx) {
    const int64_t col = a.column(x0 * g.sw + kx * g.dw);
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const uint64_t* wtap = wt + (ky * g.kw + kx) * g.words;
      const int64_t idx = a.row_base(y * g.sh + ky * g.dh, grp * g.words) + col;
      if (kMasked && tap_may_read_zero(p, y, x0, x1, ky, kx)) {
        accumulate_tap<V, true>(acc, cnt, sgn, nzp, idx, jstep, g.words, wtap, ostride);
      } else {
        accumulate_tap<V, false>(acc, cnt, sgn, nzp, idx, jstep, g.words, wtap, ostride);
        ++whole_taps;
      }
    }
  }
  if constexpr (kMasked) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) cnt[v] = _mm512_add_epi64(cnt[v], _mm512_set1_epi64(whole_taps * g.cg));
  }

  const int64_t o_count = std::min<int64_t>(8, g.cog - o0);
  const __m512i full = _mm512_set1_epi64(g.taps * g.cg);
#pragma GCC unroll 8
  for (int o = 0; o < 8; ++o) {
    if (o >= o_count) break;
    const int64_t og = grp * g.cog + o0 + o;
    const __m256 alpha = _mm256_set1_ps(p.alpha[og]);
    const __m256 bias = _mm256_set1_ps(p.bias ? p.bias[og] : 0.0f);
    const int64_t row = ((n * g.cout + og) * g.ho + y) * g.wo;
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      const int64_t xs = x0 + 8 * v;
      if (xs >= g.wo) break;
      const int64_t left = g.wo - xs;
      const __mmask8 lanes = left >= 8 ? __mmask8(0xFF) : __mmask8((1u << left) - 1);
      // acc + acc and the zero-masked narrowing: GCC 12's plain forms seed an "undefined" register
      // that -Wmaybe-uninitialized reports; these compile to the same instructions.
      const __m512i s64 = _mm512_sub_epi64(kMasked ? cnt[v] : full, _mm512_add_epi64(acc[v][o], acc[v][o]));
      const __m256i s32 = _mm512_maskz_cvtepi64_epi32(0xFF, s64);
      // Two roundings, as the reference: the build uses -ffp-contract=off so this is no FMA.
      const __m256 f = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s32), alpha), bias);
      _mm256_mask_storeu_ps(p.out + row + xs, lanes, f);
      if (p.sums) _mm256_mask_storeu_epi32(p.sums + row + xs, lanes, s32);
    }
  }
}

}  // namespace

TOD_AVX512 void pack_block_avx512(const Problem& p, int64_t n, int64_t c0, int nch, int64_t y, int64_t rows, uint64_t* sign_out,
                                  uint64_t* nz_out) {
  if (p.g.zero_sign > 0) {
    pack_block_impl<1>(p, n, c0, nch, y, rows, sign_out, nz_out);
  } else if (p.g.zero_sign < 0) {
    pack_block_impl<-1>(p, n, c0, nch, y, rows, sign_out, nz_out);
  } else {
    pack_block_impl<0>(p, n, c0, nch, y, rows, sign_out, nz_out);
  }
}

TOD_AVX512 void compute_row_avx512(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y) {
  // Up to 3 column vectors x 8 channels = 24 accumulators of 32 registers; the nonzero plane
  // needs more registers, so masked tiles take at most 2. Narrow remainders take fewer vectors
  // so that a 25-column output does not pay for 48.
  const Geometry& g = p.g;
  const bool row_pad = touches_padding(y, y, g.sh, g.dh, g.kh, g.pt, g.h);
  for (int64_t x0 = 0; x0 < g.wo;) {
    const int64_t left = g.wo - x0;
    const int64_t x1 = std::min<int64_t>(x0 + 24, g.wo) - 1;
    if (!tile_masked(p, row_pad, x0, x1)) {
      if (left > 16) {
        tile<3, false>(p, n, grp, o0, y, x0);
      } else if (left > 8) {
        tile<2, false>(p, n, grp, o0, y, x0);
      } else {
        tile<1, false>(p, n, grp, o0, y, x0);
      }
      x0 += 24;
    } else if (left > 8) {
      tile<2, true>(p, n, grp, o0, y, x0);
      x0 += 16;
    } else {
      tile<1, true>(p, n, grp, o0, y, x0);
      x0 += 8;
    }
  }
}

TOD_AVX512 void finish_row_avx512(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y) {
  finish_row_body(p, n, grp, o0, y);
}

}  // namespace bconv
}  // namespace tod

#endif  // TOD_BCONV_X86
