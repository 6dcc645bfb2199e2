// Block tiling of the tod::BinaryConv2d CUDA kernel, written as per-thread / per-lane steps.
//
// Why this is a header of TOD_HD functions and not kernel code: no GPU runs the tests, so everything
// the kernel does except the MMA instruction itself (argument decoding, which block owns which
// outputs, binarizing and packing X into shared memory, which bits each lane hands to the MMA,
// where each accumulator lands, the final sum and the fused epilogue) lives here, and the host harness
// (host_check.cpp) executes these same functions thread by thread, with the warp MMA emulated
// from the PTX ISA's fragment tables.
//
// The convolution as a GEMM per group: M = output positions of one image (OH * OW), N = output
// channels of the group, K = the group's flat weight words (tap-major, `words` 64-bit words per
// tap: exactly the W_packed order, so a weight row is contiguous). One block computes a
// kBM x kBN tile of one image and one group; it walks K in chunks of kKC words (256 bits, one
// m16n8k256 step or two m8n8k128 steps), zero-filling past the end of M, N and K, so tails
// need no separate code: zero bits add nothing to any count.
#ifndef TOD_BINARY_CONV2D_TILE_CUH_
#define TOD_BINARY_CONV2D_TILE_CUH_

#include "binary_conv2d_core.h"

namespace tod {
namespace bconv {
namespace tile {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 32;  // output positions per block
constexpr int kBN = 32;  // output channels per block
constexpr int kKC = 4;   // 64-bit words of K per chunk = 256 bits
constexpr int kAccPerLane = 8;
static_assert(kBM * kKC == kThreads && kBN * kKC == kThreads, "one staged word per thread and plane");
static_assert(kWarps * 16 * 16 == kBM * kBN, "each warp owns a 16 x 16 accumulator tile");

// The kernel's int32 extra arguments, in launch order (tod_deploy/trt/kernels.py: KERNEL_INT_ARGS).
// kActivation is an Activation (binary_conv2d_core.h); kHasResidual is 1 when the residual input is
// Y-shaped, 0 when it is the empty tensor that stands for none.
enum ArgIndex {
  kN, kC, kH, kW, kCout, kOH, kOW, kKH, kKW, kStrideH, kStrideW, kPadTop, kPadLeft,
  kDilH, kDilW, kGroup, kZeroSign, kPadValue, kThresholdBits, kActivation, kHasResidual, kArgCount
};

struct Args {
  int32_t v[kArgCount];
  float threshold;
  int32_t cg, cog, words, taps, kwords, chunks, ntiles, positions;
};

TOD_HD float float_from_bits(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  union {
    int32_t i;
    float f;
  } u;
  u.i = bits;
  return u.f;
#endif
}

TOD_HD Args make_args(const int32_t* raw) {
  Args a;
  for (int i = 0; i < kArgCount; ++i) a.v[i] = raw[i];
  a.threshold = float_from_bits(raw[kThresholdBits]);
  a.cg = raw[kC] / raw[kGroup];
  a.cog = raw[kCout] / raw[kGroup];
  a.words = static_cast<int32_t>(words_for(a.cg));
  a.taps = raw[kKH] * raw[kKW];
  a.kwords = a.taps * a.words;
  a.chunks = (a.kwords + kKC - 1) / kKC;
  a.ntiles = (a.cog + kBN - 1) / kBN;
  a.positions = raw[kOH] * raw[kOW];
  return a;
}

// What one block computes: image n, group grp, channel tile ntile, positions p0 .. p0 + kBM - 1.
// Grid (tod_deploy/trt/kernels.py: launch_geometry) = (cdiv(OH * OW, kBM), group * ntiles, N).
struct Block {
  int32_t n, grp, ntile, p0;
};

TOD_HD Block make_block(const Args& a, int32_t bx, int32_t by, int32_t bz) {
  Block b;
  b.n = bz;
  b.grp = by / a.ntiles;
  b.ntile = by % a.ntiles;
  b.p0 = bx * kBM;
  return b;
}

// Shared memory of one block. plane2 is the nonzero plane on the AND path, the zero plane on XOR.
struct Smem {
  uint64_t sign[kBM][kKC];
  uint64_t plane2[kBM][kKC];
  uint64_t weight[kBN][kKC];
  int32_t row_sign[kBM];    // popc(sign) per position over all K so far
  int32_t row_plane2[kBM];  // popc(plane2) per position
  int32_t col_weight[kBN];  // popc(w) per output channel
  int32_t acc_sign[kBM][kBN];    // after the K loop: MMA(sign, w)
  int32_t acc_plane2[kBM][kBN];  // MMA(plane2, w)
};

TOD_HD void init_counts(Smem& s, int tid) {
  if (tid < kBM) s.row_sign[tid] = s.row_plane2[tid] = 0;
  if (tid < kBN) s.col_weight[tid] = 0;
}

// Flat K word q of output position p, binarized from X (or the pad word), and its valid-channel mask.
struct ActWord {
  Bits bits;
  uint64_t valid;
};

TOD_HD ActWord activation_word(const Args& a, const Block& b, const float* x, int32_t p, int32_t q) {
  ActWord out;
  out.bits.sign = out.bits.nonzero = out.valid = 0;
  if (p >= a.positions || q >= a.kwords) return out;
  const int32_t tap = q / a.words, j = q % a.words;
  const int32_t oy = p / a.v[kOW], ox = p % a.v[kOW];
  const int32_t iy = oy * a.v[kStrideH] + (tap / a.v[kKW]) * a.v[kDilH] - a.v[kPadTop];
  const int32_t ix = ox * a.v[kStrideW] + (tap % a.v[kKW]) * a.v[kDilW] - a.v[kPadLeft];
  out.valid = valid_bits(a.cg, j);
  if (iy < 0 || iy >= a.v[kH] || ix < 0 || ix >= a.v[kW]) {
    out.bits = pad_word(a.v[kPadValue], out.valid);
    return out;
  }
  const int64_t plane = int64_t(a.v[kH]) * a.v[kW];
  const int64_t channel = int64_t(b.n) * a.v[kC] + int64_t(b.grp) * a.cg + int64_t(j) * kWordBits;
  const int64_t left = a.cg - int64_t(j) * kWordBits;
  const float* first = x + channel * plane + int64_t(iy) * a.v[kW] + ix;
  out.bits = pack_activation_word(first, plane, left < kWordBits ? left : kWordBits, a.threshold, a.v[kZeroSign]);
  return out;
}

// Flat K word q of the block's output channel column nn (0 past the group's channels or past K).
TOD_HD uint64_t weight_word(const Args& a, const Block& b, const uint8_t* w_packed, int32_t nn, int32_t q) {
  const int32_t o_in_group = b.ntile * kBN + nn;
  if (o_in_group >= a.cog || q >= a.kwords) return 0;
  const int64_t o = int64_t(b.grp) * a.cog + o_in_group;
  return packed_weight_word(w_packed, a.kwords, 1, o, 0, q);  // a weight row is kwords contiguous words
}

// Thread tid stages one activation word (both planes) and one weight word of K chunk `chunk`.
// Consecutive threads take consecutive positions, so X reads coalesce along a row of the image.
TOD_HD void stage(const Args& a, const Block& b, const float* x, const uint8_t* w_packed, int32_t chunk,
                  bool xor_path, int tid, Smem& s) {
  const int m = tid % kBM, ka = tid / kBM;
  const ActWord act = activation_word(a, b, x, b.p0 + m, chunk * kKC + ka);
  s.sign[m][ka] = act.bits.sign;
  s.plane2[m][ka] = xor_path ? zero_bits(act.bits, act.valid) : act.bits.nonzero;
  const int nn = tid / kKC, kw = tid % kKC;
  s.weight[nn][kw] = weight_word(a, b, w_packed, nn, chunk * kKC + kw);
}

// After staging: the per-position and per-channel counts the sum identities need.
TOD_HD void count(int tid, Smem& s) {
  if (tid < kBM) {
    for (int k = 0; k < kKC; ++k) {
      s.row_sign[tid] += popcount64(s.sign[tid][k]);
      s.row_plane2[tid] += popcount64(s.plane2[tid][k]);
    }
  }
  if (tid < kBN) {
    for (int k = 0; k < kKC; ++k) s.col_weight[tid] += popcount64(s.weight[tid][k]);
  }
}

// --- MMA fragments (PTX ISA, "Matrix Fragments for mma.m16n8k256" / "mma.m8n8k128", .b1) ---
// A is row-major [positions][K bits], B column-major [K bits][channels]: a staged word row is
// exactly an A row or a B column. Element i of a .b32 fragment register is bit i; K bit k of a
// staged row is bit k % 64 of word k / 64, so 32 consecutive K bits are one half of a word.
// Warp w owns accumulator rows (w & 1) * 16 .. + 15 and columns (w >> 1) * 16 .. + 15.

TOD_HD int warp_m0(int warp) { return (warp & 1) * 16; }
TOD_HD int warp_n0(int warp) { return (warp >> 1) * 16; }

TOD_HD uint32_t half_word(uint64_t w, int half) { return static_cast<uint32_t>(w >> (32 * half)); }

// m16n8k256 (sm_80+): a_i row = g (+8 for registers 1 and 3), K bits t*32 .. +31 (+128 for registers
// 2 and 3); b_i K bits t*32 .. +31 (+128 for register 1), column g. g = lane >> 2, t = lane & 3.
struct FragK256 {
  uint32_t a_sign[4], a_plane2[4];
  uint32_t b[2][2];  // two 8-channel column tiles
};

TOD_HD void load_a_k256(const uint64_t (*plane)[kKC], int m0, int lane, uint32_t a[4]) {
  const int g = lane >> 2, t = lane & 3;
  const int word = t >> 1, half = t & 1;
  a[0] = half_word(plane[m0 + g][word], half);
  a[1] = half_word(plane[m0 + g + 8][word], half);
  a[2] = half_word(plane[m0 + g][2 + word], half);
  a[3] = half_word(plane[m0 + g + 8][2 + word], half);
}

TOD_HD void load_b_k256(const uint64_t (*weight)[kKC], int n0, int lane, uint32_t b[2]) {
  const int g = lane >> 2, t = lane & 3;
  b[0] = half_word(weight[n0 + g][t >> 1], t & 1);
  b[1] = half_word(weight[n0 + g][2 + (t >> 1)], t & 1);
}

TOD_HD void fragments_k256(const Smem& s, int warp, int lane, FragK256& f) {
  load_a_k256(s.sign, warp_m0(warp), lane, f.a_sign);
  load_a_k256(s.plane2, warp_m0(warp), lane, f.a_plane2);
  for (int ns = 0; ns < 2; ++ns) load_b_k256(s.weight, warp_n0(warp) + 8 * ns, lane, f.b[ns]);
}

// First accumulator slot of 8-channel tile ns: a lane's c_0 .. c_3 of that MMA are slots +0 .. +3.
TOD_HD int acc_slot_k256(int ns) { return 4 * ns; }

// Accumulator slot idx = acc_slot_k256(ns) + i: c_i row g (+8 for i >= 2), column t*2 + (i & 1).
TOD_HD void acc_coord_k256(int warp, int lane, int idx, int& m, int& nn) {
  const int ns = idx / 4, i = idx % 4;
  m = warp_m0(warp) + (lane >> 2) + (i >= 2 ? 8 : 0);
  nn = warp_n0(warp) + 8 * ns + (lane & 3) * 2 + (i & 1);
}

// m8n8k128 (sm_75): a row g, K bits t*32 .. +31; b K bits t*32 .. +31, column g; c_i row g,
// column t*2 + i. A 256-bit chunk is two K steps; the warp's 16 x 16 tile is 2 x 2 MMA tiles.
struct FragK128 {
  uint32_t a_sign[2], a_plane2[2];  // two 8-position row tiles
  uint32_t b[2];                    // two 8-channel column tiles
};

TOD_HD void fragments_k128(const Smem& s, int warp, int lane, int kstep, FragK128& f) {
  const int g = lane >> 2, t = lane & 3;
  const int word = kstep * 2 + (t >> 1), half = t & 1;
  for (int ms = 0; ms < 2; ++ms) {
    f.a_sign[ms] = half_word(s.sign[warp_m0(warp) + 8 * ms + g][word], half);
    f.a_plane2[ms] = half_word(s.plane2[warp_m0(warp) + 8 * ms + g][word], half);
  }
  for (int ns = 0; ns < 2; ++ns) f.b[ns] = half_word(s.weight[warp_n0(warp) + 8 * ns + g][word], half);
}

// First accumulator slot of MMA tile (ms, ns): a lane's c_0, c_1 of that MMA are slots +0, +1.
TOD_HD int acc_slot_k128(int ms, int ns) { return (ms * 2 + ns) * 2; }

// Accumulator slot idx = acc_slot_k128(ms, ns) + i.
TOD_HD void acc_coord_k128(int warp, int lane, int idx, int& m, int& nn) {
  const int tile = idx / 2, i = idx % 2;
  m = warp_m0(warp) + 8 * (tile / 2) + (lane >> 2);
  nn = warp_n0(warp) + 8 * (tile % 2) + (lane & 3) * 2 + i;
}

// One lane's accumulators: MMA(sign, w) and MMA(plane2, w), in the slot order of its path.
struct WarpAcc {
  int32_t sign[kAccPerLane];
  int32_t plane2[kAccPerLane];
};

TOD_HD void clear(WarpAcc& acc) {
  for (int i = 0; i < kAccPerLane; ++i) acc.sign[i] = acc.plane2[i] = 0;
}

TOD_HD void store_acc(const WarpAcc& acc, bool xor_path, int warp, int lane, Smem& s) {
  for (int idx = 0; idx < kAccPerLane; ++idx) {
    int m = 0, nn = 0;
    if (xor_path) {
      acc_coord_k128(warp, lane, idx, m, nn);
    } else {
      acc_coord_k256(warp, lane, idx, m, nn);
    }
    s.acc_sign[m][nn] = acc.sign[idx];
    s.acc_plane2[m][nn] = acc.plane2[idx];
  }
}

// The integer sum of tile element (m, nn), by the identity of the path (binary_conv2d_core.h).
TOD_HD int32_t tile_sum(const Args& a, bool xor_path, const Smem& s, int m, int nn) {
  if (xor_path) {
    return sum_from_xor(int64_t(a.taps) * a.cg, s.col_weight[nn], s.acc_sign[m][nn], s.acc_plane2[m][nn]);
  }
  return sum_from_and(s.row_plane2[m], s.row_sign[m], s.acc_plane2[m][nn], s.acc_sign[m][nn]);
}

// Output channel and flat Y index of tile element (m, nn); false past the tile's real outputs.
TOD_HD bool output_slot(const Args& a, const Block& b, int m, int nn, int32_t& o, int64_t& index) {
  const int32_t p = b.p0 + m, o_in_group = b.ntile * kBN + nn;
  if (p >= a.positions || o_in_group >= a.cog) return false;
  o = b.grp * a.cog + o_in_group;
  index = (int64_t(b.n) * a.v[kCout] + o) * a.positions + p;
  return true;
}

// Y of output channel o at flat index `index` from its integer sum: alpha * S + bias, plus the residual,
// then the activation (op version 2, binary_conv2d_core.h). residual and slope are read only when
// present (has_residual; activation prelu): an absent one is an empty tensor whose pointer may be null.
TOD_HD float output_value(const Args& a, int32_t s, int32_t o, int64_t index, const float* alpha, const float* bias,
                          const float* residual, const float* slope) {
  float y = epilogue(s, alpha[o], bias[o]);
  if (a.v[kHasResidual]) y = add_residual(y, residual[index]);
  const int32_t activation = a.v[kActivation];
  return activate(y, activation, activation == kActPrelu ? slope[o] : 0.0f);
}

// Epilogue element e (0 .. kBM * kBN / kThreads - 1) of thread tid: consecutive threads write
// consecutive positions of one output channel, so stores coalesce.
TOD_HD void epilogue_element(int tid, int e, int& m, int& nn) {
  const int idx = e * kThreads + tid;
  m = idx % kBM;
  nn = idx / kBM;
}

constexpr int kEpilogueElements = kBM * kBN / kThreads;

}  // namespace tile
}  // namespace bconv
}  // namespace tod

#endif  // TOD_BINARY_CONV2D_TILE_CUH_
