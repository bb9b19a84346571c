// INT4 basis storage for Q-GaLore: pack, unpack, quantize, dequantize, and the fused
// dequantize-and-project (P^T G, G Q^T) with its project-back (P N, N Q).
//
// No torch header here (csrc/README.md: CI compiles every .cu with the plain nvcc next to a
// CPU wheel of torch): the kernels take raw pointers and a cudaStream_t; csrc/int4_ops.cpp checks
// the tensors and registers these launchers as the CUDA kernels of the lowrank_optim ops.
//
// Layout (lowrank_optim/kernels/reference.py): a tensor is flattened, cut into groups of
// group_size consecutive elements (a group may span rows), element e has its code in the low
// nibble of byte e/2 when e is even and in the high nibble when odd, and decodes to
// scales[g] * (code - zeros[g]) with g = e / group_size.  Quantization widens each group's
// range to contain 0, so the zero padding of the last group never changes a scale.
//
// Every float operation below is the one the reference performs on a CUDA tensor, in the
// same order and with round-to-nearest-even (rintf is torch.round; __fdiv_rn / __fmul_rn
// forbid fast-math and FMA contractions), so codes, scales and zero points are bit-identical
// to the default kernel on the same device.  One CUDA-specific detail: torch divides a CUDA
// tensor by a Python number as a multiplication by the number's fp32 reciprocal
// (ATen/native/cuda/BinaryDivTrueKernel.cu), hence the scale's `* (1 / 15)`; on CPU torch
// divides, so a CPU and a CUDA quantization may differ by one ulp of a scale.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lowrank_optim {
namespace cuda {

// The element types of the dense operands (the same declaration is in int4_ops.cpp; the
// launchers have C++ linkage, so a drift between the two is an undefined symbol at load,
// not a silent mismatch).
enum class FloatType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

namespace {

constexpr float kLevels = 15.0f;   // reference.INT4_LEVELS
constexpr float kMinRange = 1e-5f; // reference.MIN_RANGE
constexpr int kThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for an element-wise kernel with a grid-stride loop; capped well below the grid limit.
unsigned int elementwise_blocks(int64_t n) {
  const int64_t blocks = ceil_div(n, kThreads);
  return static_cast<unsigned int>(blocks < 65536 ? blocks : 65536);
}

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// ------------------------------------------------------------------------ pack / unpack
__global__ void pack_kernel(const uint8_t* __restrict__ codes, uint8_t* __restrict__ packed, int64_t numel) {
  const int64_t bytes = (numel + 1) / 2;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < bytes; b += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t low = codes[2 * b];
    const uint8_t high = (2 * b + 1 < numel) ? codes[2 * b + 1] : uint8_t(0);
    // As the reference: no masking of the low code, the high one shifted within a byte.
    packed[b] = static_cast<uint8_t>(low | (high << 4));
  }
}

__device__ __forceinline__ uint8_t code_at(const uint8_t* __restrict__ packed, int64_t e) {
  const uint8_t byte = packed[e >> 1];
  return (e & 1) ? uint8_t(byte >> 4) : uint8_t(byte & 0x0F);
}

__global__ void unpack_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ codes, int64_t numel) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < numel; e += int64_t(gridDim.x) * blockDim.x)
    codes[e] = code_at(packed, e);
}

// ------------------------------------------------------------------------ quantize
// Pass 1: one block per group reduces its min and max (starting from 0 is the reference's
// clamp of the range to contain 0, and covers the zero padding) into scale and zero point.
template <typename T>
__global__ void group_range_kernel(const T* __restrict__ x, int64_t numel, int64_t group_size,
                                   float* __restrict__ scales, uint8_t* __restrict__ zeros) {
  __shared__ float lows[kThreads];
  __shared__ float highs[kThreads];
  const int64_t g = blockIdx.x;
  const int64_t begin = g * group_size;
  const int64_t end = begin + group_size < numel ? begin + group_size : numel;
  float low = 0.0f, high = 0.0f;
  for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) {
    const float v = to_float(x[e]);
    low = fminf(low, v);
    high = fmaxf(high, v);
  }
  lows[threadIdx.x] = low;
  highs[threadIdx.x] = high;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      lows[threadIdx.x] = fminf(lows[threadIdx.x], lows[threadIdx.x + stride]);
      highs[threadIdx.x] = fmaxf(highs[threadIdx.x], highs[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float scale = __fmul_rn(fmaxf(__fsub_rn(highs[0], lows[0]), kMinRange), 1.0f / kLevels);
    const float zero = fminf(fmaxf(-rintf(__fdiv_rn(lows[0], scale)), 0.0f), kLevels);
    scales[g] = scale;
    zeros[g] = static_cast<uint8_t>(zero);
  }
}

template <typename T>
__device__ __forceinline__ uint8_t quantize_one(const T* __restrict__ x, int64_t e, int64_t group_size,
                                                const float* __restrict__ scales, const uint8_t* __restrict__ zeros) {
  const int64_t g = e / group_size;
  const float q = __fadd_rn(rintf(__fdiv_rn(to_float(x[e]), scales[g])), float(zeros[g]));
  return static_cast<uint8_t>(fminf(fmaxf(q, 0.0f), kLevels));
}

// Pass 2: one thread per byte, so the two codes of a byte may come from two groups (an odd
// group_size) without a race on the byte.
template <typename T>
__global__ void quantize_pack_kernel(const T* __restrict__ x, int64_t numel, int64_t group_size,
                                     const float* __restrict__ scales, const uint8_t* __restrict__ zeros,
                                     uint8_t* __restrict__ packed) {
  const int64_t bytes = (numel + 1) / 2;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < bytes; b += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t low = quantize_one(x, 2 * b, group_size, scales, zeros);
    const uint8_t high = (2 * b + 1 < numel) ? quantize_one(x, 2 * b + 1, group_size, scales, zeros) : uint8_t(0);
    packed[b] = static_cast<uint8_t>(low | (high << 4));
  }
}

// ------------------------------------------------------------------------ dequantize
struct Int4Matrix {
  const uint8_t* packed;
  const float* scales;
  const uint8_t* zeros;
  int64_t cols;
  int64_t group_size;

  __device__ __forceinline__ float flat(int64_t e) const {
    const int64_t g = e / group_size;
    return __fmul_rn(__fsub_rn(float(code_at(packed, e)), float(zeros[g])), scales[g]);
  }
  __device__ __forceinline__ float at(int64_t i, int64_t j) const { return flat(i * cols + j); }
};

template <typename T>
__global__ void dequantize_kernel(Int4Matrix q, int64_t numel, T* __restrict__ out) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < numel; e += int64_t(gridDim.x) * blockDim.x)
    out[e] = from_float<T>(q.flat(e));
}

// ------------------------------------------------------------------------ fused projection
// C (M x N) = A (M x K) B (K x N), one operand a dense row-major matrix and the other the
// INT4 basis (or its transpose).  Classic shared-memory tiling: each block owns a
// kTileM x kTileN tile of C, walks K in slices of kTileK, and each thread accumulates a
// kWork x kWork sub-tile in fp32 registers.  The basis is dequantized while its slice is
// copied into shared memory, so the dense basis never exists in global memory.
constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kWork = 4;
constexpr int kGemmThreads = (kTileM / kWork) * (kTileN / kWork);  // 256
static_assert(kTileM * kTileK % kGemmThreads == 0 && kTileK * kTileN % kGemmThreads == 0, "tile loads");

template <typename T, bool kBasisIsA, bool kTransposeBasis>
__global__ void __launch_bounds__(kGemmThreads)
int4_gemm_kernel(const T* __restrict__ dense, Int4Matrix basis, T* __restrict__ out, int64_t M, int64_t N, int64_t K) {
  // A slice stored k-major (a_tile[k][m]) so the inner loop reads both tiles along a row.
  __shared__ float a_tile[kTileK][kTileM];
  __shared__ float b_tile[kTileK][kTileN];
  const int tid = threadIdx.x;
  const int tx = tid % (kTileN / kWork);
  const int ty = tid / (kTileN / kWork);
  const int64_t m0 = int64_t(blockIdx.y) * kTileM;
  const int64_t n0 = int64_t(blockIdx.x) * kTileN;
  float acc[kWork][kWork] = {};

  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    // Consecutive threads take consecutive k (A) / n (B): coalesced reads of the dense
    // operand when it is row-major in that index, and of the packed codes of an
    // untransposed basis.
#pragma unroll
    for (int s = 0; s < kTileM * kTileK / kGemmThreads; ++s) {
      const int idx = tid + s * kGemmThreads;
      const int mm = idx / kTileK, kk = idx % kTileK;
      const int64_t m = m0 + mm, k = k0 + kk;
      float v = 0.0f;
      if (m < M && k < K) {
        if (kBasisIsA) v = kTransposeBasis ? basis.at(k, m) : basis.at(m, k);
        else v = to_float(dense[m * K + k]);
      }
      a_tile[kk][mm] = v;
    }
#pragma unroll
    for (int s = 0; s < kTileK * kTileN / kGemmThreads; ++s) {
      const int idx = tid + s * kGemmThreads;
      const int kk = idx / kTileN, nn = idx % kTileN;
      const int64_t k = k0 + kk, n = n0 + nn;
      float v = 0.0f;
      if (k < K && n < N) {
        if (kBasisIsA) v = to_float(dense[k * N + n]);
        else v = kTransposeBasis ? basis.at(n, k) : basis.at(k, n);
      }
      b_tile[kk][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[kWork], b[kWork];
      // Strided sub-tile (rows ty, ty + 16, ...): neighbouring threads read neighbouring words.
#pragma unroll
      for (int i = 0; i < kWork; ++i) a[i] = a_tile[kk][ty + i * (kTileM / kWork)];
#pragma unroll
      for (int j = 0; j < kWork; ++j) b[j] = b_tile[kk][tx + j * (kTileN / kWork)];
#pragma unroll
      for (int i = 0; i < kWork; ++i)
#pragma unroll
        for (int j = 0; j < kWork; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kWork; ++i) {
    const int64_t m = m0 + ty + i * (kTileM / kWork);
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < kWork; ++j) {
      const int64_t n = n0 + tx + j * (kTileN / kWork);
      if (n < N) out[m * N + n] = from_float<T>(acc[i][j]);
    }
  }
}

template <typename T, bool kBasisIsA, bool kTransposeBasis>
cudaError_t launch_gemm(const void* dense, Int4Matrix basis, void* out, int64_t M, int64_t N, int64_t K,
                        cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const int64_t tiles_m = ceil_div(M, kTileM), tiles_n = ceil_div(N, kTileN);
  if (tiles_m > 65535 || tiles_n > 2147483647) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(tiles_n), static_cast<unsigned int>(tiles_m));
  int4_gemm_kernel<T, kBasisIsA, kTransposeBasis><<<grid, kGemmThreads, 0, stream>>>(
      static_cast<const T*>(dense), basis, static_cast<T*>(out), M, N, K);
  return cudaGetLastError();
}

// The four products as (A, B) assignments; `dense` is m x n (project) or the low-rank
// matrix (project back), row-major; `basis` is rows x cols.
//   project,      left:  P^T G = basis^T (r x m)  @ G (m x n)      K = m
//   project,      right: G Q^T = G (m x n)        @ basis^T (n x r) K = n
//   project back, left:  P N   = basis (m x r)    @ N (r x n)      K = r
//   project back, right: N Q   = N (m x r)        @ basis (r x n)  K = r
template <typename T>
cudaError_t dispatch_projection(const void* dense, int64_t dense_rows, int64_t dense_cols, Int4Matrix basis,
                                int64_t rows, int64_t cols, bool left, bool back, void* out, cudaStream_t stream) {
  if (!back && left) return launch_gemm<T, true, true>(dense, basis, out, cols, dense_cols, rows, stream);
  if (!back) return launch_gemm<T, false, true>(dense, basis, out, dense_rows, rows, cols, stream);
  if (left) return launch_gemm<T, true, false>(dense, basis, out, rows, dense_cols, cols, stream);
  return launch_gemm<T, false, false>(dense, basis, out, dense_rows, cols, rows, stream);
}

template <typename T>
cudaError_t quantize_typed(const void* x, int64_t numel, int64_t group_size, uint8_t* packed, float* scales,
                           uint8_t* zeros, cudaStream_t stream) {
  const int64_t groups = ceil_div(numel, group_size);
  if (groups > 2147483647) return cudaErrorInvalidValue;
  group_range_kernel<T><<<static_cast<unsigned int>(groups), kThreads, 0, stream>>>(
      static_cast<const T*>(x), numel, group_size, scales, zeros);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  quantize_pack_kernel<T><<<elementwise_blocks((numel + 1) / 2), kThreads, 0, stream>>>(
      static_cast<const T*>(x), numel, group_size, scales, zeros, packed);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dequantize_typed(Int4Matrix q, int64_t numel, void* out, cudaStream_t stream) {
  dequantize_kernel<T><<<elementwise_blocks(numel), kThreads, 0, stream>>>(q, numel, static_cast<T*>(out));
  return cudaGetLastError();
}

}  // namespace

// ------------------------------------------------------------------------ launchers
cudaError_t int4_pack(const uint8_t* codes, int64_t numel, uint8_t* packed, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  pack_kernel<<<elementwise_blocks((numel + 1) / 2), kThreads, 0, stream>>>(codes, packed, numel);
  return cudaGetLastError();
}

cudaError_t int4_unpack(const uint8_t* packed, int64_t numel, uint8_t* codes, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  unpack_kernel<<<elementwise_blocks(numel), kThreads, 0, stream>>>(packed, codes, numel);
  return cudaGetLastError();
}

cudaError_t int4_quantize(const void* x, FloatType type, int64_t numel, int64_t group_size, uint8_t* packed,
                          float* scales, uint8_t* zeros, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  if (group_size < 1) return cudaErrorInvalidValue;
  switch (type) {
    case FloatType::kFloat32: return quantize_typed<float>(x, numel, group_size, packed, scales, zeros, stream);
    case FloatType::kBFloat16:
      return quantize_typed<__nv_bfloat16>(x, numel, group_size, packed, scales, zeros, stream);
    case FloatType::kFloat16: return quantize_typed<__half>(x, numel, group_size, packed, scales, zeros, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t int4_dequantize(const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t numel,
                            int64_t group_size, void* out, FloatType type, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  if (group_size < 1) return cudaErrorInvalidValue;
  const Int4Matrix q{packed, scales, zeros, /*cols=*/1, group_size};
  switch (type) {
    case FloatType::kFloat32: return dequantize_typed<float>(q, numel, out, stream);
    case FloatType::kBFloat16: return dequantize_typed<__nv_bfloat16>(q, numel, out, stream);
    case FloatType::kFloat16: return dequantize_typed<__half>(q, numel, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t int4_projection(const void* dense, int64_t dense_rows, int64_t dense_cols, FloatType type,
                            const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t rows,
                            int64_t cols, int64_t group_size, bool left, bool back, void* out, cudaStream_t stream) {
  if (group_size < 1) return cudaErrorInvalidValue;
  const Int4Matrix basis{packed, scales, zeros, cols, group_size};
  switch (type) {
    case FloatType::kFloat32:
      return dispatch_projection<float>(dense, dense_rows, dense_cols, basis, rows, cols, left, back, out, stream);
    case FloatType::kBFloat16:
      return dispatch_projection<__nv_bfloat16>(dense, dense_rows, dense_cols, basis, rows, cols, left, back, out,
                                                stream);
    case FloatType::kFloat16:
      return dispatch_projection<__half>(dense, dense_rows, dense_cols, basis, rows, cols, left, back, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lowrank_optim
