// Schemas of every dmgrd op (one per hot path). Kernels register per device in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dmgrd, m) {
  m.def("anomaly_map(Tensor[] teacher, Tensor[] student, int[2] out_size, str reduce, float sigma) -> Tensor");
  m.def("image_score(Tensor anomaly_map, str mode, int k) -> Tensor");
  m.def("channel_pool(Tensor x) -> (Tensor pooled, Tensor ties)");
  m.def("channel_pool_backward(Tensor grad, Tensor x, Tensor pooled, Tensor ties) -> Tensor");
  m.def("fuse_pyramid(Tensor[] features, Tensor[] logits) -> Tensor[]");
  m.def("fuse_pyramid_backward(Tensor[] grads, Tensor[] features, Tensor[] logits) -> (Tensor[], Tensor[])");
}

// `import dmgrd._C` loads the library, which runs the registrations above; it has no Python functions.
static struct PyModuleDef dmgrd_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dmgrd_module); }
