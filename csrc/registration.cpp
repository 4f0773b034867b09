// Op schemas of the lopa_cpp namespace and the Python module lopa._C.
//
// The CPU kernels register themselves next to their code (gated_prompt.cpp, ulpt.cpp);
// fake kernels and autograd are registered from Python (lopa/_cpp_ops.py), which imports
// this module first.
#include <torch/extension.h>
#include <torch/library.h>

#include <atomic>

#include "common.h"

namespace lopa {
namespace {
// A test hook, read once per op call; relaxed ordering is enough for a flag set between calls.
std::atomic<bool> poison_outputs{false};
}  // namespace

bool poison_outputs_enabled() { return poison_outputs.load(std::memory_order_relaxed); }
void set_poison_outputs(bool enabled) { poison_outputs.store(enabled, std::memory_order_relaxed); }
}  // namespace lopa

TORCH_LIBRARY(lopa_cpp, m) {
  m.def("gated_prompt_fwd(Tensor zs, Tensor u, Tensor v, Tensor? task_ids) -> Tensor");
  m.def(
      "gated_prompt_bwd(Tensor grad_out, Tensor zs, Tensor u, Tensor v, Tensor? task_ids, "
      "bool need_zs, bool need_u, bool need_v) -> (Tensor, Tensor, Tensor)");
  m.def("ulpt_fwd(Tensor z, Tensor proj, Tensor scale, Tensor shift, Tensor? task_ids) -> Tensor");
  m.def(
      "ulpt_bwd(Tensor grad_out, Tensor z, Tensor proj, Tensor scale, Tensor? task_ids, "
      "bool need_z, bool need_proj, bool need_scale, bool need_shift) -> (Tensor, Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lopa's fused CPU kernels; the ops themselves live in torch.ops.lopa_cpp";
  m.def("set_poison_outputs", &lopa::set_poison_outputs, pybind11::arg("enabled"),
        "While on, every tensor the lopa_cpp ops return is NaN-filled before the kernel writes it "
        "(a test hook that exposes unwritten elements).");
  m.def("poison_outputs_enabled", &lopa::poison_outputs_enabled, "Whether output poisoning is on.");
}
