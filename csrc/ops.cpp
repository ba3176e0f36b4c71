// The glm_awq op catalogue: every schema of glm_awq._C lives here (fakes: glm_awq/_fakes.py).
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(glm_awq, m) {
  // int32 [N, K/8] pack-quantized + scale [N, K/group_size] -> dense [N, K] in `dtype` (bf16 or fp16).
  m.def("dequantize_int4(Tensor weight_packed, Tensor weight_scale, int group_size, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(glm_awq, CUDA, m) {
  m.impl("dequantize_int4", &glm_awq::dequantize_int4);
}

// `import glm_awq._C` needs a module init; the ops register themselves through the static initializers above.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "glm_awq CUDA kernels (see torch.ops.glm_awq)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
