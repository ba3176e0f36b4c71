// The glm_awq op catalogue: every schema of glm_awq._C lives here (fakes: glm_awq/_fakes.py).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(glm_awq, m) {
  // int32 [N, K/8] pack-quantized + scale [N, K/group_size] -> dense [N, K] in `dtype` (bf16 or fp16).
  m.def("dequantize_int4(Tensor weight_packed, Tensor weight_scale, int group_size, ScalarType dtype) -> Tensor");
  // int32 [(E,) N, K/8] checkpoint layout -> int32 [(E,) K/16, N/64, 32, 4] cuda layout (w4a16_gemm.cu header).
  m.def("repack_int4(Tensor weight_packed) -> Tensor");
  // x [M, K] bf16/fp16 @ W^T + bias -> [M, N]. weight: repack_int4's [K/16, N/64, 32, 4]; scale: [G, N] repacked
  // (glm_awq.quant.repack_scales_for_cuda) in x's dtype; tickets: int32 zeros the kernel uses for split-K and
  // leaves zero; block_n 0|64|128 and splits 0 (auto) or >= 1.
  m.def(
      "w4a16_gemm(Tensor x, Tensor weight, Tensor scale, Tensor? bias, Tensor tickets, int group_size, int block_n, "
      "int splits) -> Tensor");
}

TORCH_LIBRARY_IMPL(glm_awq, CUDA, m) {
  m.impl("dequantize_int4", &glm_awq::dequantize_int4);
  m.impl("repack_int4", &glm_awq::repack_int4);
  m.impl("w4a16_gemm", &glm_awq::w4a16_gemm);
}

// `import glm_awq._C` needs a module init; the ops register themselves through the static initializers above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "glm_awq CUDA kernels (see torch.ops.glm_awq)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
