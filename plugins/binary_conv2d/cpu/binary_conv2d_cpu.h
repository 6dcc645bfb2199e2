// CPU implementation of tod::BinaryConv2d: one call = pack activations, then XOR/AND-popcount
// (or, on the AMX path, int8 tile products of +-1/0 values: the same integer sums).
//
// The driver (binary_conv2d.cpp) owns buffers, threads and dispatch; each ISA file provides the
// two hot loops (packing one channel block of one input row, and computing one output row for 8
// output channels; on AMX, one unit of output positions for 32, see amx_units). The arithmetic they
// must agree on lives in ../binary_conv2d_core.h.
#ifndef TOD_BINARY_CONV2D_CPU_H_
#define TOD_BINARY_CONV2D_CPU_H_

#include <stdint.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../binary_conv2d_core.h"

namespace tod {
namespace bconv {

// Inlined into each ISA file's function, whose target attribute then applies to it (GCC, Clang).
#if defined(__GNUC__)
#define TOD_BCONV_INLINE __attribute__((always_inline)) inline
#else
#define TOD_BCONV_INLINE inline
#endif

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

struct Problem {
  Geometry g;
  ActLayout a;
  const float* x = nullptr;          // [n][c][h][w]
  const float* threshold = nullptr;  // [c]
  const uint8_t* w_packed = nullptr;  // [cout][kh][kw][words * 8]
  const float* alpha = nullptr;      // [cout]
  const float* bias = nullptr;       // [cout] or null
  float* out = nullptr;              // [n][cout][ho][wo]
  int32_t* sums = nullptr;           // [n][cout][ho][wo] or null
  const float* residual = nullptr;   // [n][cout][ho][wo] or null (fused epilogue, op version 2)
  const float* slope = nullptr;      // [cout] when activation == kActPrelu
  int activation = kActNone;         // see Activation in ../binary_conv2d_core.h
  // filled by the driver:
  uint64_t* weights = nullptr;       // see weight_index()
  int8_t* weights_i8 = nullptr;      // AMX path: see amx_weight_index()
  int8_t* lines = nullptr;           // AMX path: [n][AmxLayout::image][64], one int8 per channel of a word
  uint64_t* sign = nullptr;          // [n][image_words]
  uint64_t* nonzero = nullptr;       // [n][image_words] or null when no position can be 0
  bool zeros_in_x = false;           // some activation binarized to 0 (zero_sign == 0 only)
  bool pad_is_zero = false;          // pad_value == 0 and some pad > 0
};

// Does this output tile need the nonzero plane (some tap reads a 0)?
inline bool tile_masked(const Problem& p, bool row_touches_pad, int64_t x0, int64_t x1) {
  if (p.zeros_in_x) return true;
  if (!p.pad_is_zero) return false;
  return row_touches_pad || touches_padding(x0, x1, p.g.sw, p.g.dw, p.g.kw, p.g.pl, p.g.w);
}

// Can tap (ky, kx) of output row y, columns [x0, x1], read a 0? Only where the input has zeros, or
// where that tap reaches into zero padding (a masked tile's other taps read every channel).
inline bool tap_may_read_zero(const Problem& p, int64_t y, int64_t x0, int64_t x1, int64_t ky, int64_t kx) {
  if (p.zeros_in_x) return true;
  if (!p.pad_is_zero) return false;
  const Geometry& g = p.g;
  const int64_t iy = y * g.sh + ky * g.dh;  // padded coordinates
  const int64_t ix0 = x0 * g.sw + kx * g.dw;
  const int64_t ix1 = x1 * g.sw + kx * g.dw;
  return iy < g.pt || iy >= g.pt + g.h || ix0 < g.pl || ix1 >= g.pl + g.w;
}

inline void store_output(const Problem& p, int64_t n, int64_t o, int64_t y, int64_t x, int32_t s) {
  const int64_t at = ((n * p.g.cout + o) * p.g.ho + y) * p.g.wo + x;
  p.out[at] = epilogue(s, p.alpha[o], p.bias ? p.bias[o] : 0.0f);
  if (p.sums) p.sums[at] = s;
}

// The fused epilogue of outputs [begin, end) (indices into an NCHW channel plane, y * wo + x) of
// channels [o0, o_end) of group grp: the ISA kernels store alpha * S + bias, and this pass adds the
// residual and applies the activation while the outputs are still in cache (one pass over the map
// instead of the graph's two). One body for every path, which each ISA file compiles for its own
// vector width: plain loops of float add, multiply and select, so the result is the same bit for bit.
TOD_BCONV_INLINE void finish_span_body(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t o_end, int64_t begin,
                                       int64_t end) {
  const Geometry& g = p.g;
  const int act = p.activation;
  for (int64_t o = o0; o < o_end; ++o) {
    const int64_t oc = grp * g.cog + o;
    const int64_t at = (n * g.cout + oc) * g.ho * g.wo;
    float* __restrict__ row = p.out + at;
    const float slope = act == kActPrelu ? p.slope[oc] : 0.0f;
    if (p.residual) {
      const float* __restrict__ res = p.residual + at;
      for (int64_t x = begin; x < end; ++x) row[x] = activate(add_residual(row[x], res[x]), act, slope);
    } else {
      for (int64_t x = begin; x < end; ++x) row[x] = activate(row[x], act, slope);
    }
  }
}

// finish_span_body on output row y of channels [o0, o0 + 8) (those < cog): finish_row_<isa>.
TOD_BCONV_INLINE void finish_row_body(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y) {
  finish_span_body(p, n, grp, o0, std::min<int64_t>(o0 + 8, p.g.cog), y * p.g.wo, (y + 1) * p.g.wo);
}

// Binarize channels [c0, c0 + nch) (nch <= 64) of input rows [y, y + rows) of image n into one
// word per pixel: sign_out[r * w + x] and, if nz_out is not null, nz_out[...]. Bits past nch are
// zero. Both outputs have 32 words of slack past rows * w.
using PackBlockFn = void (*)(const Problem& p, int64_t n, int64_t c0, int nch, int64_t y, int64_t rows, uint64_t* sign_out,
                             uint64_t* nz_out);
// All outputs of row y for output channels [o0, o0 + 8) of group grp (only < cog are stored).
using ComputeRowFn = void (*)(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y);

void pack_block_scalar(const Problem& p, int64_t n, int64_t c0, int nch, int64_t y, int64_t rows, uint64_t* sign_out,
                       uint64_t* nz_out);
void compute_row_scalar(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y);
void finish_row_scalar(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y);

// SIMD paths need GCC/Clang target attributes and x86-64; elsewhere only the scalar path exists.
#if defined(__x86_64__) && defined(__GNUC__)
#define TOD_BCONV_X86 1
void pack_block_avx2(const Problem& p, int64_t n, int64_t c0, int nch, int64_t y, int64_t rows, uint64_t* sign_out,
                     uint64_t* nz_out);
void compute_row_avx2(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y);
void finish_row_avx2(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y);
void pack_block_avx512(const Problem& p, int64_t n, int64_t c0, int nch, int64_t y, int64_t rows, uint64_t* sign_out,
                       uint64_t* nz_out);
void compute_row_avx512(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y);
void finish_row_avx512(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y);

// AMX-INT8 path (Intel since Sapphire Rapids): each packed word becomes a 64-byte line of int8
// -1/0/+1 activations (`lines`, see AmxLayout), weights become int8 +-1 tiles, zero past the
// group's channels. A TDPBSSD tile product then gives the reference's sum S directly, zeros and
// zero padding included, with no nonzero plane.
constexpr int64_t kAmxOutChannels = 32;  // output channels per compute_row_amx call (two 16-column tiles)
constexpr int64_t kAmxBlocks = 8;        // blocks of 32 output positions whose partial sums a call keeps

// The AMX path's activation lines: word-major, [word][padded row][phase][u] per image. With stride 1
// (`flat`) rows follow each other with no slack, so the lines of output positions q = y * wp + x
// (x < wp; x >= wo are positions no one stores) are consecutive for every tap, and a tile of 16
// positions may span rows: no tile is wasted on the end of a row (a 50-column row took four tiles
// of 16 for 50 columns). Other strides take rows one at a time, as the popcount paths.
struct AmxLayout {
  int64_t phases, row_len, plane, image;  // in 64-byte lines
  bool flat;
  int64_t column(int64_t ix) const { return phases == 1 ? ix : (ix % phases) * row_len + ix / phases; }
  int64_t row_base(int64_t iy, int64_t jw) const { return jw * plane + iy * phases * row_len; }
  int64_t index(int64_t iy, int64_t jw, int64_t ix) const { return row_base(iy, jw) + column(ix); }
};

inline AmxLayout amx_layout(const Geometry& g) {
  AmxLayout l;
  l.flat = g.sh == 1 && g.sw == 1;
  l.phases = g.sw;
  l.row_len = l.flat ? g.wp : ceil_div(g.wp, g.sw) + kRowSlack;
  l.plane = g.hp * l.phases * l.row_len;
  l.image = g.group * g.words * l.plane + 64 + g.kw * g.dw;  // flat tiles read past the last row
  return l;
}

// Units of output positions one compute_row_amx call takes: kAmxBlocks blocks of 32 positions when
// flat, else as many whole rows as kAmxBlocks blocks hold (at least one).
inline int64_t amx_rows_per_unit(const Geometry& g) { return std::max<int64_t>(1, kAmxBlocks / ceil_div(g.wo, 32)); }
inline int64_t amx_units(const Geometry& g) {
  return amx_layout(g).flat ? ceil_div(g.ho * g.wp, 32 * kAmxBlocks) : ceil_div(g.ho, amx_rows_per_unit(g));
}
// [group][ceil(cog / 16)][taps][words] tiles of [16 channel quads][16 output channels][4 channels] int8.
inline int64_t amx_weight_index(const Geometry& g, int64_t grp, int64_t block16, int64_t tap, int64_t j) {
  return (((grp * ceil_div(g.cog, 16) + block16) * g.taps + tap) * g.words + j) * 1024;
}
bool amx_usable();  // CPU flags, and the kernel's permission to use tile data (Linux arch_prctl)
// The weight tiles of output channels [16 * block16, + 16) of group grp (all taps and words).
void prepare_weights_amx(const Problem& p, int64_t grp, int64_t block16);
// pack_rows() of the AMX path: packs word jw of input rows [y0, y0 + rows) of image n into lines,
// with the rows' padding (and, for y0 == 0, the padding rows); tmp_sign and tmp_nz as there.
void pack_rows_amx(const Problem& p, int64_t n, int64_t jw, int64_t y0, int64_t rows, uint64_t* tmp_sign,
                   uint64_t* tmp_nz);
void amx_begin();  // loads this thread's tile configuration
void amx_end();    // releases it
// Unit `unit` (see amx_units) of output channels [o0, o0 + 32) of group grp, with the fused epilogue.
void compute_row_amx(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t unit);
#endif

// Paths this build and this CPU can run, best first.
std::vector<Isa> supported_isas();
const char* isa_name(Isa isa);
bool parse_isa(const std::string& name, Isa* isa);  // "scalar", "avx2", "avx512", "amx"

// The whole op. Returns an empty string on success, else what was wrong.
std::string run(Problem& p, Isa isa, int threads);

}  // namespace bconv
}  // namespace tod

#endif  // TOD_BINARY_CONV2D_CPU_H_
