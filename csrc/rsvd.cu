// Device helpers of the CUDA batched randomized SVD (lowrank_optim::batched_randomized_svd).
//
// The algorithm (lowrank_optim/kernels/rsvd.py has the math and the citations) is driven
// from rsvd_ops.cpp, which owns the tensors and calls cuBLAS (strided-batched GEMMs, batched
// triangular solves) and cuSOLVER (batched Cholesky) on the handles ATen keeps for the
// current stream.  This file holds the two pieces those libraries do not provide:
//
// - the device arrays of per-matrix pointers that the "Batched" (as opposed to
//   "StridedBatched") cuBLAS/cuSOLVER entry points take, filled on the device so that
//   building them never waits on the host;
// - CholeskyQR2's acceptance test per matrix, info_1 = info_2 = 0 and
//   ||Q_1^T Q_1 - I||_F < tolerance, reduced on the device into one flag per matrix, so
//   the host reads a single "all accepted?" per factorisation rather than b numbers.
//
// Only cuda_runtime.h is included: the CPU machines that run CI have nvcc but neither the
// torch CUDA headers nor the cuBLAS/cuSOLVER headers, and `.ci/run` compiles every .cu
// file there.  The launchers have C++ linkage, so a signature drift between this file and
// rsvd_ops.cpp is an undefined symbol at load, not silent misbehaviour.

#include <cuda_runtime.h>

#include <cstdint>

namespace lowrank_optim {
namespace cuda {

namespace {

constexpr int kReduceThreads = 256;

__global__ void batch_pointers_kernel(float* base, int64_t stride, int batch, float** pointers) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < batch) pointers[i] = base + static_cast<int64_t>(i) * stride;
}

// One block per matrix: the squared Frobenius distance of its k x k Gram from the identity,
// reduced in shared memory, then the acceptance flag.  A NaN distance (a failed first pass
// leaves inf/NaN behind) compares false and so rejects the matrix.
__global__ void __launch_bounds__(kReduceThreads)
cholesky_qr2_accept_kernel(const float* __restrict__ gram, int k, const int* __restrict__ info_first,
                           const int* __restrict__ info_second, float tolerance, bool* __restrict__ accepted) {
  __shared__ float partial[kReduceThreads];
  const int matrix = blockIdx.x;
  const int64_t entries = static_cast<int64_t>(k) * k;
  const float* g = gram + matrix * entries;
  float sum = 0.0f;
  for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
    const int64_t row = e / k, col = e % k;
    const float deviation = g[e] - (row == col ? 1.0f : 0.0f);
    sum += deviation * deviation;
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int width = blockDim.x / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const bool close = partial[0] < tolerance * tolerance;  // false for NaN
    accepted[matrix] = close && info_first[matrix] == 0 && info_second[matrix] == 0;
  }
}

}  // namespace

// pointers[i] = base + i * stride for i < batch (device array of `batch` pointers).
cudaError_t rsvd_batch_pointers(float* base, int64_t stride, int batch, float** pointers, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  constexpr int threads = 128;
  batch_pointers_kernel<<<(batch + threads - 1) / threads, threads, 0, stream>>>(base, stride, batch, pointers);
  return cudaGetLastError();
}

// accepted[i] = info_first[i] == 0 && info_second[i] == 0 && ||gram[i] - I||_F < tolerance,
// for `batch` contiguous k x k Grams (the second CholeskyQR pass's, Q_1^T Q_1).
cudaError_t rsvd_cholesky_qr2_accept(const float* gram, int k, int batch, const int* info_first,
                                     const int* info_second, float tolerance, bool* accepted, cudaStream_t stream) {
  if (batch <= 0) return cudaSuccess;
  cholesky_qr2_accept_kernel<<<batch, kReduceThreads, 0, stream>>>(gram, k, info_first, info_second, tolerance,
                                                                   accepted);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace lowrank_optim
