// LoPA gate: out[b] = zs[t_b] * sigmoid(u[b] @ v[b]) and its gradients (see
// lopa/reference.py: gated_prompt, gated_prompt_backward).
//
// Both directions work on (batch rows, column block) units and walk each row's block in
// groups of a few prompt rows, so the gate never exists beyond a small tile: the backward
// recomputes it and nothing (B, m, d) is saved.
//
// Backward reductions, all without atomics and in a fixed order:
// * grad_v[b] sums over prompt rows: complete inside a unit.
// * grad_u[b] sums over d: each column block writes partial sums, added in block order.
// * grad_zs[t] sums over the batch rows of task t: batch rows are cut into fixed chunks,
//   each chunk accumulates into its own slab per task it contains ("slot"), and a second
//   pass adds a task's slots in chunk order.
#include "common.h"

namespace lopa {
namespace {

struct GatedShapes {
  int64_t tasks, batch, m, r, d;
};

GatedShapes check_gated_inputs(const at::Tensor& zs, const at::Tensor& u, const at::Tensor& v) {
  TORCH_CHECK(zs.dim() == 3, "lopa_cpp: zs must have shape (T, m, d), got ", zs.sizes());
  TORCH_CHECK(u.dim() == 3, "lopa_cpp: u must have shape (B, m, r), got ", u.sizes());
  TORCH_CHECK(v.dim() == 3, "lopa_cpp: v must have shape (B, r, d), got ", v.sizes());
  TORCH_CHECK(at::isFloatingType(zs.scalar_type()), "lopa_cpp: zs must be a floating tensor, got ",
              zs.scalar_type());
  check_float_cpu(zs, "zs", zs.scalar_type());
  check_float_cpu(u, "u", zs.scalar_type());
  check_float_cpu(v, "v", zs.scalar_type());
  const GatedShapes s{zs.size(0), u.size(0), zs.size(1), u.size(2), zs.size(2)};
  check_shape(u, "u", {s.batch, s.m, s.r});
  check_shape(v, "v", {s.batch, s.r, s.d});
  return s;
}

// Task of every batch row: task_ids, or task 0 for all rows when there is no bank.
std::vector<int64_t> task_of_rows(const std::optional<at::Tensor>& task_ids, const GatedShapes& s) {
  if (!task_ids.has_value()) {
    TORCH_CHECK(s.tasks == 1, "lopa_cpp: zs is a bank of ", s.tasks, " tasks, so task_ids (B,) is required");
    return std::vector<int64_t>(s.batch, 0);
  }
  TORCH_CHECK(task_ids->dim() == 1 && task_ids->size(0) == s.batch, "lopa_cpp: task_ids must have shape (",
              s.batch, ",), got ", task_ids->sizes());
  return checked_task_ids(*task_ids, s.tasks);
}

// Prompt rows per gate tile: one micro-kernel row block (see matmul_tile).
constexpr int64_t kRowGroup = 6;

// Per-unit scratch: u[b] (m x r), the v[b] column slab (r x padded), the gate pre-activation
// of one row group (kRowGroup x padded) and rows converted to the compute type.
template <typename opmath_t>
struct GateScratch {
  std::vector<opmath_t> u_rows, v_tile, gate, row_a, row_b;
  GateScratch(const GatedShapes& s, int64_t block_cols)
      : u_rows(s.m * s.r), v_tile(s.r * block_cols), gate(kRowGroup * block_cols), row_a(block_cols),
        row_b(block_cols) {}
};

// Stage the operands of row b for one column block: u[b] and v[b][:, block], converted.
template <typename scalar_t, typename opmath_t>
void pack_gate_operands(const at::Tensor& u, const at::Tensor& v, int64_t b, const ColumnBlock& blk,
                        const GatedShapes& s, GateScratch<opmath_t>& scratch) {
  const scalar_t* u_b = u.const_data_ptr<scalar_t>() + b * u.stride(0);
  const scalar_t* v_b = v.const_data_ptr<scalar_t>() + b * v.stride(0) + blk.begin * v.stride(2);
  pack_tile(u_b, u.stride(1), u.stride(2), s.m, s.r, scratch.u_rows.data(), s.r);
  pack_tile(v_b, v.stride(1), v.stride(2), s.r, blk.width, scratch.v_tile.data(), blk.padded);
}

// scratch.gate (rows x padded) = u[b][i0:i0+rows] @ v[b][:, block], the pre-activation;
// the sigmoid is applied by the row passes that consume it.
template <typename opmath_t>
void compute_gate_preactivation(int64_t i0, int64_t rows, const ColumnBlock& blk, const GatedShapes& s,
                                GateScratch<opmath_t>& scratch) {
  matmul_tile<opmath_t, false>(scratch.u_rows.data() + i0 * s.r, s.r, 1, scratch.v_tile.data(), blk.padded,
                               scratch.gate.data(), blk.padded, rows, s.r, blk.padded);
}

// lanes[0:V] = sigmoid(pre[0:V]) for the last, partial vector of a row: the scratch row is
// padded, so a whole vector can be read past the valid width.
template <typename T>
void sigmoid_tail(const T* pre, T* lanes) {
  sigmoid(at::vec::Vectorized<T>::loadu(pre)).store(lanes);
}

// Forward and backward split d the same way, into wide blocks (see streaming_block_cols).
template <typename opmath_t>
int64_t gate_block_cols(const GatedShapes& s, int64_t row_units) {
  return streaming_block_cols<opmath_t>(s.d, row_units);
}

// ----------------------------------------------------------------------------- forward
// out[0:n] = zs[0:n] * sigmoid(pre[0:n]), rounded once; pre is a padded scratch row (reused as
// the staging row for half outputs).
template <typename scalar_t, typename opmath_t>
void store_gated_row(const opmath_t* zs_row, opmath_t* pre, int64_t n, scalar_t* dst) {
  using Vec = at::vec::Vectorized<opmath_t>;
  opmath_t* product = pre;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) product = dst;  // write straight to the output
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    (Vec::loadu(zs_row + j) * sigmoid(Vec::loadu(pre + j))).store(product + j);
  }
  if (j < n) {
    opmath_t gate[Vec::size()];
    sigmoid_tail(pre + j, gate);
    for (int64_t k = 0; j + k < n; ++k) product[j + k] = zs_row[j + k] * gate[k];
  }
  if constexpr (!std::is_same_v<scalar_t, opmath_t>) store_row(product, n, dst);
}

template <typename scalar_t>
void gated_forward_kernel(const at::Tensor& zs, const at::Tensor& u, const at::Tensor& v,
                          const std::vector<int64_t>& task_of_row, const GatedShapes& s, at::Tensor& out) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t block_cols = gate_block_cols<opmath_t>(s, s.batch);
  const int64_t num_blocks = ceil_div(s.d, block_cols);
  const scalar_t* zs_p = zs.const_data_ptr<scalar_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();

  at::parallel_for(0, s.batch * num_blocks, grain_for(s.m * block_cols * (s.r + 8)), [&](int64_t begin, int64_t end) {
    GateScratch<opmath_t> scratch(s, block_cols);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / num_blocks;
      const ColumnBlock blk = column_block_at<opmath_t>(unit % num_blocks, block_cols, s.d);
      pack_gate_operands<scalar_t>(u, v, b, blk, s, scratch);
      const scalar_t* zs_t = zs_p + task_of_row[b] * zs.stride(0) + blk.begin * zs.stride(2);
      for (int64_t i0 = 0; i0 < s.m; i0 += kRowGroup) {
        const int64_t rows = std::min(kRowGroup, s.m - i0);
        compute_gate_preactivation(i0, rows, blk, s, scratch);
        for (int64_t ii = 0; ii < rows; ++ii) {
          const int64_t i = i0 + ii;
          const opmath_t* zs_row = row_in_opmath(zs_t + i * zs.stride(1), zs.stride(2), blk.width, scratch.row_a.data());
          store_gated_row(zs_row, scratch.gate.data() + ii * blk.padded, blk.width, out_p + (b * s.m + i) * s.d + blk.begin);
        }
      }
    }
  });
}

// ----------------------------------------------------------------------------- backward
struct GatedGrads {
  bool zs, u, v;
};

// Batch rows cut into fixed chunks; inside a chunk, one accumulation slot per distinct task.
struct BatchChunks {
  int64_t rows_per_chunk = 1, count = 0;
  std::vector<int64_t> slot_of_row;  // global slot index of every batch row
  std::vector<int64_t> first_slot;   // chunk c owns slots [first_slot[c], first_slot[c + 1])
  std::vector<int64_t> task_of_slot;
};

BatchChunks chunk_batch_rows(const std::vector<int64_t>& task_of_row, int64_t num_tasks) {
  BatchChunks chunks;
  const int64_t batch = static_cast<int64_t>(task_of_row.size());
  // At most 16 chunks: bounds the partial slabs to 16 per task (a few for T = 1) while still
  // giving every thread work.  Depends on B only, never on the thread count.
  chunks.rows_per_chunk = std::max<int64_t>(8, ceil_div(batch, 16));
  chunks.count = ceil_div(batch, chunks.rows_per_chunk);
  chunks.slot_of_row.resize(batch);
  chunks.first_slot.push_back(0);
  std::vector<int64_t> slot_of_task(num_tasks, -1);
  for (int64_t c = 0; c < chunks.count; ++c) {
    const int64_t row_end = std::min(batch, (c + 1) * chunks.rows_per_chunk);
    for (int64_t b = c * chunks.rows_per_chunk; b < row_end; ++b) {
      const int64_t t = task_of_row[b];
      if (slot_of_task[t] < 0) {
        slot_of_task[t] = static_cast<int64_t>(chunks.task_of_slot.size());
        chunks.task_of_slot.push_back(t);
      }
      chunks.slot_of_row[b] = slot_of_task[t];
    }
    for (int64_t slot = chunks.first_slot.back(); slot < static_cast<int64_t>(chunks.task_of_slot.size()); ++slot) {
      slot_of_task[chunks.task_of_slot[slot]] = -1;
    }
    chunks.first_slot.push_back(static_cast<int64_t>(chunks.task_of_slot.size()));
  }
  return chunks;
}

// One prompt row of the backward, from the pre-activation row `pre` (padded scratch) and the
// output gradient g[0:n]:
//   slot[0:n] += g * s                       (when slot is given: the grad_zs accumulator)
//   pre[0:n]   = g * zs * s * (1 - s) = H    (when zs_row is given; padded tail zeroed, so it
//                                             adds nothing to du)
// with s = sigmoid(pre).
template <typename T>
void backprop_gate_row(T* pre, const T* g, const T* zs_row, T* slot, int64_t n, int64_t padded) {
  using Vec = at::vec::Vectorized<T>;
  const Vec one(T(1));
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec sg = sigmoid(Vec::loadu(pre + j));
    const Vec gv = Vec::loadu(g + j);
    if (slot) at::vec::fmadd(gv, sg, Vec::loadu(slot + j)).store(slot + j);
    if (zs_row) (gv * Vec::loadu(zs_row + j) * sg * (one - sg)).store(pre + j);
  }
  if (j < n) {
    T gate[Vec::size()];
    sigmoid_tail(pre + j, gate);
    for (int64_t k = 0; j + k < n; ++k) {
      const T sg = gate[k], gv = g[j + k];
      if (slot) slot[j + k] += gv * sg;
      if (zs_row) pre[j + k] = gv * zs_row[j + k] * sg * (T(1) - sg);
    }
  }
  if (zs_row) std::fill(pre + n, pre + padded, T(0));
}

// grad_zs[t] = sum of the task's slot slabs, in chunk order; a task without rows gets zeros.
template <typename scalar_t, typename opmath_t>
void sum_task_slots(const opmath_t* slots, const BatchChunks& chunks, const GatedShapes& s, scalar_t* grad_zs) {
  const RowsOfTask slots_of(chunks.task_of_slot, s.tasks);
  at::parallel_for(0, s.tasks * s.m, grain_for(s.d * 2), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> sum(s.d);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / s.m, i = row % s.m;
      std::fill(sum.begin(), sum.end(), opmath_t(0));
      for (int64_t k = slots_of.start[t]; k < slots_of.start[t + 1]; ++k) {
        add_row(slots + (slots_of.rows[k] * s.m + i) * s.d, 1, s.d, sum.data());
      }
      store_row(sum.data(), s.d, grad_zs + row * s.d);
    }
  });
}

template <typename scalar_t>
void gated_backward_kernel(const at::Tensor& grad_out, const at::Tensor& zs, const at::Tensor& u,
                           const at::Tensor& v, const std::vector<int64_t>& task_of_row,
                           const GatedShapes& s, GatedGrads need, at::Tensor& grad_zs,
                           at::Tensor& grad_u, at::Tensor& grad_v) {
  using opmath_t = at::opmath_type<scalar_t>;
  const BatchChunks chunks = chunk_batch_rows(task_of_row, s.tasks);
  const int64_t block_cols = gate_block_cols<opmath_t>(s, chunks.count);
  const int64_t num_blocks = ceil_div(s.d, block_cols);
  const auto opmath_options = zs.options().dtype(c10::CppTypeToScalarType<opmath_t>::value);
  const int64_t num_slots = static_cast<int64_t>(chunks.task_of_slot.size());
  at::Tensor zs_slots = need.zs ? at::empty({num_slots, s.m, s.d}, opmath_options) : at::Tensor();
  at::Tensor du_partial = need.u ? at::empty({num_blocks, s.batch, s.m, s.r}, opmath_options) : at::Tensor();
  const bool need_uv = need.u || need.v;
  const scalar_t* g_p = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* zs_p = zs.const_data_ptr<scalar_t>();
  const int64_t work_per_unit = chunks.rows_per_chunk * s.m * block_cols * (3 * s.r + 12);

  at::parallel_for(0, chunks.count * num_blocks, grain_for(work_per_unit), [&](int64_t begin, int64_t end) {
    GateScratch<opmath_t> scratch(s, block_cols);
    std::vector<opmath_t> dv_tile(need.v ? s.r * block_cols : 0);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t chunk = unit / num_blocks, block = unit % num_blocks;
      const ColumnBlock blk = column_block_at<opmath_t>(block, block_cols, s.d);
      opmath_t* slots = need.zs ? zs_slots.data_ptr<opmath_t>() : nullptr;
      if (need.zs) {
        for (int64_t row = chunks.first_slot[chunk] * s.m; row < chunks.first_slot[chunk + 1] * s.m; ++row) {
          std::fill_n(slots + row * s.d + blk.begin, blk.width, opmath_t(0));
        }
      }
      const int64_t row_end = std::min(s.batch, (chunk + 1) * chunks.rows_per_chunk);
      for (int64_t b = chunk * chunks.rows_per_chunk; b < row_end; ++b) {
        const int64_t t = task_of_row[b];
        pack_gate_operands<scalar_t>(u, v, b, blk, s, scratch);
        std::fill(dv_tile.begin(), dv_tile.end(), opmath_t(0));
        for (int64_t i0 = 0; i0 < s.m; i0 += kRowGroup) {
          const int64_t rows = std::min(kRowGroup, s.m - i0);
          compute_gate_preactivation(i0, rows, blk, s, scratch);
          for (int64_t ii = 0; ii < rows; ++ii) {
            const int64_t i = i0 + ii;
            const scalar_t* g_src = g_p + b * grad_out.stride(0) + i * grad_out.stride(1) + blk.begin * grad_out.stride(2);
            const opmath_t* g = row_in_opmath(g_src, grad_out.stride(2), blk.width, scratch.row_a.data());
            const opmath_t* zs_row = need_uv ? row_in_opmath(zs_p + t * zs.stride(0) + i * zs.stride(1) + blk.begin * zs.stride(2),
                                                             zs.stride(2), blk.width, scratch.row_b.data())
                                             : nullptr;
            opmath_t* slot = need.zs ? slots + (chunks.slot_of_row[b] * s.m + i) * s.d + blk.begin : nullptr;
            backprop_gate_row(scratch.gate.data() + ii * blk.padded, g, zs_row, slot, blk.width, blk.padded);  // gate := H
          }
          if (need.u) {
            // du[b][i0:i0+rows] over this block = H @ v[b][:, block]^T.
            opmath_t* du = du_partial.data_ptr<opmath_t>() + (block * s.batch + b) * s.m * s.r;
            matmul_nt_tile(scratch.gate.data(), blk.padded, scratch.v_tile.data(), blk.padded, du + i0 * s.r, s.r, rows,
                           s.r, blk.padded);
          }
          if (need.v) {
            // dv[b][:, block] += u[b][i0:i0+rows]^T @ H (prompt rows added in order).
            matmul_tile<opmath_t, true>(scratch.u_rows.data() + i0 * s.r, 1, s.r, scratch.gate.data(), blk.padded,
                                        dv_tile.data(), blk.padded, s.r, rows, blk.padded);
          }
        }
        if (need.v) {
          scalar_t* dv = grad_v.data_ptr<scalar_t>() + b * s.r * s.d + blk.begin;
          for (int64_t k = 0; k < s.r; ++k) store_row(dv_tile.data() + k * blk.padded, blk.width, dv + k * s.d);
        }
      }
    }
  });

  if (need.zs) sum_task_slots(zs_slots.const_data_ptr<opmath_t>(), chunks, s, grad_zs.data_ptr<scalar_t>());
  if (need.u) {
    sum_partials_in_order(du_partial.const_data_ptr<opmath_t>(), num_blocks, s.batch * s.m * s.r,
                          grad_u.data_ptr<scalar_t>());
  }
}

}  // namespace

// ----------------------------------------------------------------------------- ops
// Bound to Python in registration.cpp; lopa/ops.py registers them as the CPU kernels of
// lopa::gated_prompt_fwd / lopa::gated_prompt_bwd.
at::Tensor gated_prompt_fwd(const at::Tensor& zs, const at::Tensor& u, const at::Tensor& v,
                            const std::optional<at::Tensor>& task_ids) {
  const GatedShapes s = check_gated_inputs(zs, u, v);
  const std::vector<int64_t> task_of_row = task_of_rows(task_ids, s);
  at::Tensor out = new_output({s.batch, s.m, s.d}, zs.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "lopa_gated_prompt_fwd", [&] {
    gated_forward_kernel<scalar_t>(zs, u, v, task_of_row, s, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_prompt_bwd(
    const at::Tensor& grad_out, const at::Tensor& zs, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& task_ids, bool need_zs, bool need_u, bool need_v) {
  const GatedShapes s = check_gated_inputs(zs, u, v);
  check_float_cpu(grad_out, "grad_out", zs.scalar_type());
  check_shape(grad_out, "grad_out", {s.batch, s.m, s.d});
  const std::vector<int64_t> task_of_row = task_of_rows(task_ids, s);
  const auto options = zs.options();
  at::Tensor grad_zs = need_zs ? new_output(zs.sizes(), options) : gradient_not_needed(options);
  at::Tensor grad_u = need_u ? new_output(u.sizes(), options) : gradient_not_needed(options);
  at::Tensor grad_v = need_v ? new_output(v.sizes(), options) : gradient_not_needed(options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "lopa_gated_prompt_bwd", [&] {
    gated_backward_kernel<scalar_t>(grad_out, zs, u, v, task_of_row, s, GatedGrads{need_zs, need_u, need_v},
                                    grad_zs, grad_u, grad_v);
  });
  return {grad_zs, grad_u, grad_v};
}

}  // namespace lopa
