// Schemas of every dmgrd op (one per hot path). Kernels register per device in cpu/ and cuda/.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dmgrd, m) {
  m.def("anomaly_map(Tensor[] teacher, Tensor[] student, int[2] out_size, str reduce, float sigma) -> Tensor");
  m.def("image_score(Tensor anomaly_map, str mode, int k) -> Tensor");
  m.def("coreset_update(Tensor points, Tensor center, Tensor min_dist) -> (Tensor, Tensor)");
  m.def("cosine_kd_loss_forward(Tensor[] teacher, Tensor[] student, str reduction) -> (Tensor, Tensor)");
  m.def("cosine_kd_loss_backward(Tensor grad, Tensor[] teacher, Tensor[] student, Tensor coeffs, str reduction, "
        "bool teacher_grad) -> (Tensor[], Tensor[])");
  m.def("memory_readout(Tensor query, Tensor bank, float temperature) -> (Tensor, Tensor, Tensor)");
  m.def("memory_readout_backward(Tensor grad_out, Tensor query, Tensor bank, Tensor out, Tensor lse, "
        "Tensor query_norm, float temperature) -> (Tensor, Tensor)");
  m.def("memory_nearest(Tensor query, Tensor bank, int k, str metric) -> (Tensor, Tensor)");
  m.def("dual_memory_margin(Tensor query, Tensor normal_bank, Tensor abnormal_bank, float margin, str metric) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("channel_pool(Tensor x) -> (Tensor pooled, Tensor ties)");
  m.def("channel_pool_backward(Tensor grad, Tensor x, Tensor pooled, Tensor ties) -> Tensor");
  m.def("fuse_pyramid(Tensor[] features, Tensor[] logits) -> Tensor[]");
  m.def("fuse_pyramid_backward(Tensor[] grads, Tensor[] features, Tensor[] logits) -> (Tensor[], Tensor[])");
}

// `import dmgrd._C` loads the library, which runs the registrations above; it has no Python functions.
static struct PyModuleDef dmgrd_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dmgrd_module); }
