// Arithmetic core of tod::BinaryConv2d, shared by every implementation (CPU paths now, CUDA later).
//
// Why a header of small inline functions: the semantics (how a float becomes a bit, what a
// padded pixel is, how bits become the integer sum, how the sum becomes the output) must be
// written exactly once, so that the scalar CPU path, the SIMD paths' prologue/epilogue and a
// future CUDA kernel cannot drift apart.  Everything here is plain C++ (no STL, no exceptions)
// and becomes __host__ __device__ when compiled by nvcc.
//
// Encoding (see tod_deploy/ops/binary_conv_ref.py for the normative description):
//   * one activation value is two bits: sign (1 = +1, 0 = -1 or 0) and nonzero (1 = +-1, 0 = 0);
//   * one weight is one bit: 1 = +1, 0 = -1 (weights that binarize to 0 are rejected at packing);
//   * bits are packed along the channel axis, 64 channels per uint64 word, channel c of a group
//     at bit (c % 64) of word (c / 64); bits past the group's channel count are 0 everywhere.
//   * the integer sum over the nonzero positions is
//         S = popcount(nonzero) - 2 * popcount((sign ^ weight) & nonzero)
//     and, when no position is zero, the cheaper  S = taps * channels - 2 * popcount(sign ^ weight).
#ifndef TOD_BINARY_CONV2D_CORE_H_
#define TOD_BINARY_CONV2D_CORE_H_

#if defined(__CUDACC_RTC__)
// NVRTC (run-time compilation, what a GPU machine without nvcc uses) has no C headers.
typedef unsigned char uint8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

#if defined(__CUDACC__)
#define TOD_HD __host__ __device__ __forceinline__
#else
#define TOD_HD inline
#endif

namespace tod {
namespace bconv {

constexpr int kWordBits = 64;

TOD_HD int64_t words_for(int64_t channels) { return (channels + kWordBits - 1) / kWordBits; }

TOD_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

TOD_HD int popcount64(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return __popcll(v);
#else
  return __builtin_popcountll(v);
#endif
}

// Bits of word j that stand for real channels of a group with `channels` channels.
TOD_HD uint64_t valid_bits(int64_t channels, int64_t j) {
  const int64_t left = channels - j * kWordBits;
  if (left >= kWordBits) return ~uint64_t(0);
  if (left <= 0) return 0;
  return (uint64_t(1) << left) - 1;
}

// Sign and nonzero bit of one activation. NaN compares like x == threshold (takes zero_sign),
// which is what the NumPy reference does with its two comparisons.
struct Bits {
  uint64_t sign;
  uint64_t nonzero;
};

TOD_HD Bits binarize(float x, float threshold, int zero_sign) {
  const bool gt = x > threshold;
  const bool lt = x < threshold;
  Bits b;
  b.sign = (gt || (!lt && zero_sign > 0)) ? 1u : 0u;
  b.nonzero = (gt || lt || zero_sign != 0) ? 1u : 0u;
  return b;
}

// The packed word of a padded pixel: pad_value +1, -1 or 0 over the valid channels.
TOD_HD Bits pad_word(int pad_value, uint64_t valid) {
  Bits b;
  b.sign = pad_value > 0 ? valid : 0;
  b.nonzero = pad_value != 0 ? valid : 0;
  return b;
}

// Weight word o/tap/j of W_packed (layout [Cout][KH][KW][words * 8] uint8, words little-endian),
// read byte by byte so that the host's endianness does not matter.
TOD_HD uint64_t packed_weight_word(const uint8_t* w_packed, int64_t words_per_tap, int64_t taps, int64_t o,
                                   int64_t tap, int64_t j) {
  const uint8_t* p = w_packed + ((o * taps + tap) * words_per_tap + j) * 8;
  uint64_t v = 0;
  for (int b = 0; b < 8; ++b) v |= uint64_t(p[b]) << (8 * b);
  return v;
}

// out = alpha * S + bias with exactly two float roundings (no fused multiply-add), as the
// reference computes it in float32.
TOD_HD float epilogue(int32_t s, float alpha, float bias) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(alpha, static_cast<float>(s)), bias);
#else
  volatile float scaled = alpha * static_cast<float>(s);  // volatile: no contraction into an FMA
  return scaled + bias;
#endif
}

// The fused epilogue (op version 2, step 6 of the reference): y (= epilogue() above) plus the
// residual, then the activation, each one float rounding. NaN passes through both activations.
enum Activation { kActNone = 0, kActRelu = 1, kActPrelu = 2 };

TOD_HD float add_residual(float y, float residual) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(y, residual);
#else
  return y + residual;
#endif
}

// Branch-free: the product is formed before the select, so a loop over a row becomes compare +
// blend (the sign of y is data, a branch on it mispredicts half the time); activation is the same
// for the whole loop, so compilers hoist it out.
TOD_HD float activate(float y, int activation, float slope) {
#if defined(__CUDA_ARCH__)
  const float scaled = activation == kActPrelu ? __fmul_rn(slope, y) : 0.0f;
#else
  const float scaled = activation == kActPrelu ? slope * y : 0.0f;
#endif
  return activation != kActNone && y < 0.0f ? scaled : y;
}

// Shape of one call. Plain integers so that it can be copied to a device as is.
struct Geometry {
  int64_t n, c, h, w;        // input
  int64_t cout, kh, kw;      // output channels, kernel
  int64_t sh, sw, dh, dw;    // strides, dilations
  int64_t pt, pl, pb, pr;    // pads: top, left, bottom, right (ONNX order is t, l, b, r)
  int64_t group;
  int64_t zero_sign, pad_value;
  // derived (fill with derive()):
  int64_t cg, cog, cog_pad;  // in / out channels per group; out channels per group rounded up to 8
  int64_t words;             // words per tap per group: ceil(cg / 64)
  int64_t taps;              // kh * kw
  int64_t ho, wo;            // output size
  int64_t hp, wp;            // padded input size
};

TOD_HD int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t d, int64_t p0, int64_t p1) {
  return (in + p0 + p1 - d * (k - 1) - 1) / s + 1;
}

TOD_HD void derive(Geometry& g) {
  g.cg = g.c / g.group;
  g.cog = g.cout / g.group;
  g.cog_pad = ceil_div(g.cog, 8) * 8;
  g.words = words_for(g.cg);
  g.taps = g.kh * g.kw;
  g.ho = conv_out_size(g.h, g.kh, g.sh, g.dh, g.pt, g.pb);
  g.wo = conv_out_size(g.w, g.kw, g.sw, g.dw, g.pl, g.pr);
  g.hp = g.h + g.pt + g.pb;
  g.wp = g.w + g.pl + g.pr;
}

// Internal weight layout: [group][cog_pad][taps][words] uint64, padding bits and padding output
// channels zero, so that kernels can read 8 output channels at a time without bounds checks.
TOD_HD int64_t weight_index(const Geometry& g, int64_t grp, int64_t o_in_group, int64_t tap, int64_t j) {
  return ((grp * g.cog_pad + o_in_group) * g.taps + tap) * g.words + j;
}

// Packed activations of one image: [padded row][word over all groups][column phase][u], where a
// padded column ix lives in phase ix % sw at u = ix / sw. With the phase split, the input columns
// read by consecutive output columns are consecutive words for any stride and dilation, which is
// what lets SIMD kernels load 8 output positions with one load.
struct ActLayout {
  int64_t rows;      // padded rows (hp)
  int64_t words;     // words per pixel (group * words per tap)
  int64_t phases;    // = stride along x
  int64_t row_len;   // words per (row, word, phase), with slack for SIMD over-reads
  // Offset of column ix inside a (row, word) block; no division in the common stride-1 case.
  TOD_HD int64_t column(int64_t ix) const { return phases == 1 ? ix : (ix % phases) * row_len + ix / phases; }
  TOD_HD int64_t row_base(int64_t iy, int64_t jw) const { return (iy * words + jw) * phases * row_len; }
  TOD_HD int64_t index(int64_t iy, int64_t jw, int64_t ix) const { return row_base(iy, jw) + column(ix); }
  TOD_HD int64_t word_step() const { return phases * row_len; }  // from word jw to jw + 1
  TOD_HD int64_t image_words() const { return rows * words * phases * row_len; }
};

constexpr int64_t kRowSlack = 40;  // >= widest SIMD tile (32 columns) + alignment room

TOD_HD ActLayout make_layout(const Geometry& g) {
  ActLayout a;
  a.rows = g.hp;
  a.words = g.group * g.words;
  a.phases = g.sw;
  a.row_len = ceil_div(g.wp, g.sw) + kRowSlack;
  return a;
}

// The integer sum of one output position, straight from the definition. The scalar CPU path
// is this function; SIMD paths compute the same sums many at a time.
TOD_HD int32_t output_sum(const Geometry& g, const ActLayout& a, const uint64_t* sign, const uint64_t* nonzero,
                          const uint64_t* weights, int64_t grp, int64_t o_in_group, int64_t y, int64_t x) {
  int64_t count = 0;
  int64_t disagree = 0;
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = y * g.sh + ky * g.dh;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t ix = x * g.sw + kx * g.dw;
      const int64_t tap = ky * g.kw + kx;
      for (int64_t j = 0; j < g.words; ++j) {
        const int64_t idx = a.index(iy, grp * g.words + j, ix);
        const uint64_t w = weights[weight_index(g, grp, o_in_group, tap, j)];
        if (nonzero) {
          const uint64_t m = nonzero[idx];
          count += popcount64(m);
          disagree += popcount64((sign[idx] ^ w) & m);
        } else {
          disagree += popcount64(sign[idx] ^ w);
        }
      }
    }
  }
  if (!nonzero) count = g.taps * g.cg;
  return static_cast<int32_t>(count - 2 * disagree);
}

// Does the receptive field of output rows/columns [lo, hi] touch padding along one axis?
TOD_HD bool touches_padding(int64_t lo, int64_t hi, int64_t s, int64_t d, int64_t k, int64_t p0, int64_t in) {
  return lo * s < p0 || hi * s + (k - 1) * d >= p0 + in;
}

// --- sums from tensor-core counts (the CUDA kernel; checked on the host by tests/test_cuda_kernel.py) ---
//
// A b1 MMA gives, for every (position, output channel) pair, popc(A op B) summed over its K bits, with
// op = AND (sm_80+) or XOR (sm_75 only). Neither gives popc((s ^ w) & n) in one instruction, so the
// kernel runs two MMAs and combines them with per-position or per-channel counts, as below.
// Notation: s = sign bits, n = nonzero bits, z = valid & ~n (zero bits), w = weight bits, valid = the
// bits of real channels; s implies n, and s, n, z, w are all 0 outside valid.

// AND identity: popc((s ^ w) & n) = popc(s) + popc(w & n) - 2 * popc(s & w), because s & w & n = s & w.
TOD_HD int64_t disagree_from_and(int64_t pop_s, int64_t pop_nw, int64_t pop_sw) { return pop_s + pop_nw - 2 * pop_sw; }

// S = popc(n) - 2 * popc((s ^ w) & n) from the AND counts (MMAs s.w and n.w; popc(s), popc(n) per position).
TOD_HD int32_t sum_from_and(int64_t pop_n, int64_t pop_s, int64_t pop_nw, int64_t pop_sw) {
  return static_cast<int32_t>(pop_n - 2 * disagree_from_and(pop_s, pop_nw, pop_sw));
}

// XOR identity: per bit, xb * wb = (2s - 1 + z)(2w - 1) = 1 + w - 2 (s ^ w) - (z ^ w), so
// S = valid_count + popc(w) - 2 * popc(s ^ w) - popc(z ^ w) (MMAs s.w and z.w; popc(w) per channel).
// Padding bits cancel: there s = z = w = 0, so both XOR terms are 0.
TOD_HD int32_t sum_from_xor(int64_t valid_count, int64_t pop_w, int64_t pop_s_xor_w, int64_t pop_z_xor_w) {
  return static_cast<int32_t>(valid_count + pop_w - 2 * pop_s_xor_w - pop_z_xor_w);
}

// The zero-activation plane of one word (the XOR path's second MMA operand).
TOD_HD uint64_t zero_bits(const Bits& b, uint64_t valid) { return valid & ~b.nonzero; }

// Binarize and pack `count` (<= 64) channels that lie `stride` floats apart (NCHW: stride = H * W),
// channel i into bit i. How the CUDA kernel packs activations, straight from the real-valued input.
TOD_HD Bits pack_activation_word(const float* x, int64_t stride, int64_t count, float threshold, int zero_sign) {
  Bits word;
  word.sign = 0;
  word.nonzero = 0;
  for (int64_t i = 0; i < count; ++i) {
    const Bits b = binarize(x[i * stride], threshold, zero_sign);
    word.sign |= b.sign << i;
    word.nonzero |= b.nonzero << i;
  }
  return word;
}

}  // namespace bconv
}  // namespace tod

#endif  // TOD_BINARY_CONV2D_CORE_H_
