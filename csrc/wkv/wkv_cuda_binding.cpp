// Thin torch binding of the WKV CUDA kernels (wkv_cuda.h): checks, allocation, the current stream.
// Same Python interface as wkv_cpu.cpp: forward(w, u, k, v, aa, bb, pp) -> [y, aa, bb, pp] and
// backward(w, u, k, v, aa, bb, pp, gy) -> [gw [B,C], gu [B,C], gk, gv] (float32).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "wkv_cuda.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return NEOX_WKV_F32;
    case at::kHalf: return NEOX_WKV_F16;
    case at::kBFloat16: return NEOX_WKV_BF16;
    default: TORCH_CHECK(false, "wkv_cuda: k/v must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_inputs(const at::Tensor& w, const at::Tensor& u, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& aa, const at::Tensor& bb, const at::Tensor& pp) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes(), "wkv_cuda: k and v must be [B, T, C] of one shape");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "wkv_cuda: k and v must share a dtype");
  for (const auto* t : {&w, &u, &k, &v, &aa, &bb, &pp}) {
    TORCH_CHECK(t->is_cuda() && t->is_contiguous(), "wkv_cuda: inputs must be contiguous CUDA tensors");
    TORCH_CHECK(t->device() == k.device(), "wkv_cuda: inputs must be on one device");
  }
  for (const auto* t : {&w, &u, &aa, &bb, &pp}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "wkv_cuda: w, u and the state must be float32");
  }
}

void check_cuda(int err, const char* what) {
  TORCH_CHECK(err == 0, "wkv_cuda: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::vector<at::Tensor> wkv_forward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v, at::Tensor aa,
                                    at::Tensor bb, at::Tensor pp) {
  check_inputs(w, u, k, v, aa, bb, pp);
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  at::Tensor y = at::empty_like(v);
  at::Tensor aa2 = aa.clone(), bb2 = bb.clone(), pp2 = pp.clone();
  check_cuda(neox_wkv_forward(dtype_code(k), B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(),
                              v.data_ptr(), y.data_ptr(), aa2.data_ptr<float>(), bb2.data_ptr<float>(),
                              pp2.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream()),
             "forward");
  return {y, aa2, bb2, pp2};
}

std::vector<at::Tensor> wkv_backward(at::Tensor w, at::Tensor u, at::Tensor k, at::Tensor v, at::Tensor aa,
                                     at::Tensor bb, at::Tensor pp, at::Tensor gy) {
  check_inputs(w, u, k, v, aa, bb, pp);
  TORCH_CHECK(gy.sizes() == k.sizes() && gy.scalar_type() == k.scalar_type() && gy.is_contiguous(),
              "wkv_cuda: gy must be a contiguous [B, T, C] tensor in k's dtype");
  const c10::cuda::CUDAGuard guard(k.device());
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto f32 = k.options().dtype(at::kFloat);
  at::Tensor gk = at::empty({B, T, C}, f32), gv = at::empty({B, T, C}, f32), scratch = at::empty({B, T, C}, f32);
  at::Tensor gw = at::empty({B, C}, f32), gu = at::empty({B, C}, f32);
  check_cuda(neox_wkv_backward(dtype_code(k), B, T, C, w.data_ptr<float>(), u.data_ptr<float>(), k.data_ptr(),
                               v.data_ptr(), gy.data_ptr(), aa.data_ptr<float>(), bb.data_ptr<float>(),
                               pp.data_ptr<float>(), gk.data_ptr<float>(), gv.data_ptr<float>(),
                               scratch.data_ptr<float>(), gw.data_ptr<float>(), gu.data_ptr<float>(),
                               c10::cuda::getCurrentCUDAStream().stream()),
             "backward");
  return {gw, gu, gk, gv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &wkv_forward, "RWKV-4 WKV forward (CUDA)");
  m.def("backward", &wkv_backward, "RWKV-4 WKV backward (CUDA)");
}
