// pybind11 bindings of the native MMD kernels: the module imm_kernels._C.
//
// torch/csrc/utils/pybind.h brings the pybind11 copy torch itself was built with, whose
// type casters pass at::Tensor to and from Python; a second pybind11 would risk
// an ABI mismatch with torch's own bindings.
#include <torch/csrc/utils/pybind.h>
#include <torch/version.h>

#include <string>

#include "mmd.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "imm_kernels native kernels (C++ with at::parallel_for; CUDA when built with it)";
  // The torch this module was compiled against; imm_kernels.backends refuses a mismatch.
  m.attr("torch_version") = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);

  m.def("mmd_forward_cpu", &imm_kernels::mmd_forward_cpu, "(loss_g, S, MMD^2_g, dMMD^2_g/db) on the CPU", py::arg("x"),
        py::arg("y"), py::arg("bandwidth"), py::arg("weight"), py::arg("group_size"), py::arg("eps"));
  m.def("mmd_backward_cpu", &imm_kernels::mmd_backward_cpu, "(dx, dy) on the CPU", py::arg("grad_loss"), py::arg("x"),
        py::arg("y"), py::arg("sqdist"), py::arg("bandwidth"), py::arg("weight"), py::arg("group_size"), py::arg("eps"),
        py::arg("need_dx"), py::arg("need_dy"));
  m.def("mmd_forward_with_grad_cpu", &imm_kernels::mmd_forward_with_grad_cpu,
        "(loss_g, S, MMD^2_g, dMMD^2_g/db, dx, dy) on the CPU: the forward and the gradient for a given grad_loss",
        py::arg("x"), py::arg("y"), py::arg("bandwidth"), py::arg("weight"), py::arg("group_size"), py::arg("eps"),
        py::arg("grad_loss"), py::arg("need_dx"), py::arg("need_dy"));
  m.def("release_cached_gradients_cpu", &imm_kernels::release_cached_gradients_cpu,
        "frees the blocks kept for large CPU gradients; -> bytes freed");
#ifdef IMM_KERNELS_WITH_CUDA
  m.attr("cuda_built") = true;
  m.attr("cuda_max_group_size") = imm_kernels::kCudaMaxGroupSize;
  m.def("mmd_forward_cuda", &imm_kernels::mmd_forward_cuda, "(loss_g, S, MMD^2_g, dMMD^2_g/db) on a CUDA device",
        py::arg("x"), py::arg("y"), py::arg("bandwidth"), py::arg("weight"), py::arg("group_size"), py::arg("eps"));
  m.def("mmd_backward_cuda", &imm_kernels::mmd_backward_cuda, "(dx, dy) on a CUDA device", py::arg("grad_loss"),
        py::arg("x"), py::arg("y"), py::arg("sqdist"), py::arg("bandwidth"), py::arg("weight"), py::arg("group_size"),
        py::arg("eps"), py::arg("need_dx"), py::arg("need_dy"));
#else
  m.attr("cuda_built") = false;
#endif
}
