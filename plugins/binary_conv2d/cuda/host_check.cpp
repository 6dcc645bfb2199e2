// Host harness for the CUDA kernel's arithmetic (tests/test_cuda_kernel.py compiles and loads it).
//
// Why: there is no GPU here, so the kernel cannot run. This file runs the kernel's own TOD_HD
// steps (binary_conv2d_tile.cuh) block by block and thread by thread, in the kernel's order and
// with its barriers, and replaces only the warp MMA instruction by an emulation written from the
// PTX ISA's fragment tables (independently of the loaders in the tile header, so a loader that
// puts bits in the wrong lane or register gives wrong sums here too).
#include <stdint.h>

#include <vector>

#include "binary_conv2d_tile.cuh"

using namespace tod::bconv;
using namespace tod::bconv::tile;

namespace {

constexpr int kLanes = 32;

TOD_HD int bit(uint32_t reg, int i) { return static_cast<int>((reg >> i) & 1u); }

// mma.m16n8k256.row.col.s32.b1.b1.s32.and.popc, per PTX ISA "Matrix Fragments for mma.m16n8k256":
//   A: row = g for a_i, 0 <= i < 32 or 64 <= i < 96, else g + 8;
//      col = t*32 + (i & 31) for i < 64, t*32 + (i & 31) + 128 for i >= 64
//   B: row = t*32 + (i & 31) for i < 32, + 128 for i >= 32; col = g
//   C: row = g for i < 2, g + 8 for i >= 2; col = t*2 + (i & 1)
// Returns false if the table does not cover every matrix element exactly once.
bool mma_k256_and(const uint32_t a[kLanes][4], const uint32_t b[kLanes][2], int32_t c[kLanes][4]) {
  int A[16][256], B[256][8], seen_a[16][256] = {}, seen_b[256][8] = {};
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 128; ++i) {
      const int row = (i < 32 || (i >= 64 && i < 96)) ? g : g + 8;
      const int col = i < 64 ? t * 32 + (i & 31) : t * 32 + (i & 31) + 128;
      A[row][col] = bit(a[lane][i / 32], i % 32);
      ++seen_a[row][col];
    }
    for (int i = 0; i < 64; ++i) {
      const int row = i < 32 ? t * 32 + (i & 31) : t * 32 + (i & 31) + 128;
      B[row][g] = bit(b[lane][i / 32], i % 32);
      ++seen_b[row][g];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 256; ++k)
      if (seen_a[r][k] != 1) return false;
  for (int k = 0; k < 256; ++k)
    for (int col = 0; col < 8; ++col)
      if (seen_b[k][col] != 1) return false;
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
      for (int k = 0; k < 256; ++k) c[lane][i] += A[row][k] & B[k][col];
    }
  }
  return true;
}

// mma.m8n8k128.row.col.s32.b1.b1.s32.xor.popc, per PTX ISA "Matrix Fragments for mma.m8n8k128":
//   A: row = g, col = t*32 + i;  B: row = t*32 + i, col = g;  C: row = g, col = t*2 + i.
bool mma_k128_xor(const uint32_t a[kLanes], const uint32_t b[kLanes], int32_t c[kLanes][2]) {
  int A[8][128], B[128][8], seen_a[8][128] = {}, seen_b[128][8] = {};
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 32; ++i) {
      A[g][t * 32 + i] = bit(a[lane], i);
      ++seen_a[g][t * 32 + i];
      B[t * 32 + i][g] = bit(b[lane], i);
      ++seen_b[t * 32 + i][g];
    }
  }
  for (int r = 0; r < 8; ++r)
    for (int k = 0; k < 128; ++k)
      if (seen_a[r][k] != 1 || seen_b[k][r] != 1) return false;
  for (int lane = 0; lane < kLanes; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 2; ++i)
      for (int k = 0; k < 128; ++k) c[lane][i] += A[g][k] ^ B[k][t * 2 + i];
  }
  return true;
}

// The device's warp_chunk for one warp, all lanes at once.
bool warp_chunk_and(const Smem& s, int warp, WarpAcc acc[kLanes]) {
  FragK256 f[kLanes];
  for (int lane = 0; lane < kLanes; ++lane) fragments_k256(s, warp, lane, f[lane]);
  for (int ns = 0; ns < 2; ++ns) {
    uint32_t a_sign[kLanes][4], a_plane2[kLanes][4], b[kLanes][2];
    int32_t c_sign[kLanes][4], c_plane2[kLanes][4];
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int r = 0; r < 4; ++r) {
        a_sign[lane][r] = f[lane].a_sign[r];
        a_plane2[lane][r] = f[lane].a_plane2[r];
        c_sign[lane][r] = acc[lane].sign[acc_slot_k256(ns) + r];
        c_plane2[lane][r] = acc[lane].plane2[acc_slot_k256(ns) + r];
      }
      for (int r = 0; r < 2; ++r) b[lane][r] = f[lane].b[ns][r];
    }
    if (!mma_k256_and(a_sign, b, c_sign) || !mma_k256_and(a_plane2, b, c_plane2)) return false;
    for (int lane = 0; lane < kLanes; ++lane) {
      for (int r = 0; r < 4; ++r) {
        acc[lane].sign[acc_slot_k256(ns) + r] = c_sign[lane][r];
        acc[lane].plane2[acc_slot_k256(ns) + r] = c_plane2[lane][r];
      }
    }
  }
  return true;
}

bool warp_chunk_xor(const Smem& s, int warp, WarpAcc acc[kLanes]) {
  for (int kstep = 0; kstep < 2; ++kstep) {
    FragK128 f[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) fragments_k128(s, warp, lane, kstep, f[lane]);
    for (int ms = 0; ms < 2; ++ms) {
      for (int ns = 0; ns < 2; ++ns) {
        const int slot = acc_slot_k128(ms, ns);
        uint32_t a_sign[kLanes], a_plane2[kLanes], b[kLanes];
        int32_t c_sign[kLanes][2], c_plane2[kLanes][2];
        for (int lane = 0; lane < kLanes; ++lane) {
          a_sign[lane] = f[lane].a_sign[ms];
          a_plane2[lane] = f[lane].a_plane2[ms];
          b[lane] = f[lane].b[ns];
          for (int i = 0; i < 2; ++i) {
            c_sign[lane][i] = acc[lane].sign[slot + i];
            c_plane2[lane][i] = acc[lane].plane2[slot + i];
          }
        }
        if (!mma_k128_xor(a_sign, b, c_sign) || !mma_k128_xor(a_plane2, b, c_plane2)) return false;
        for (int lane = 0; lane < kLanes; ++lane) {
          for (int i = 0; i < 2; ++i) {
            acc[lane].sign[slot + i] = c_sign[lane][i];
            acc[lane].plane2[slot + i] = c_plane2[lane][i];
          }
        }
      }
    }
  }
  return true;
}

// One thread block of the kernel, its threads run one after another between barriers.
bool run_block(const Args& args, const Block& blk, const float* x, const uint8_t* w_packed, const float* alpha,
               const float* bias, const float* residual, const float* slope, bool xor_path, float* y, int32_t* sums) {
  Smem smem;
  WarpAcc acc[kWarps][kLanes];
  for (int tid = 0; tid < kThreads; ++tid) {
    init_counts(smem, tid);
    clear(acc[tid / kLanes][tid % kLanes]);
  }
  for (int32_t chunk = 0; chunk < args.chunks; ++chunk) {
    for (int tid = 0; tid < kThreads; ++tid) stage(args, blk, x, w_packed, chunk, xor_path, tid, smem);
    for (int tid = 0; tid < kThreads; ++tid) count(tid, smem);
    for (int warp = 0; warp < kWarps; ++warp) {
      if (!(xor_path ? warp_chunk_xor(smem, warp, acc[warp]) : warp_chunk_and(smem, warp, acc[warp]))) return false;
    }
  }
  for (int tid = 0; tid < kThreads; ++tid) {
    store_acc(acc[tid / kLanes][tid % kLanes], xor_path, tid / kLanes, tid % kLanes, smem);
  }
  for (int tid = 0; tid < kThreads; ++tid) {
    for (int e = 0; e < kEpilogueElements; ++e) {
      int m = 0, nn = 0;
      epilogue_element(tid, e, m, nn);
      int32_t o = 0;
      int64_t index = 0;
      if (output_slot(args, blk, m, nn, o, index)) {
        const int32_t s = tile_sum(args, xor_path, smem, m, nn);
        sums[index] = s;
        y[index] = output_value(args, s, o, index, alpha, bias, residual, slope);
      }
    }
  }
  return true;
}

}  // namespace

extern "C" {

// The kernel's per-block arithmetic on a grid of blocks (grid from tod_deploy.trt.kernels.launch_geometry).
// path 0: AND / m16n8k256 (sm_80+), 1: XOR / m8n8k128 (sm_75). Returns 0, or -1 for a bad fragment table.
// residual and slope are the kernel's: null when absent (the kernel must then not read them).
int tod_emulate_kernel(const float* x, const uint8_t* w_packed, const float* alpha, const float* bias,
                       const float* residual, const float* slope, const int32_t* raw_args, int path, int32_t gx,
                       int32_t gy, int32_t gz, float* y, int32_t* sums) {
  const Args args = make_args(raw_args);
  for (int32_t bz = 0; bz < gz; ++bz)
    for (int32_t by = 0; by < gy; ++by)
      for (int32_t bx = 0; bx < gx; ++bx)
        if (!run_block(args, make_block(args, bx, by, bz), x, w_packed, alpha, bias, residual, slope, path == 1, y,
                       sums))
          return -1;
  return 0;
}

// The direct form S = popc(n) - 2 * popc((s ^ w) & n) over the same packed words, one output at a
// time with no tiling: separates a packing error from a tiling or fragment error.
void tod_direct_sums(const float* x, const uint8_t* w_packed, const int32_t* raw_args, int32_t* sums) {
  const Args args = make_args(raw_args);
  for (int32_t n = 0; n < args.v[kN]; ++n) {
    for (int32_t o = 0; o < args.v[kCout]; ++o) {
      Block blk;
      blk.n = n;
      blk.grp = o / args.cog;
      blk.ntile = 0;
      blk.p0 = 0;
      for (int32_t p = 0; p < args.positions; ++p) {
        int64_t count_n = 0, disagree = 0;
        for (int32_t q = 0; q < args.kwords; ++q) {
          const Bits b = activation_word(args, blk, x, p, q).bits;
          const uint64_t w = packed_weight_word(w_packed, args.kwords, 1, o, 0, q);
          count_n += popcount64(b.nonzero);
          disagree += popcount64((b.sign ^ w) & b.nonzero);
        }
        sums[(int64_t(n) * args.v[kCout] + o) * args.positions + p] = static_cast<int32_t>(count_n - 2 * disagree);
      }
    }
  }
}

// The two sum identities on raw words, for property tests of the algebra itself.
int32_t tod_sum_and_words(const uint64_t* sign, const uint64_t* nonzero, const uint64_t* w, int32_t count) {
  int64_t pop_n = 0, pop_s = 0, pop_nw = 0, pop_sw = 0;
  for (int32_t i = 0; i < count; ++i) {
    pop_n += popcount64(nonzero[i]);
    pop_s += popcount64(sign[i]);
    pop_nw += popcount64(nonzero[i] & w[i]);
    pop_sw += popcount64(sign[i] & w[i]);
  }
  return sum_from_and(pop_n, pop_s, pop_nw, pop_sw);
}

int32_t tod_sum_xor_words(const uint64_t* sign, const uint64_t* nonzero, const uint64_t* valid, const uint64_t* w,
                          int32_t count) {
  int64_t valid_count = 0, pop_w = 0, pop_sw = 0, pop_zw = 0;
  for (int32_t i = 0; i < count; ++i) {
    Bits b;
    b.sign = sign[i];
    b.nonzero = nonzero[i];
    valid_count += popcount64(valid[i]);
    pop_w += popcount64(w[i]);
    pop_sw += popcount64(sign[i] ^ w[i]);
    pop_zw += popcount64(zero_bits(b, valid[i]) ^ w[i]);
  }
  return sum_from_xor(valid_count, pop_w, pop_sw, pop_zw);
}

int32_t tod_kernel_arg_count() { return kArgCount; }

}  // extern "C"
