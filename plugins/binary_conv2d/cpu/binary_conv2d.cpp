// Driver of the CPU tod::BinaryConv2d: validation, weight preparation, activation packing,
// threading and ISA dispatch. The hot loops are in kernels_*.cpp.
#include "binary_conv2d_cpu.h"

#include "thread_pool.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

namespace tod {
namespace bconv {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx:
      return "amx";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

bool parse_isa(const std::string& name, Isa* isa) {
  if (name == "amx") {
    *isa = Isa::kAmx;
  } else if (name == "avx512") {
    *isa = Isa::kAvx512;
  } else if (name == "avx2") {
    *isa = Isa::kAvx2;
  } else if (name == "scalar") {
    *isa = Isa::kScalar;
  } else {
    return false;
  }
  return true;
}

std::vector<Isa> supported_isas() {
  std::vector<Isa> isas;
#if defined(TOD_BCONV_X86)
  __builtin_cpu_init();
  if (amx_usable()) isas.push_back(Isa::kAmx);
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vpopcntdq")) {
    isas.push_back(Isa::kAvx512);
  }
  if (__builtin_cpu_supports("avx2")) isas.push_back(Isa::kAvx2);
#endif
  isas.push_back(Isa::kScalar);
  return isas;
}

namespace {

// Weight words of output channels [o0, o0 + 8) of group grp (zero past cog). One of the first work
// items of a call: built on one thread, a 512-channel 3x3 layer's words took 0.1 ms, 9% of its call.
void prepare_weights(const Problem& p, int64_t grp, int64_t o0) {
  const Geometry& g = p.g;
  for (int64_t o = o0; o < o0 + 8; ++o)
    for (int64_t tap = 0; tap < g.taps; ++tap)
      for (int64_t j = 0; j < g.words; ++j)
        p.weights[weight_index(g, grp, o, tap, j)] =
            o < g.cog ? packed_weight_word(p.w_packed, g.words, g.taps, grp * g.cog + o, tap, j) & valid_bits(g.cg, j) : 0;
}

// The buffers of a call, kept by the calling thread between calls (grown, never shrunk): fresh
// ones of a few hundred KiB are fresh pages each call, faulted in by the shares and unmapped after
// (with a TLB shootdown for the other threads): 60 us of a 1.2 ms 512x25x25 call.
struct Scratch {
  std::vector<uint64_t> weights, sign, nonzero, temporaries;
  std::vector<int8_t> weights_i8, lines;  // the AMX path's
};

// A buffer of at least `size` items from `buffer`, its first item on a 64-byte boundary (a cache
// line: AMX tiles are 16 lines of 64 bytes, and a tile from an unaligned malloc result reads 32).
template <typename T>
T* at_least(std::vector<T>& buffer, int64_t size) {
  constexpr size_t kLine = 64;
  const size_t need = static_cast<size_t>(size) + kLine / sizeof(T);
  if (buffer.size() < need) buffer.resize(need);
  const uintptr_t at = reinterpret_cast<uintptr_t>(buffer.data());
  return reinterpret_cast<T*>((at + kLine - 1) / kLine * kLine);
}

// Rows of input packed per channel visit: a channel's rows are contiguous, so one visit reads
// rows * w floats in one stream instead of restarting the prefetcher every row (which made
// packing narrow maps, e.g. 25 columns = 100 bytes per row, far slower than memory).
int64_t rows_per_block(const Geometry& g) {
  const int64_t target = 2048;  // words per plane in the temporaries (16 KiB)
  return std::max<int64_t>(1, std::min<int64_t>(g.h, target / std::max<int64_t>(1, g.w)));
}

// Pack input rows [y0, y0 + rows) of word jw of image n into the padded layout (with their left
// and right padding and slack); the block with y0 == 0 also writes the top and bottom padding
// rows of this word. Returns whether some activation binarized to 0.
bool pack_rows(const Problem& p, PackBlockFn block, int64_t n, int64_t jw, int64_t y0, int64_t rows, uint64_t* tmp_sign,
               uint64_t* tmp_nz) {
  const Geometry& g = p.g;
  const ActLayout& a = p.a;
  const int64_t image = n * a.image_words();
  const int64_t region = a.word_step();  // all phases of one (row, word)
  uint64_t* sign = p.sign + image;
  uint64_t* nonzero = p.nonzero ? p.nonzero + image : nullptr;
  const int64_t grp = jw / g.words;
  const int64_t j = jw % g.words;
  const uint64_t valid = valid_bits(g.cg, j);
  const Bits pad = pad_word(static_cast<int>(g.pad_value), valid);

  auto start_row = [&](int64_t iy, bool all_pad) {
    uint64_t* srow = sign + a.row_base(iy, jw);
    uint64_t* zrow = nonzero ? nonzero + a.row_base(iy, jw) : nullptr;
    std::memset(srow, 0, sizeof(uint64_t) * region);
    if (zrow) std::memset(zrow, 0, sizeof(uint64_t) * region);
    for (int64_t ix = 0; ix < g.wp; ++ix) {
      if (!all_pad && ix >= g.pl && ix < g.pl + g.w) continue;
      srow[a.column(ix)] = pad.sign;
      if (zrow) zrow[a.column(ix)] = pad.nonzero;
    }
  };
  if (y0 == 0) {
    for (int64_t iy = 0; iy < g.pt; ++iy) start_row(iy, true);
    for (int64_t iy = g.pt + g.h; iy < g.hp; ++iy) start_row(iy, true);
  }

  const int64_t c0 = grp * g.cg + j * kWordBits;
  const int nch = static_cast<int>(std::min<int64_t>(kWordBits, g.cg - j * kWordBits));
  block(p, n, c0, nch, y0, rows, tmp_sign, nonzero ? tmp_nz : nullptr);
  bool saw_zero = false;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t iy = g.pt + y0 + r;
    start_row(iy, false);
    uint64_t* srow = sign + a.row_base(iy, jw);
    uint64_t* zrow = nonzero ? nonzero + a.row_base(iy, jw) : nullptr;
    const uint64_t* ts = tmp_sign + r * g.w;
    const uint64_t* tz = tmp_nz + r * g.w;
    // Scatter columns into their phases, walking (phase, u) instead of dividing per column.
    int64_t phase = g.pl % a.phases;
    int64_t u = g.pl / a.phases;
    for (int64_t x = 0; x < g.w; ++x) {
      const int64_t at = phase * a.row_len + u;
      srow[at] = ts[x];
      if (zrow) {
        zrow[at] = tz[x];
        saw_zero |= (valid & ~tz[x]) != 0;
      }
      if (++phase == a.phases) {
        phase = 0;
        ++u;
      }
    }
  }
  return saw_zero;
}

}  // namespace

namespace {

std::string validate(const Geometry& g) {
  if (g.n < 1 || g.c < 1 || g.h < 1 || g.w < 1 || g.cout < 1) return "empty input or output";
  if (g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1) return "kernel, strides, dilations >= 1";
  if (g.pt < 0 || g.pl < 0 || g.pb < 0 || g.pr < 0) return "pads must be >= 0";
  if (g.group < 1 || g.c % g.group || g.cout % g.group) return "group must divide in and out channels";
  if (g.zero_sign < -1 || g.zero_sign > 1) return "zero_sign must be -1, 0 or 1";
  if (g.pad_value < -1 || g.pad_value > 1) return "pad_value must be -1, 0 or 1";
  if (g.ho < 1 || g.wo < 1) return "the kernel does not fit into the padded input";
  if (g.taps * g.cg >= (int64_t(1) << 31)) return "reduction too long for int32 sums";
  return "";
}

}  // namespace

std::string run(Problem& p, Isa isa, int threads) {
  Geometry& g = p.g;
  derive(g);
  const std::string bad = validate(g);
  if (!bad.empty()) return bad;
  if (p.activation < kActNone || p.activation > kActPrelu) return "activation must be 0 (none), 1 (relu) or 2 (prelu)";
  if (p.activation == kActPrelu && !p.slope) return "prelu needs one slope per output channel";
  p.a = make_layout(g);
  const std::vector<Isa> ok = supported_isas();
  if (std::find(ok.begin(), ok.end(), isa) == ok.end()) return std::string("this CPU or build cannot run ") + isa_name(isa);

  PackBlockFn pack = pack_block_scalar;
  ComputeRowFn compute = compute_row_scalar;
  ComputeRowFn finish = finish_row_scalar;
  // One compute() call: oc_per_item output channels of one of `units` parts of the output (rows;
  // on AMX, see amx_units), then finish() on them (none on AMX, whose compute() finishes its part).
  int64_t oc_per_item = 8, units = g.ho;
  bool amx = false;
#if defined(TOD_BCONV_X86)
  if (isa == Isa::kAmx) {
    compute = compute_row_amx;
    finish = nullptr;
    oc_per_item = kAmxOutChannels;
    units = amx_units(g);
    amx = true;
  } else if (isa == Isa::kAvx512) {
    pack = pack_block_avx512;
    compute = compute_row_avx512;
    finish = finish_row_avx512;
  } else if (isa == Isa::kAvx2) {
    pack = pack_block_avx2;
    compute = compute_row_avx2;
    finish = finish_row_avx2;
  }
#endif

  p.pad_is_zero = g.pad_value == 0 && (g.pt || g.pl || g.pb || g.pr);
  static thread_local Scratch scratch;
  // Weight words (tiles on AMX) are built by the shares, first, 8 output channels per item (16 on AMX).
  int64_t weight_items = g.group * (g.cog_pad / 8);
  if (amx) {
#if defined(TOD_BCONV_X86)
    p.weights_i8 = at_least(scratch.weights_i8, amx_weight_index(g, g.group, 0, 0, 0));
    p.lines = at_least(scratch.lines, 64 * g.n * amx_layout(g).image);
    weight_items = g.group * ceil_div(g.cog, 16);
#endif
  } else {
    const int64_t total = g.n * p.a.image_words();
    p.weights = at_least(scratch.weights, g.group * g.cog_pad * g.taps * g.words);
    p.sign = at_least(scratch.sign, total);
    p.nonzero = g.zero_sign == 0 || p.pad_is_zero ? at_least(scratch.nonzero, total) : nullptr;
  }
  auto prepare_item = [&](int64_t item) {
#if defined(TOD_BCONV_X86)
    if (amx) {
      prepare_weights_amx(p, item / ceil_div(g.cog, 16), item % ceil_div(g.cog, 16));
      return;
    }
#endif
    prepare_weights(p, item / (g.cog_pad / 8), item % (g.cog_pad / 8) * 8);
  };
  // Packs one block of rows of one word; returns whether some activation was 0 (never on AMX,
  // where zeros are int8 zeros and need no care).
  auto pack_item = [&](int64_t n, int64_t jw, int64_t y0, int64_t rows, uint64_t* tmp, uint64_t* tmp_nz) {
#if defined(TOD_BCONV_X86)
    if (amx) {
      pack_rows_amx(p, n, jw, y0, rows, tmp, tmp_nz);
      return false;
    }
#endif
    return pack_rows(p, pack, n, jw, y0, rows, tmp, tmp_nz);
  };

  // Waking a thread costs ~10 us, as much as ~2^20 word operations: small layers run on fewer.
  const int64_t work = g.n * g.cout * g.ho * g.wo * g.taps * g.words + g.n * g.c * g.h * g.w / 8;
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, work >> 20)));
  const int64_t block_rows = rows_per_block(g);
  const int64_t blocks = ceil_div(g.h, block_rows);
  const int64_t span = block_rows * g.w + 32;  // + slack the SIMD packers may write
  // Allocated here: nothing in the shares below allocates or throws, since a share that stopped
  // early would leave the others waiting for the blocks it took.
  uint64_t* temporaries = at_least(scratch.temporaries, 2 * span * workers);
  const bool fused = p.residual || p.activation != kActNone;
  const int64_t otiles = ceil_div(g.cog, oc_per_item);
  const int64_t pack_items = weight_items + g.n * p.a.words * blocks;
  const int64_t items = g.n * g.group * otiles * units;
  std::atomic<int64_t> next_item{0};
  // Taken in guided chunks, half a share's part of what is left, down to 4: neighbouring items read
  // the same input rows and weights, so a share that takes them together reads them once, and the
  // small last chunks leave no share idle for long at the end. (Taken 4 at a time, 64x200x200 ran
  // 1.28 ms on AMX and 1.50 on AVX-512, now 1.05 and 1.34-1.47; 128x100x100 on AVX-512 1.21 -> 1.09.)
  auto grab = [&](int64_t* first) {
    int64_t at = next_item.load();
    int64_t chunk;
    do {
      chunk = std::max<int64_t>(4, (items - at) / (2 * workers));
    } while (at < items && !next_item.compare_exchange_weak(at, at + chunk));
    *first = at;
    return std::min(at + chunk, items);
  };

  // Shares take work as they come: a pool thread wakes tens of microseconds after the caller
  // starts, so a static split would leave the caller waiting for it. Rows are computed once the
  // last packed block is in (its packer publishes whether the input had zeros).
  std::atomic<int64_t> next_block{0}, packed{0};
  std::atomic<bool> saw_zero{false}, all_packed{false};
  run_shares(workers, [&](int t) {
    uint64_t* tmp = temporaries + 2 * span * t;
    for (int64_t next; (next = next_block.fetch_add(1)) < pack_items;) {
      if (next < weight_items) {
        prepare_item(next);
      } else {
        const int64_t item = next - weight_items;
        const int64_t b = item % blocks;
        const int64_t jw = (item / blocks) % p.a.words;
        const int64_t n = item / (blocks * p.a.words);
        const int64_t y0 = b * block_rows;
        if (pack_item(n, jw, y0, std::min(block_rows, g.h - y0), tmp, tmp + span)) saw_zero.store(true);
      }
      if (packed.fetch_add(1) + 1 == pack_items) {
        p.zeros_in_x = g.zero_sign == 0 && saw_zero.load();
        all_packed.store(true);
      }
    }
    while (!all_packed.load()) std::this_thread::yield();
#if defined(TOD_BCONV_X86)
    if (amx) amx_begin();  // the tile configuration is per thread
#endif
    for (int64_t first, last; (last = grab(&first)) > first;) {
      for (int64_t item = first; item < last; ++item) {
        const int64_t unit = item % units;
        const int64_t o0 = (item / units) % otiles * oc_per_item;
        const int64_t grp = (item / (units * otiles)) % g.group;
        const int64_t n = item / (units * otiles * g.group);
        compute(p, n, grp, o0, unit);
        if (fused && finish) finish(p, n, grp, o0, unit);
      }
    }
#if defined(TOD_BCONV_X86)
    if (amx) amx_end();
#endif
  });
  p.weights = p.sign = p.nonzero = nullptr;
  p.weights_i8 = p.lines = nullptr;
  return "";
}

}  // namespace bconv
}  // namespace tod
