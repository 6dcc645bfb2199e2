// AMX-INT8 path: one TDPBSSD multiplies a 16 x 64 int8 tile by a 64 x 16 one into 16 x 16 int32
// sums, about 1024 multiply-adds per cycle against the 341 binary ones of XOR + VPOPCNTQ + ADD on
// AVX-512 (the popcount loop sits at that port bound). Binary values as int8 cost 8x the bits, but
// -1/0/+1 activations give the reference's S exactly, zeros and zero padding included.
//
// Tiles: A = activations, 16 output columns x 64 channels: each packed word becomes one 64-byte
// line, so an A tile is 1 KiB of consecutive lines for any tap (a layout with channels along the
// tile's rows made every tap but the first read two cache lines per row, and ran at half the
// speed). B = weights in the VNNI layout (16 channel quads x 16 output channels x 4). C = 16
// columns x 16 output channels, transposed into NCHW rows in the epilogue. A block is 32 columns x
// 32 output channels: 2 A + 2 B tiles into 4 C tiles (all 8 tile registers). Every buffer a tile
// reads starts on a cache line (the driver aligns them): from malloc's 16-byte alignment each tile
// row spans two lines, and whole calls ran 1.3-2x slower, by where the allocator put them.
#include "binary_conv2d_cpu.h"

#if defined(TOD_BCONV_X86)

#include <immintrin.h>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstring>

#define TOD_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq")))

namespace tod {
namespace bconv {
namespace {

// The 64-byte tile configuration of palette 1 (Intel SDM, LDTILECFG): eight tiles of 16 rows x
// 64 bytes. A constant object: GCC's _tile_loadconfig tells the compiler it reads only 8 bytes,
// so the stores that would build a local copy may be dropped.
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
alignas(64) const TileConfig kTileConfig = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// One word's 64 channels as int8: +1 where sign, -1 where nonzero but not sign, 0 elsewhere.
TOD_AMX inline __m512i expand_word(uint64_t sign, uint64_t nonzero) {
  return _mm512_maskz_mov_epi8(nonzero, _mm512_mask_blend_epi8(sign, _mm512_set1_epi8(-1), _mm512_set1_epi8(1)));
}

// r[i][j] -> r[j][i] for a 16 x 16 block of floats (unpack, then two rounds of 128-bit shuffles).
// Zero-masked forms: GCC 12's plain ones seed an "undefined" register that -Wuninitialized
// reports; both are the same instructions.
TOD_AMX inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_maskz_unpacklo_ps(0xFFFF, r[i], r[i + 1]);
    t[i + 1] = _mm512_maskz_unpackhi_ps(0xFFFF, r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_maskz_shuffle_f32x4(0xFFFF, r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_maskz_shuffle_f32x4(0xFFFF, t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_maskz_shuffle_f32x4(0xFFFF, t[i], t[i + 8], 0xDD);
  }
}

// C tile `sums` (16 output positions from (y, x_first), output channels o_first..) as NCHW outputs:
// alpha * S + bias, rounded as the popcount paths round it (the build has -ffp-contract=off). In a
// flat layout the 16 positions may run past the end of row y into the next rows; the positions
// that exist (x < wo, y < ho) are consecutive NCHW outputs, so a tile across a row end stores them
// compressed (slow; the other tiles need not).
TOD_AMX void store_tile(const Problem& p, const AmxLayout& l, int64_t n, int64_t grp, int64_t o_first, int64_t y,
                        int64_t x_first, const int32_t (&sums)[16][16]) {
  const Geometry& g = p.g;
  unsigned real = 0;  // lanes that are outputs
  int64_t first;      // their first output, in [0, ho * wo)
  if (l.flat) {
    int64_t row = y + x_first / g.wp, column = x_first % g.wp;  // of lane 0 (x_first may pass wp)
    first = row * g.wo + std::min(column, g.wo);
    for (int lane = 0; lane < 16; ++lane) {
      real |= unsigned(row < g.ho && column < g.wo) << lane;
      if (++column == g.wp) {
        column = 0;
        ++row;
      }
    }
  } else {
    const int64_t columns = std::min<int64_t>(16, g.wo - x_first);
    real = (1u << columns) - 1;
    first = y * g.wo + x_first;
  }
  const __mmask16 lanes = __mmask16(real);
  const bool prefix = (real & (real + 1)) == 0;  // outputs in the first lanes only: no compression
  const int64_t channels = std::min<int64_t>(16, g.cog - o_first);
  const __mmask16 present = __mmask16((1u << channels) - 1);
  const int64_t og = grp * g.cog + o_first;
  const __m512 alpha = _mm512_maskz_loadu_ps(present, p.alpha + og);
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(present, p.bias + og) : _mm512_setzero_ps();
  __m512 r[16];
  for (int x = 0; x < 16; ++x) {
    // The zero-masked conversion: GCC 12's plain form seeds an "undefined" register that
    // -Wmaybe-uninitialized reports; both are the same instruction.
    const __m512 s = _mm512_maskz_cvtepi32_ps(0xFFFF, _mm512_load_si512(sums[x]));
    r[x] = _mm512_add_ps(_mm512_mul_ps(s, alpha), bias);
  }
  transpose16(r);
  for (int64_t m = 0; m < channels; ++m) {
    const int64_t at = (n * g.cout + og + m) * g.ho * g.wo + first;
    if (prefix) {
      _mm512_mask_storeu_ps(p.out + at, lanes, r[m]);
    } else {
      _mm512_mask_compressstoreu_ps(p.out + at, lanes, r[m]);
    }
    if (p.sums) {
      int64_t k = at;
      for (int lane = 0; lane < 16; ++lane) {
        if (real >> lane & 1) p.sums[k++] = sums[lane][m];
      }
    }
  }
}

// The C tiles of one block: positions [x0, x0 + 16 * (1 + two_x)) from row y x output channels
// [o0, o0 + 16 * (1 + two_o)), tile t at sums[t] (0: first positions and channels, 1: next
// channels, 2: next positions, 3: both).
struct Block {
  int64_t y = 0, x0 = 0;
  bool two_x = false, two_o = false;
  alignas(64) int32_t sums[4][16][16];
};

// The epilogue of a saved block, one C tile at a time, so that it can be spread between the tile
// products of the next block (the vector ports convert and transpose while the tile unit works).
struct Pending {
  const Problem& p;
  const AmxLayout& l;
  int64_t n, grp, o0;
  const Block* block = nullptr;
  int next = 0;  // next tile to store

  TOD_AMX void store_one() {
    const Block& b = *block;
    while (next < 4) {
      const int t = next++;
      const bool two_o = t & 1, two_x = t & 2;
      if ((two_o && !b.two_o) || (two_x && !b.two_x)) continue;
      store_tile(p, l, n, grp, o0 + (two_o ? 16 : 0), b.y, b.x0 + (two_x ? 16 : 0), b.sums[t]);
      return;
    }
  }
  TOD_AMX void store_all() {
    while (block && next < 4) store_one();
  }
};

// Accumulates word j of every tap of a block into tiles 0..3, starting from zero or from the
// partial sums in `from`. Tile numbers are instruction immediates, hence one instantiation per shape.
template <bool kTwoX, bool kTwoO>
TOD_AMX void accumulate(const Problem& p, const AmxLayout& a, int64_t n, int64_t grp, int64_t o0, int64_t y, int64_t x0,
                        int64_t j, const Block* from, Pending& pending) {
  const Geometry& g = p.g;
  const int8_t* image = p.lines + n * a.image * 64;
  const int8_t* w_first = p.weights_i8 + amx_weight_index(g, grp, o0 / 16, 0, j);
  const int64_t w_next = amx_weight_index(g, 0, 1, 0, 0);  // the next 16 output channels
  if (from) {
    _tile_loadd(0, from->sums[0], 64);
    if (kTwoO) _tile_loadd(1, from->sums[1], 64);
    if (kTwoX) _tile_loadd(2, from->sums[2], 64);
    if (kTwoX && kTwoO) _tile_loadd(3, from->sums[3], 64);
  } else {
    _tile_zero(0);
    if (kTwoO) _tile_zero(1);
    if (kTwoX) _tile_zero(2);
    if (kTwoX && kTwoO) _tile_zero(3);
  }
  // Taps between two tiles of the pending epilogue (4 tiles spread over the taps).
  const int64_t every = std::max<int64_t>(1, g.taps / 4);
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = y * g.sh + ky * g.dh;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      if (pending.block && (ky * g.kw + kx) % every == every - 1) pending.store_one();
      const int8_t* act = image + 64 * (a.row_base(iy, grp * g.words + j) + a.column(x0 * g.sw + kx * g.dw));
      const int8_t* w = w_first + (ky * g.kw + kx) * g.words * 1024;
      _tile_loadd(4, act, 64);
      _tile_loadd(6, w, 64);
      _tile_dpbssd(0, 4, 6);
      if (kTwoO) {
        _tile_loadd(7, w + w_next, 64);
        _tile_dpbssd(1, 4, 7);
      }
      if (kTwoX) {
        _tile_loadd(5, act + 1024, 64);
        _tile_dpbssd(2, 5, 6);
        if (kTwoO) _tile_dpbssd(3, 5, 7);
      }
    }
  }
}

template <bool kTwoX, bool kTwoO>
TOD_AMX void save(Block& b) {
  _tile_stored(0, b.sums[0], 64);
  if (kTwoO) _tile_stored(1, b.sums[1], 64);
  if (kTwoX) _tile_stored(2, b.sums[2], 64);
  if (kTwoX && kTwoO) _tile_stored(3, b.sums[3], 64);
}

}  // namespace

bool amx_usable() {
  static const bool usable = [] {
#if defined(__linux__) && defined(SYS_arch_prctl)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8") || !__builtin_cpu_supports("avx512f") ||
        !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq") ||
        !__builtin_cpu_supports("avx512vpopcntdq")) {
      return false;
    }
    // Linux hands out the 8 KiB tile state only on request, once per process (ARCH_REQ_XCOMP_PERM
    // for XFEATURE_XTILEDATA); without it the first tile instruction raises SIGILL.
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
    return false;
#endif
  }();
  return usable;
}

TOD_AMX void prepare_weights_amx(const Problem& p, int64_t grp, int64_t block16) {
  const Geometry& g = p.g;
  for (int64_t tap = 0; tap < g.taps; ++tap)
    for (int64_t j = 0; j < g.words; ++j) {
      // Row m: output channel 16 * block16 + m as 16 quads of 4 int8 channels (zero past cog);
      // the VNNI tile is its transpose, [quad][output channel].
      __m512 rows[16];
      for (int64_t m = 0; m < 16; ++m) {
        const int64_t o = 16 * block16 + m;
        const uint64_t bits = o < g.cog ? packed_weight_word(p.w_packed, g.words, g.taps, grp * g.cog + o, tap, j) : 0;
        const uint64_t valid = o < g.cog ? valid_bits(g.cg, j) : 0;
        rows[m] = _mm512_castsi512_ps(expand_word(bits, valid));
      }
      transpose16(rows);
      int8_t* tile = p.weights_i8 + amx_weight_index(g, grp, block16, tap, j);
      for (int q = 0; q < 16; ++q) _mm512_storeu_ps(tile + 64 * q, rows[q]);
    }
}

namespace {

// Padded row iy of word jw: its pad columns (all columns if all_pad), and its slack, which tiles
// read past the last column (zeroed so that they read defined values, though only into columns
// that are never stored). A function rather than a lambda: lambdas do not take the target.
TOD_AMX void start_row(const Problem& p, const AmxLayout& a, int8_t* image, int64_t jw, int64_t iy, bool all_pad,
                       __m512i pad_line) {
  const Geometry& g = p.g;
  for (int64_t ix = 0; ix < g.wp; ++ix) {
    if (all_pad || ix < g.pl || ix >= g.pl + g.w) _mm512_storeu_si512(image + 64 * a.index(iy, jw, ix), pad_line);
  }
  for (int64_t phase = 0; phase < a.phases; ++phase) {
    const int64_t used = std::max<int64_t>(0, ceil_div(g.wp - phase, a.phases));
    std::memset(image + 64 * (a.row_base(iy, jw) + phase * a.row_len + used), 0, 64 * (a.row_len - used));
  }
}

}  // namespace

TOD_AMX void pack_rows_amx(const Problem& p, int64_t n, int64_t jw, int64_t y0, int64_t rows, uint64_t* tmp_sign,
                           uint64_t* tmp_nz) {
  const Geometry& g = p.g;
  const AmxLayout a = amx_layout(g);
  const int64_t grp = jw / g.words;
  const int64_t j = jw % g.words;
  const Bits pad = pad_word(static_cast<int>(g.pad_value), valid_bits(g.cg, j));
  const __m512i pad_line = expand_word(pad.sign, pad.nonzero);
  int8_t* image = p.lines + n * a.image * 64;

  if (y0 == 0) {
    for (int64_t iy = 0; iy < g.pt; ++iy) start_row(p, a, image, jw, iy, true, pad_line);
    for (int64_t iy = g.pt + g.h; iy < g.hp; ++iy) start_row(p, a, image, jw, iy, true, pad_line);
  }
  const int64_t c0 = grp * g.cg + j * kWordBits;
  const int nch = static_cast<int>(std::min<int64_t>(kWordBits, g.cg - j * kWordBits));
  pack_block_avx512(p, n, c0, nch, y0, rows, tmp_sign, tmp_nz);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t iy = g.pt + y0 + r;
    start_row(p, a, image, jw, iy, false, pad_line);
    int8_t* row = image + 64 * a.row_base(iy, jw);
    int64_t phase = g.pl % a.phases;  // walk (phase, u) instead of dividing per column
    int64_t u = g.pl / a.phases;
    for (int64_t x = 0; x < g.w; ++x) {
      _mm512_storeu_si512(row + 64 * (phase * a.row_len + u), expand_word(tmp_sign[r * g.w + x], tmp_nz[r * g.w + x]));
      if (++phase == a.phases) {
        phase = 0;
        ++u;
      }
    }
  }
}

TOD_AMX void amx_begin() { _tile_loadconfig(&kTileConfig); }

TOD_AMX void amx_end() { _tile_release(); }

namespace {

// A segment: up to kAmxBlocks blocks of one call (of one row, or of several narrow rows), taken one
// 64-channel word at a time, the partial sums kept in the blocks between words: the weights of one
// word of 32 output channels (18 KiB for a 3x3 layer) then serve every block of the segment from
// L1. The last word's blocks are software-pipelined: the epilogue of one block is issued between
// the tile products of the next, so that it runs on the vector ports while the tile unit works.
TOD_AMX void run_segment(const Problem& p, const AmxLayout& l, int64_t n, int64_t grp, int64_t o0, Block* blocks,
                         int64_t count) {
  const Geometry& g = p.g;
  Pending pending{p, l, n, grp, o0};
  for (int64_t j = 0; j < g.words; ++j) {
    for (int64_t i = 0; i < count; ++i) {
      Block& b = blocks[i];
      const Block* from = j > 0 ? &b : nullptr;
      if (b.two_x && b.two_o) {
        accumulate<true, true>(p, l, n, grp, o0, b.y, b.x0, j, from, pending);
      } else if (b.two_x) {
        accumulate<true, false>(p, l, n, grp, o0, b.y, b.x0, j, from, pending);
      } else if (b.two_o) {
        accumulate<false, true>(p, l, n, grp, o0, b.y, b.x0, j, from, pending);
      } else {
        accumulate<false, false>(p, l, n, grp, o0, b.y, b.x0, j, from, pending);
      }
      pending.store_all();
      if (b.two_x && b.two_o) {
        save<true, true>(b);
      } else if (b.two_x) {
        save<true, false>(b);
      } else if (b.two_o) {
        save<false, true>(b);
      } else {
        save<false, false>(b);
      }
      if (j + 1 == g.words) {
        pending.block = &b;
        pending.next = 0;
      }
    }
  }
  pending.store_all();
}

// The output index (y * wo + x) of the first output at or after flat position q = y * wp + x.
int64_t output_index(const Geometry& g, int64_t q) {
  if (q >= g.ho * g.wp) return g.ho * g.wo;
  return q / g.wp * g.wo + std::min(q % g.wp, g.wo);
}

// The fused epilogue of outputs [begin, end) of the call's 32 output channels, after its tiles:
// contiguous in every channel plane (doing it tile by tile, in 16-output pieces of 16 planes at a
// time, made a 64x200x200 residual block 1.6x slower than its plain convolution).
TOD_AMX void finish(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t begin, int64_t end) {
  if (!p.residual && p.activation == kActNone) return;
  finish_span_body(p, n, grp, o0, std::min(o0 + kAmxOutChannels, p.g.cog), begin, end);
}

}  // namespace

TOD_AMX void compute_row_amx(const Problem& p, int64_t n, int64_t grp, int64_t o0, int64_t unit) {
  const Geometry& g = p.g;
  const AmxLayout l = amx_layout(g);
  Block blocks[kAmxBlocks];
  int64_t count = 0;
  auto add = [&](int64_t y, int64_t x0, bool two_x) {
    Block& b = blocks[count++];
    b.y = y;
    b.x0 = x0;
    b.two_x = two_x;
    b.two_o = o0 + 16 < g.cog;
  };
  if (l.flat) {  // positions q = y * wp + x, 32 per block
    const int64_t end = g.ho * g.wp;
    for (int64_t q = unit * 32 * kAmxBlocks; q < std::min(end, (unit + 1) * 32 * kAmxBlocks); q += 32) {
      add(q / g.wp, q % g.wp, q + 16 < end);
    }
    run_segment(p, l, n, grp, o0, blocks, count);
    finish(p, n, grp, o0, output_index(g, unit * 32 * kAmxBlocks), output_index(g, (unit + 1) * 32 * kAmxBlocks));
    return;
  }
  const int64_t y0 = unit * amx_rows_per_unit(g);
  for (int64_t y = y0; y < std::min(g.ho, y0 + amx_rows_per_unit(g)); ++y) {
    for (int64_t x0 = 0; x0 < g.wo; x0 += 32) {
      add(y, x0, x0 + 16 < g.wo);
      if (count == kAmxBlocks) {
        run_segment(p, l, n, grp, o0, blocks, count);
        count = 0;
      }
    }
  }
  if (count > 0) run_segment(p, l, n, grp, o0, blocks, count);
  finish(p, n, grp, o0, y0 * g.wo, std::min(g.ho, y0 + amx_rows_per_unit(g)) * g.wo);
}

}  // namespace bconv
}  // namespace tod

#endif  // TOD_BCONV_X86
