// CUDA kernel of lowrank_optim::batched_randomized_svd (schema and default kernel:
// lowrank_optim/ops.py and lowrank_optim/kernels/rsvd.py, which has the math and citations).
//
// The same algorithm as the default kernel, on the library routines a GPU is fast at:
//   - every product with the gradients (A Omega, A^T Q, A Z, the Grams) is one
//     cublasSgemmStridedBatched over the whole batch, in plain fp32 (the handle's TF32 mode
//     is switched off for the call: a Gram feeds a Cholesky factorisation);
//   - CholeskyQR2 is cusolverDnSpotrfBatched + cublasStrsmBatched, twice, and the
//     per-matrix acceptance test runs on the device (rsvd.cu);
//   - matrices CholeskyQR2 rejects (numerically rank-deficient sketches) are redone with
//     ATen's Householder QR, as in the default kernel;
//   - the small SVD is ATen's on the k x k triangular factors (small next to the GEMMs).
// A cuBLAS/cuSOLVER status other than success (not a numerical failure: those are per
// matrix, above) warns once and reruns the call on ATen ops with the default kernel's
// arithmetic, so a library problem degrades speed, not results.
//
// Torch headers live here only; rsvd.cu keeps to cuda_runtime.h so CI's nvcc compiles it.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cusolverDn.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>

namespace lowrank_optim {
namespace cuda {

// Defined in rsvd.cu (C++ linkage on purpose: a signature drift fails at load).
cudaError_t rsvd_batch_pointers(float* base, int64_t stride, int batch, float** pointers, cudaStream_t stream);
cudaError_t rsvd_cholesky_qr2_accept(const float* gram, int k, int batch, const int* info_first,
                                     const int* info_second, float tolerance, bool* accepted, cudaStream_t stream);

namespace {

constexpr const char* kOp = "lowrank_optim::batched_randomized_svd";
// kernels/rsvd.py GRAM_TOLERANCE: accept CholeskyQR2 when ||Q_1^T Q_1 - I||_F < 1/2.
constexpr float kGramTolerance = 0.5f;

using Factors = std::tuple<at::Tensor, at::Tensor>;

// ------------------------------------------------------------------------ checks
// The default kernel's checks and messages (ValueError through TORCH_CHECK_VALUE).
int64_t check_inputs(const at::Tensor& matrices, const at::Tensor& omega, int64_t rank, int64_t power_iters) {
  TORCH_CHECK_VALUE(matrices.dim() == 3, kOp, ": matrices must be 3-D (batch, m, n), got shape ", matrices.sizes());
  TORCH_CHECK_VALUE(omega.dim() == 3, kOp, ": omega must be 3-D (batch, n, k), got shape ", omega.sizes());
  TORCH_CHECK_VALUE(matrices.scalar_type() == at::kFloat, kOp,
                    ": matrices must be float32 (refresh in fp32), got dtype=", matrices.scalar_type());
  TORCH_CHECK_VALUE(omega.scalar_type() == at::kFloat, kOp,
                    ": omega must be float32 (refresh in fp32), got dtype=", omega.scalar_type());
  const int64_t batch = matrices.size(0), m = matrices.size(1), n = matrices.size(2);
  TORCH_CHECK_VALUE(omega.size(0) == batch && omega.size(1) == n, kOp, ": omega must have shape (", batch, ", ", n,
                    ", k) for matrices of shape ", matrices.sizes(), ", got ", omega.sizes());
  const int64_t k = omega.size(2);
  TORCH_CHECK_VALUE(1 <= k && k <= std::min(m, n), kOp, ": omega's width k=", k, " must be in [1, min(m, n)=",
                    std::min(m, n), "]");
  TORCH_CHECK_VALUE(1 <= rank && rank <= k, kOp, ": rank=", rank, " must be in [1, k=", k, "] (omega's width)");
  TORCH_CHECK_VALUE(power_iters >= 0, kOp, ": power_iters=", power_iters, " must be >= 0");
  TORCH_CHECK_VALUE(matrices.device() == omega.device(), kOp, ": matrices on ", matrices.device(), " and omega on ",
                    omega.device());
  TORCH_CHECK_VALUE(matrices.is_cuda(), kOp, ": the CUDA kernel got matrices on ", matrices.device());
  // cuBLAS/cuSOLVER take int dimensions and batch counts.
  TORCH_CHECK_VALUE(batch <= INT_MAX && m <= INT_MAX && n <= INT_MAX, kOp, ": sizes ", matrices.sizes(),
                    " exceed the int range of cuBLAS");
  return k;
}

// ------------------------------------------------------------------------ library calls
// A library status other than success; caught in the op, which then runs the ATen path.
struct LibraryFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void check_blas(cublasStatus_t status, const char* call) {
  if (status != CUBLAS_STATUS_SUCCESS) throw LibraryFailure(std::string(call) + " returned " + std::to_string(status));
}

void check_solver(cusolverStatus_t status, const char* call) {
  if (status != CUSOLVER_STATUS_SUCCESS) {
    throw LibraryFailure(std::string(call) + " returned " + std::to_string(status));
  }
}

void check_cuda(cudaError_t status, const char* call) {
  if (status != cudaSuccess) throw LibraryFailure(std::string(call) + ": " + cudaGetErrorString(status));
}

// This thread's cuSOLVER handle for the current device, bound to `stream`.  Not ATen's
// at::cuda::getCurrentCUDASolverDnHandle(): the PyPI wheels of torch define it in
// libtorch_cuda_linalg.so, which torch loads only at its first CUDA linear-algebra call, so
// a library that calls it fails to load before then (undefined symbol; found by
// csrc/check_build.sh).  One handle per thread and device, as ATen keeps them, created on
// first use and deliberately never destroyed: a thread_local destructor may run after the
// CUDA context is gone at exit, and a handle is a few kilobytes.
cusolverDnHandle_t solver_handle(cudaStream_t stream) {
  thread_local std::unordered_map<int, cusolverDnHandle_t> handles;
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  cusolverDnHandle_t& handle = handles[device];
  if (handle == nullptr) check_solver(cusolverDnCreate(&handle), "cusolverDnCreate");
  check_solver(cusolverDnSetStream(handle, stream), "cusolverDnSetStream");
  return handle;
}

// The handles of the current device and stream.  ATen shares the cuBLAS handle and sets its
// math mode per call; this call wants plain fp32 (no TF32) and host-side scalars, and puts
// the handle back as it found it.
class Libraries {
 public:
  Libraries()
      : blas(at::cuda::getCurrentCUDABlasHandle()),
        stream(at::cuda::getCurrentCUDAStream()),
        solver(solver_handle(stream)) {
    check_blas(cublasGetMathMode(blas, &saved_math_), "cublasGetMathMode");
    check_blas(cublasGetPointerMode(blas, &saved_pointer_), "cublasGetPointerMode");
    check_blas(cublasSetMathMode(blas, CUBLAS_DEFAULT_MATH), "cublasSetMathMode");
    check_blas(cublasSetPointerMode(blas, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  }
  ~Libraries() {
    cublasSetMathMode(blas, saved_math_);
    cublasSetPointerMode(blas, saved_pointer_);
  }
  Libraries(const Libraries&) = delete;
  Libraries& operator=(const Libraries&) = delete;

  cublasHandle_t blas;
  cudaStream_t stream;  // before `solver`, which is bound to it in the initializer list
  cusolverDnHandle_t solver;

 private:
  cublasMath_t saved_math_ = CUBLAS_DEFAULT_MATH;
  cublasPointerMode_t saved_pointer_ = CUBLAS_POINTER_MODE_HOST;
};

// op(A) op(B) for a batch of contiguous row-major matrices, as one strided-batched GEMM.
// cuBLAS is column-major and a row-major X is the column-major X^T, so C^T = op(B)^T op(A)^T
// is the same call with the operands swapped; a stored matrix's leading dimension is its
// stored column count whatever the transpose.
at::Tensor batched_matmul(const Libraries& libs, const at::Tensor& a_in, bool trans_a, const at::Tensor& b_in,
                          bool trans_b) {
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();  // no-ops on this file's tensors
  const int64_t batch = a.size(0);
  const int64_t rows = trans_a ? a.size(2) : a.size(1);
  const int64_t inner = trans_a ? a.size(1) : a.size(2);
  const int64_t cols = trans_b ? b.size(1) : b.size(2);
  at::Tensor c = at::empty({batch, rows, cols}, a.options());
  const float one = 1.0f, zero = 0.0f;
  check_blas(cublasSgemmStridedBatched(libs.blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                       trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(cols),
                                       static_cast<int>(rows), static_cast<int>(inner), &one, b.data_ptr<float>(),
                                       static_cast<int>(b.size(2)), b.size(1) * b.size(2), a.data_ptr<float>(),
                                       static_cast<int>(a.size(2)), a.size(1) * a.size(2), &zero,
                                       c.data_ptr<float>(), static_cast<int>(cols), rows * cols,
                                       static_cast<int>(batch)),
             "cublasSgemmStridedBatched");
  return c;
}

struct CholeskyQRPass {
  at::Tensor q, r, gram, info;
};

// One CholeskyQR pass: Y^T Y = L L^T (batched potrf), Q = Y L^{-T} (batched trsm).
CholeskyQRPass cholesky_qr(const Libraries& libs, const at::Tensor& y_in) {
  const at::Tensor y = y_in.contiguous();
  const int64_t batch = y.size(0), m = y.size(1), k = y.size(2);
  at::Tensor gram = batched_matmul(libs, y, /*trans_a=*/true, y, /*trans_b=*/false);
  at::Tensor factor = gram.clone();  // potrf overwrites its input; the Gram is kept for the check
  at::Tensor q = y.clone();           // trsm solves in place
  at::Tensor info = at::empty({batch}, y.options().dtype(at::kInt));
  // Device arrays of per-matrix pointers (the "Batched" entry points take them): factors, then Qs.
  at::Tensor pointers = at::empty({2 * batch}, y.options().dtype(at::kLong));
  float** factor_pointers = reinterpret_cast<float**>(pointers.data_ptr<int64_t>());
  float** q_pointers = factor_pointers + batch;
  check_cuda(rsvd_batch_pointers(factor.data_ptr<float>(), k * k, static_cast<int>(batch), factor_pointers,
                                 libs.stream),
             "rsvd_batch_pointers");
  check_cuda(rsvd_batch_pointers(q.data_ptr<float>(), m * k, static_cast<int>(batch), q_pointers, libs.stream),
             "rsvd_batch_pointers");
  // The Gram is symmetric, so its row-major storage is its column-major one too; the
  // column-major lower factor L then reads row-major as the upper R = L^T.
  check_solver(cusolverDnSpotrfBatched(libs.solver, CUBLAS_FILL_MODE_LOWER, static_cast<int>(k), factor_pointers,
                                       static_cast<int>(k), info.data_ptr<int>(), static_cast<int>(batch)),
               "cusolverDnSpotrfBatched");
  // Q L^T = Y  <=>  L Q^T = Y^T, and a row-major Y is the column-major Y^T (k x m, leading
  // dimension k): one left, lower, non-transposed solve in place.
  const float one = 1.0f;
  check_blas(cublasStrsmBatched(libs.blas, CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N,
                                CUBLAS_DIAG_NON_UNIT, static_cast<int>(k), static_cast<int>(m), &one, factor_pointers,
                                static_cast<int>(k), q_pointers, static_cast<int>(k), static_cast<int>(batch)),
             "cublasStrsmBatched");
  return {q, factor.triu(), gram, info};
}

// Rejected matrices (the accepted flag false) are redone with Householder QR.
Factors replace_rejected(const at::Tensor& y, at::Tensor q, at::Tensor r, const at::Tensor& accepted) {
  if (accepted.all().item<bool>()) return {q, r};  // the one host sync of this factorisation
  const at::Tensor rejected = accepted.logical_not().nonzero().squeeze(1);
  auto [fallback_q, fallback_r] = at::linalg_qr(y.index_select(0, rejected));
  return {q.index_copy(0, rejected, fallback_q), r.index_copy(0, rejected, fallback_r)};
}

// CholeskyQR2 with the per-matrix Householder fallback, on cuBLAS/cuSOLVER.
Factors qr_on_libraries(const Libraries& libs, const at::Tensor& y) {
  const int64_t batch = y.size(0), k = y.size(2);
  const CholeskyQRPass first = cholesky_qr(libs, y);
  const CholeskyQRPass second = cholesky_qr(libs, first.q);
  at::Tensor accepted = at::empty({batch}, y.options().dtype(at::kBool));
  check_cuda(rsvd_cholesky_qr2_accept(second.gram.data_ptr<float>(), static_cast<int>(k), static_cast<int>(batch),
                                      first.info.data_ptr<int>(), second.info.data_ptr<int>(), kGramTolerance,
                                      accepted.data_ptr<bool>(), libs.stream),
             "rsvd_cholesky_qr2_accept");
  return replace_rejected(y, second.q, at::bmm(second.r, first.r), accepted);
}

// The same factorisation on ATen ops (the default kernel's arithmetic): the fallback path.
Factors qr_on_aten(const at::Tensor& y) {
  auto pass = [](const at::Tensor& x) {
    at::Tensor gram = at::matmul(x.mT(), x);
    auto [chol, info] = at::linalg_cholesky_ex(gram);
    at::Tensor q = at::linalg_solve_triangular(chol.mT(), x, /*upper=*/true, /*left=*/false);
    return std::make_tuple(q, chol.mT(), gram, info.eq(0));
  };
  auto [first_q, first_r, first_gram, first_ok] = pass(y);
  auto [q, second_r, gram, second_ok] = pass(first_q);
  at::Tensor eye = at::eye(gram.size(-1), gram.options());
  at::Tensor close = (gram - eye).square().sum({-2, -1}).lt(kGramTolerance * kGramTolerance);  // NaN: false
  return replace_rejected(y, q, at::matmul(second_r, first_r), first_ok.logical_and(second_ok).logical_and(close));
}

// The range finder with power iterations and the small SVD (kernels/rsvd.py), over a
// matmul(a, trans_a, b, trans_b) and a qr(y) -> (Q, R) of the caller's choice.
template <class Matmul, class QR>
Factors randomized_svd(const at::Tensor& a, const at::Tensor& omega, int64_t rank, int64_t power_iters,
                       const Matmul& matmul, const QR& qr) {
  auto orthonormalize = [&](const at::Tensor& y) { return std::get<0>(qr(y)).contiguous(); };
  at::Tensor q = orthonormalize(matmul(a, false, omega, false));
  for (int64_t i = 0; i < power_iters; ++i) {
    q = orthonormalize(matmul(a, false, orthonormalize(matmul(a, true, q, false)), false));
  }
  // B = Q^T A through B^T = Q_B R_B: the SVD of the k x k R_B^T = U_R S W^T gives
  // U = Q U_R and V^T = W^T Q_B^T.
  auto [q_b, r_b] = qr(matmul(a, true, q, false));
  auto [u_r, singular_values, w_h] = at::linalg_svd(r_b.mT(), /*full_matrices=*/false);
  return {at::matmul(q, u_r.narrow(-1, 0, rank)).contiguous(),
          at::matmul(w_h.narrow(1, 0, rank), q_b.mT()).contiguous()};
}

Factors batched_randomized_svd_cuda(const at::Tensor& matrices, const at::Tensor& omega, int64_t rank,
                                    int64_t power_iters) {
  check_inputs(matrices, omega, rank, power_iters);
  const c10::cuda::CUDAGuard guard(matrices.device());
  const at::Tensor a = matrices.contiguous();
  const at::Tensor sketch = omega.contiguous();
  if (a.size(0) == 0) {
    return {at::empty({0, a.size(1), rank}, a.options()), at::empty({0, rank, a.size(2)}, a.options())};
  }
  try {
    const Libraries libs;
    auto matmul = [&](const at::Tensor& x, bool tx, const at::Tensor& y, bool ty) {
      return batched_matmul(libs, x, tx, y, ty);
    };
    auto qr = [&](const at::Tensor& y) { return qr_on_libraries(libs, y); };
    return randomized_svd(a, sketch, rank, power_iters, matmul, qr);
  } catch (const LibraryFailure& failure) {
    TORCH_WARN_ONCE(kOp, ": ", failure.what(), "; running this op on ATen's linear algebra instead");
  }
  auto matmul = [](const at::Tensor& x, bool tx, const at::Tensor& y, bool ty) {
    return at::matmul(tx ? x.mT() : x, ty ? y.mT() : y);
  };
  auto qr = [](const at::Tensor& y) { return qr_on_aten(y); };
  return randomized_svd(a, sketch, rank, power_iters, matmul, qr);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowrank_optim, CUDA, m) {
  m.impl("batched_randomized_svd", &batched_randomized_svd_cuda);
}

}  // namespace cuda
}  // namespace lowrank_optim
