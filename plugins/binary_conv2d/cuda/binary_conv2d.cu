// tod::BinaryConv2d CUDA kernel: one extern "C" entry point, compiled to PTX for TensorRT 11's
// Python AOT plugin (tod_deploy/trt/kernels.py builds it and computes the launch).
//
// Why one kernel with int32 arguments: the AOT launcher runs exactly one kernel per plugin, passes
// (input pointers..., extra int args..., output pointers...), and does not serialize plugin
// attributes, so every attribute arrives as an int32 (the threshold as its IEEE bit pattern).
//
// The block tiling, activation packing, fragment loads and fused epilogue are TOD_HD functions in
// binary_conv2d_tile.cuh that the host tests run; only the MMA instruction is device-only. The
// tensor-core path is chosen at compile time, the launch geometry is the same on every arch:
//   sm_80+ (incl. sm_87, sm_90): mma m16n8k256 b1 AND+popc; sm_90 has no native XOR b1 MMA.
//   sm_75: mma m8n8k128 b1 XOR+popc (the only b1 shape and op Turing has).
#include "binary_conv2d_tile.cuh"

using namespace tod::bconv;
using namespace tod::bconv::tile;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
constexpr bool kXorPath = false;

__device__ __forceinline__ void mma_and_k256(int32_t* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One 256-bit K chunk of the warp's 16 x 16 tile: two 8-channel tiles, each against both planes.
__device__ __forceinline__ void warp_chunk(const Smem& s, int warp, int lane, WarpAcc& acc) {
  FragK256 f;
  fragments_k256(s, warp, lane, f);
  for (int ns = 0; ns < 2; ++ns) {
    mma_and_k256(acc.sign + acc_slot_k256(ns), f.a_sign, f.b[ns]);
    mma_and_k256(acc.plane2 + acc_slot_k256(ns), f.a_plane2, f.b[ns]);
  }
}

#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
constexpr bool kXorPath = true;

__device__ __forceinline__ void mma_xor_k128(int32_t* c, uint32_t a, uint32_t b) {
  asm volatile(
      "mma.sync.aligned.m8n8k128.row.col.s32.b1.b1.s32.xor.popc "
      "{%0, %1}, {%2}, {%3}, {%0, %1};\n"
      : "+r"(c[0]), "+r"(c[1])
      : "r"(a), "r"(b));
}

// One 256-bit K chunk = two K steps of the warp's 2 x 2 MMA tiles, each against both planes.
__device__ __forceinline__ void warp_chunk(const Smem& s, int warp, int lane, WarpAcc& acc) {
  for (int kstep = 0; kstep < 2; ++kstep) {
    FragK128 f;
    fragments_k128(s, warp, lane, kstep, f);
    for (int ms = 0; ms < 2; ++ms) {
      for (int ns = 0; ns < 2; ++ns) {
        const int slot = acc_slot_k128(ms, ns);
        mma_xor_k128(acc.sign + slot, f.a_sign[ms], f.b[ns]);
        mma_xor_k128(acc.plane2 + slot, f.a_plane2[ms], f.b[ns]);
      }
    }
  }
}

#elif defined(__CUDA_ARCH__)
#error "tod_binary_conv2d needs b1 tensor cores: compile for sm_75 or newer"
#endif

// residual (Y-shaped, or an empty tensor when has_residual is 0) and slope (Cout values when activation
// is prelu, else empty) are the op's version-2 epilogue inputs; an empty one is never read.
extern "C" __global__ void __launch_bounds__(kThreads)
    tod_binary_conv2d(const float* __restrict__ x, const uint8_t* __restrict__ w_packed,
                      const float* __restrict__ alpha, const float* __restrict__ bias,
                      const float* __restrict__ residual, const float* __restrict__ slope, int32_t n, int32_t c,
                      int32_t h, int32_t w, int32_t cout, int32_t oh, int32_t ow, int32_t kh, int32_t kw,
                      int32_t stride_h, int32_t stride_w, int32_t pad_top, int32_t pad_left, int32_t dil_h,
                      int32_t dil_w, int32_t group, int32_t zero_sign, int32_t pad_value, int32_t threshold_bits,
                      int32_t activation, int32_t has_residual, float* __restrict__ y) {
  __shared__ Smem smem;
  const int32_t raw[kArgCount] = {n,        c,        h,       w,     cout,  oh,        ow,        kh,
                                  kw,       stride_h, stride_w, pad_top, pad_left, dil_h, dil_w, group,
                                  zero_sign, pad_value, threshold_bits, activation, has_residual};
  const Args args = make_args(raw);
  const Block blk = make_block(args, blockIdx.x, blockIdx.y, blockIdx.z);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  init_counts(smem, tid);
  WarpAcc acc;
  clear(acc);
  for (int32_t chunk = 0; chunk < args.chunks; ++chunk) {
    __syncthreads();  // the previous chunk's fragments are read
    stage(args, blk, x, w_packed, chunk, kXorPath, tid, smem);
    __syncthreads();
    count(tid, smem);
    __syncwarp();  // mma.sync.aligned: the whole warp, converged after count's branches
    warp_chunk(smem, warp, lane, acc);
  }
  store_acc(acc, kXorPath, warp, lane, smem);
  __syncthreads();
  for (int e = 0; e < kEpilogueElements; ++e) {
    int m = 0, nn = 0;
    epilogue_element(tid, e, m, nn);
    int32_t o = 0;
    int64_t index = 0;
    if (output_slot(args, blk, m, nn, o, index)) {
      y[index] = output_value(args, tile_sum(args, kXorPath, smem, m, nn), o, index, alpha, bias, residual, slope);
    }
  }
}
