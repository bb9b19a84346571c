// CUDA kernels of the INT4 ops (schemas and default kernels: lowrank_optim/ops.py).
//
// The torch side only: argument checks (ValueError through TORCH_CHECK_VALUE, as the
// package's validation), output allocation, the device guard and the current stream; the
// arithmetic is in int4.cu, behind raw-pointer launchers that keep torch headers out of
// the .cu files.  Semantics are the default kernels' (lowrank_optim/kernels/reference.py):
// dense inputs of another floating dtype (fp64) go through fp32, as the reference computes.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <tuple>

namespace lowrank_optim {
namespace cuda {

// Defined in int4.cu (C++ linkage on purpose: a signature drift fails at load).
enum class FloatType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
cudaError_t int4_pack(const uint8_t* codes, int64_t numel, uint8_t* packed, cudaStream_t stream);
cudaError_t int4_unpack(const uint8_t* packed, int64_t numel, uint8_t* codes, cudaStream_t stream);
cudaError_t int4_quantize(const void* x, FloatType type, int64_t numel, int64_t group_size, uint8_t* packed,
                          float* scales, uint8_t* zeros, cudaStream_t stream);
cudaError_t int4_dequantize(const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t numel,
                            int64_t group_size, void* out, FloatType type, cudaStream_t stream);
cudaError_t int4_projection(const void* dense, int64_t dense_rows, int64_t dense_cols, FloatType type,
                            const uint8_t* packed, const float* scales, const uint8_t* zeros, int64_t rows,
                            int64_t cols, int64_t group_size, bool left, bool back, void* out, cudaStream_t stream);

namespace {

bool native(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

FloatType float_type(at::ScalarType t) {
  if (t == at::kBFloat16) return FloatType::kBFloat16;
  if (t == at::kHalf) return FloatType::kFloat16;
  return FloatType::kFloat32;
}

// A floating input the kernels read directly: contiguous, in a native dtype (else fp32).
at::Tensor dense_input(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating, got ", x.scalar_type());
  return (native(x.scalar_type()) ? x : x.to(at::kFloat)).contiguous();
}

void check_on(const at::Tensor& x, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(x.device() == like.device(), op, ": ", name, " must be on ", like.device(), ", got ", x.device());
}

void check_group_size(int64_t group_size, const char* op) {
  TORCH_CHECK_VALUE(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
}

// Packed codes, scales and zero points that cover `numel` elements, on `like`'s device;
// returned contiguous (the launchers index them flat).
std::tuple<at::Tensor, at::Tensor, at::Tensor> storage_input(const at::Tensor& packed, const at::Tensor& scales,
                                                            const at::Tensor& zeros, int64_t numel,
                                                            int64_t group_size, const at::Tensor& like,
                                                            const char* op) {
  check_group_size(group_size, op);
  TORCH_CHECK_VALUE(numel >= 0, op, ": numel must be >= 0, got ", numel);
  check_on(packed, like, op, "packed");
  check_on(scales, like, op, "scales");
  check_on(zeros, like, op, "zeros");
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(zeros.scalar_type() == at::kByte, op, ": zeros must be uint8, got ", zeros.scalar_type());
  const int64_t groups = (numel + group_size - 1) / group_size;
  TORCH_CHECK_VALUE(packed.numel() >= (numel + 1) / 2, op, ": packed holds ", packed.numel(),
                    " bytes, fewer than the ", (numel + 1) / 2, " that ", numel, " codes need");
  TORCH_CHECK_VALUE(scales.numel() >= groups && zeros.numel() >= groups, op, ": scales and zeros need ", groups,
                    " groups of ", group_size, ", got ", scales.numel(), " and ", zeros.numel());
  return {packed.contiguous(), scales.to(at::kFloat).contiguous(), zeros.contiguous()};
}

at::Tensor int4_pack_cuda(const at::Tensor& codes) {
  TORCH_CHECK_VALUE(codes.is_cuda(), "int4_pack: codes must be a CUDA tensor, got ", codes.device());
  const c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor flat = codes.reshape(-1).to(at::kByte).contiguous();
  const int64_t numel = flat.numel();
  at::Tensor packed = at::empty({(numel + 1) / 2}, flat.options());
  C10_CUDA_CHECK(int4_pack(flat.data_ptr<uint8_t>(), numel, packed.data_ptr<uint8_t>(),
                           at::cuda::getCurrentCUDAStream()));
  return packed;
}

at::Tensor int4_unpack_cuda(const at::Tensor& packed, int64_t numel) {
  TORCH_CHECK_VALUE(packed.is_cuda(), "int4_unpack: packed must be a CUDA tensor, got ", packed.device());
  TORCH_CHECK_VALUE(packed.scalar_type() == at::kByte, "int4_unpack: packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK_VALUE(numel >= 0 && packed.numel() >= (numel + 1) / 2, "int4_unpack: ", packed.numel(),
                    " bytes cannot hold numel=", numel, " codes");
  const c10::cuda::CUDAGuard guard(packed.device());
  const at::Tensor bytes = packed.contiguous();
  at::Tensor codes = at::empty({numel}, bytes.options());
  C10_CUDA_CHECK(int4_unpack(bytes.data_ptr<uint8_t>(), numel, codes.data_ptr<uint8_t>(),
                             at::cuda::getCurrentCUDAStream()));
  return codes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_quantize_cuda(const at::Tensor& x, int64_t group_size) {
  check_group_size(group_size, "int4_quantize");
  const at::Tensor values = dense_input(x, "int4_quantize", "x");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t numel = values.numel();
  const int64_t groups = (numel + group_size - 1) / group_size;
  at::Tensor packed = at::empty({(numel + 1) / 2}, values.options().dtype(at::kByte));
  at::Tensor scales = at::empty({groups}, values.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({groups}, values.options().dtype(at::kByte));
  C10_CUDA_CHECK(int4_quantize(values.data_ptr(), float_type(values.scalar_type()), numel, group_size,
                               packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), zeros.data_ptr<uint8_t>(),
                               at::cuda::getCurrentCUDAStream()));
  return {packed, scales, zeros};
}

at::Tensor int4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                                int64_t numel, int64_t group_size, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(packed.is_cuda(), "int4_dequantize: packed must be a CUDA tensor, got ", packed.device());
  const c10::cuda::CUDAGuard guard(packed.device());
  auto [codes, s, z] = storage_input(packed, scales, zeros, numel, group_size, packed, "int4_dequantize");
  // Other dtypes (fp64) are computed in fp32 and converted, as the reference does.
  const at::ScalarType compute = native(dtype) ? dtype : at::kFloat;
  at::Tensor out = at::empty({numel}, packed.options().dtype(compute));
  C10_CUDA_CHECK(int4_dequantize(codes.data_ptr<uint8_t>(), s.data_ptr<float>(), z.data_ptr<uint8_t>(), numel,
                                 group_size, out.data_ptr(), float_type(compute), at::cuda::getCurrentCUDAStream()));
  return compute == dtype ? out : out.to(dtype);
}

// project (back = false): `dense` is the gradient G (m x n); project back: the low-rank N.
at::Tensor projection(const at::Tensor& dense_arg, const at::Tensor& packed, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t rows, int64_t cols, int64_t group_size, bool left,
                      bool back) {
  const char* op = back ? "int4_project_back" : "int4_project";
  TORCH_CHECK_VALUE(dense_arg.dim() == 2, op, ": expected a matrix, got shape ", dense_arg.sizes());
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0, op, ": rows and cols must be >= 0, got ", rows, " and ", cols);
  const at::Tensor dense = dense_input(dense_arg, op, back ? "low" : "grad");
  const c10::cuda::CUDAGuard guard(dense.device());
  auto [codes, s, z] = storage_input(packed, scales, zeros, rows * cols, group_size, dense, op);
  const int64_t dense_rows = dense.size(0), dense_cols = dense.size(1);
  // The inner dimension each product contracts, and the output shape (ops.py's fake kernels).
  int64_t inner, expected, out_rows, out_cols;
  if (!back && left) { inner = dense_rows; expected = rows; out_rows = cols; out_cols = dense_cols; }
  else if (!back) { inner = dense_cols; expected = cols; out_rows = dense_rows; out_cols = rows; }
  else if (left) { inner = dense_rows; expected = cols; out_rows = rows; out_cols = dense_cols; }
  else { inner = dense_cols; expected = rows; out_rows = dense_rows; out_cols = cols; }
  TORCH_CHECK_VALUE(inner == expected, op, ": a ", dense_rows, "x", dense_cols, " input does not match the ", rows,
                    "x", cols, " basis (left=", left, ")");
  at::Tensor out = at::empty({out_rows, out_cols}, dense.options());
  C10_CUDA_CHECK(int4_projection(dense.data_ptr(), dense_rows, dense_cols, float_type(dense.scalar_type()),
                                 codes.data_ptr<uint8_t>(), s.data_ptr<float>(), z.data_ptr<uint8_t>(), rows, cols,
                                 group_size, left, back, out.data_ptr(), at::cuda::getCurrentCUDAStream()));
  return out.scalar_type() == dense_arg.scalar_type() ? out : out.to(dense_arg.scalar_type());
}

at::Tensor int4_project_cuda(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& scales,
                             const at::Tensor& zeros, int64_t rows, int64_t cols, int64_t group_size, bool left) {
  return projection(grad, packed, scales, zeros, rows, cols, group_size, left, /*back=*/false);
}

at::Tensor int4_project_back_cuda(const at::Tensor& low, const at::Tensor& packed, const at::Tensor& scales,
                                  const at::Tensor& zeros, int64_t rows, int64_t cols, int64_t group_size,
                                  bool left) {
  return projection(low, packed, scales, zeros, rows, cols, group_size, left, /*back=*/true);
}

}  // namespace
}  // namespace cuda
}  // namespace lowrank_optim

TORCH_LIBRARY_IMPL(lowrank_optim, CUDA, m) {
  using namespace lowrank_optim::cuda;
  m.impl("int4_pack", &int4_pack_cuda);
  m.impl("int4_unpack", &int4_unpack_cuda);
  m.impl("int4_quantize", &int4_quantize_cuda);
  m.impl("int4_dequantize", &int4_dequantize_cuda);
  // The fused products register under the *_fused ops: the public int4_project and
  // int4_project_back run them or dequantize + cuBLAS, whichever measured faster
  // (lowrank_optim/kernels/int4.py), since these tiles use no tensor cores.
  m.impl("int4_project_fused", &int4_project_cuda);
  m.impl("int4_project_back_fused", &int4_project_back_cuda);
}
