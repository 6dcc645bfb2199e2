// Portable path: the core's definitions applied one word at a time. It is the fallback on
// non-x86 machines and the executable statement of what the SIMD paths must reproduce.
#include "binary_conv2d_cpu.h"

namespace tod {
namespace bconv {

void pack_block_scalar(const Problem& p, int64_t n, int64_t c0, int nch, int64_t y, int64_t rows, uint64_t* sign_out,
                       uint64_t* nz_out) {
  const Geometry& g = p.g;
  const int zero_sign = static_cast<int>(g.zero_sign);
  const int64_t w = g.w * rows;  // rows y .. y + rows - 1 of a channel are one contiguous span
  for (int64_t x = 0; x < w; ++x) {
    sign_out[x] = 0;
    if (nz_out) nz_out[x] = 0;
  }
  for (int c = 0; c < nch; ++c) {
    const float* row = p.x + ((n * g.c + c0 + c) * g.h + y) * g.w;
    const float thr = p.threshold[c0 + c];
    for (int64_t x = 0; x < w; ++x) {
      const Bits b = binarize(row[x], thr, zero_sign);
      sign_out[x] |= b.sign << c;
      if (nz_out) nz_out[x] |= b.nonzero << c;
    }
  }
}

void compute_row_scalar(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y) {
  const Geometry& g = p.g;
  const int64_t image = n * p.a.image_words();
  const bool row_pad = touches_padding(y, y, g.sh, g.dh, g.kh, g.pt, g.h);
  const int64_t o_end = o0 + 8 < g.cog ? o0 + 8 : g.cog;
  for (int64_t x = 0; x < g.wo; ++x) {
    const bool masked = tile_masked(p, row_pad, x, x);
    const uint64_t* nz = masked ? p.nonzero + image : nullptr;
    for (int64_t o = o0; o < o_end; ++o) {
      const int32_t s = output_sum(g, p.a, p.sign + image, nz, p.weights, grp, o, y, x);
      store_output(p, n, grp * g.cog + o, y, x, s);
    }
  }
}

void finish_row_scalar(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t y) {
  finish_row_body(p, n, grp, o0, y);
}

}  // namespace bconv
}  // namespace tod
