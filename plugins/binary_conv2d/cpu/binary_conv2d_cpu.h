// CPU implementation of tod::BinaryConv2d: one call = pack activations, then XOR/AND-popcount.
//
// The driver (binary_conv2d.cpp) owns buffers, threads and dispatch; each ISA file provides the
// two hot loops (packing one channel block of one input row, and computing one output row for
// 8 output channels). The arithmetic they must agree on lives in ../binary_conv2d_core.h.
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

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

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

// The fused epilogue of output row y of channels [o0, o0 + 8) of group grp (those < cog): the ISA
// kernels store alpha * S + bias, and this pass adds the residual and applies the activation while
// the row is still in L1 (one pass over the map instead of the graph's two). One body for every path,
// which each ISA file compiles for its own vector width (finish_row_<isa>): plain loops of float add,
// multiply and select, so the result is the same bit for bit.
TOD_BCONV_INLINE void finish_row_body(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y) {
  const Geometry& g = p.g;
  const int64_t o_end = std::min<int64_t>(o0 + 8, g.cog);
  const int act = p.activation;
  for (int64_t o = o0; o < o_end; ++o) {
    const int64_t oc = grp * g.cog + o;
    const int64_t at = ((n * g.cout + oc) * g.ho + y) * g.wo;
    float* __restrict__ row = p.out + at;
    const float slope = act == kActPrelu ? p.slope[oc] : 0.0f;
    if (p.residual) {
      const float* __restrict__ res = p.residual + at;
      for (int64_t x = 0; x < g.wo; ++x) row[x] = activate(add_residual(row[x], res[x]), act, slope);
    } else {
      for (int64_t x = 0; x < g.wo; ++x) row[x] = activate(row[x], act, slope);
    }
  }
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
#endif

// Paths this build and this CPU can run, best first.
std::vector<Isa> supported_isas();
const char* isa_name(Isa isa);
bool parse_isa(const std::string& name, Isa* isa);  // "scalar", "avx2", "avx512"

// The whole op. Returns an empty string on success, else what was wrong.
std::string run(Problem& p, Isa isa, int threads);

}  // namespace bconv
}  // namespace tod

#endif  // TOD_BINARY_CONV2D_CPU_H_
