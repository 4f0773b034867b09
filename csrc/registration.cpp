// The Python module lopa._C: lopa's fused CPU kernels as plain functions.
//
// lopa/ops.py defines the ops (one torch.library schema each, in Python, so they exist
// whether or not this extension is built) and registers these functions as their CPU
// kernels; its eager path calls them directly.  Each checks its own arguments (a second
// line of defence behind the Python checks) and raises IndexError for task ids outside the
// bank.
#include <torch/extension.h>

#include <atomic>

#include "common.h"

namespace lopa {
namespace {
// A test hook, read once per op call; relaxed ordering is enough for a flag set between calls.
std::atomic<bool> poison_outputs{false};
}  // namespace

bool poison_outputs_enabled() { return poison_outputs.load(std::memory_order_relaxed); }
void set_poison_outputs(bool enabled) { poison_outputs.store(enabled, std::memory_order_relaxed); }

// gated_prompt.cpp
at::Tensor gated_prompt_fwd(const at::Tensor& zs, const at::Tensor& u, const at::Tensor& v,
                            const std::optional<at::Tensor>& task_ids);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_prompt_bwd(
    const at::Tensor& grad_out, const at::Tensor& zs, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& task_ids, bool need_zs, bool need_u, bool need_v);
// ulpt.cpp
at::Tensor ulpt_fwd(const at::Tensor& z, const at::Tensor& proj, const at::Tensor& scale, const at::Tensor& shift,
                    const std::optional<at::Tensor>& task_ids);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ulpt_bwd(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& proj, const at::Tensor& scale,
    const std::optional<at::Tensor>& task_ids, bool need_z, bool need_proj, bool need_scale, bool need_shift);
// assemble.cpp
void place_tokens(at::Tensor out, const at::Tensor& table, const at::Tensor& blocks, const at::Tensor& position_block,
                  const at::Tensor& token_ids, int64_t pad_id);
void place_prompt(at::Tensor out, const at::Tensor& blocks, const at::Tensor& block_index, const at::Tensor& task_ids,
                  int64_t kind, const std::vector<at::Tensor>& source);
}  // namespace lopa

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "lopa's fused CPU kernels (the ops are torch.ops.lopa.*, defined in lopa/ops.py)";
  m.def("gated_prompt_fwd", &lopa::gated_prompt_fwd, py::arg("zs"), py::arg("u"), py::arg("v"),
        py::arg("task_ids"), "LoPA gate forward: out[b] = zs[t_b] * sigmoid(u[b] @ v[b]).");
  m.def("gated_prompt_bwd", &lopa::gated_prompt_bwd, py::arg("grad_out"), py::arg("zs"), py::arg("u"), py::arg("v"),
        py::arg("task_ids"), py::arg("need_zs"), py::arg("need_u"), py::arg("need_v"),
        "LoPA gate backward: (dzs, du, dv); a gradient not needed comes back empty.");
  m.def("ulpt_fwd", &lopa::ulpt_fwd, py::arg("z"), py::arg("proj"), py::arg("scale"), py::arg("shift"),
        py::arg("task_ids"), "ULPT forward: out[t] = (z[t] @ proj) * scale[t] + shift[t].");
  m.def("ulpt_bwd", &lopa::ulpt_bwd, py::arg("grad_out"), py::arg("z"), py::arg("proj"), py::arg("scale"),
        py::arg("task_ids"), py::arg("need_z"), py::arg("need_proj"), py::arg("need_scale"), py::arg("need_shift"),
        "ULPT backward: (dz, dproj, dscale, dshift); a gradient not needed comes back empty.");
  m.def("place_tokens", &lopa::place_tokens, py::arg("out"), py::arg("table"), py::arg("blocks"),
        py::arg("position_block"), py::arg("token_ids"), py::arg("pad_id"),
        "Input assembly, in place: every non-prompt position of out (R, T, d) from the table (see lopa/layout.py).");
  m.def("place_prompt", &lopa::place_prompt, py::arg("out"), py::arg("blocks"), py::arg("block_index"),
        py::arg("task_ids"), py::arg("kind"), py::arg("source"),
        "Input assembly, in place: the prompt rows of the given blocks (kind 1 copy, 2 ULPT, 3 LoPA gate).");
  m.def("set_poison_outputs", &lopa::set_poison_outputs, py::arg("enabled"),
        "While on, every tensor these kernels return is NaN-filled before the kernel writes it "
        "(a test hook that exposes unwritten elements).");
  m.def("poison_outputs_enabled", &lopa::poison_outputs_enabled, "Whether output poisoning is on.");
}
