// ULPT: out[t] = (z[t] @ proj) * scale[t] + shift[t] (row b is task t_b with task_ids) and
// its gradients (see lopa/reference.py: ulpt_prompt, ulpt_prompt_backward).
//
// Forward works on (task, column block) units and builds each task's prompt once; with
// task_ids the rows are then copied whole to every output row of that task.  Backward works on column
// blocks: dproj sums over tasks and prompt positions, which all live in the block, so each
// unit owns its slab of dproj, dscale and dshift.  dz sums over d: each block writes partial
// sums that a second pass adds in block order.  z @ proj is recomputed, never saved.
#include "common.h"

namespace lopa {
namespace {

struct UlptShapes {
  int64_t tasks, n, r, d;
};

UlptShapes check_ulpt_inputs(const at::Tensor& z, const at::Tensor& proj, const at::Tensor& scale) {
  TORCH_CHECK(z.dim() == 3, "lopa_cpp: z must have shape (T, n, r), got ", z.sizes());
  TORCH_CHECK(proj.dim() == 2, "lopa_cpp: proj must have shape (r, d), got ", proj.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "lopa_cpp: z must be a floating tensor, got ",
              z.scalar_type());
  check_float_cpu(z, "z", z.scalar_type());
  check_float_cpu(proj, "proj", z.scalar_type());
  check_float_cpu(scale, "scale", z.scalar_type());
  const UlptShapes s{z.size(0), z.size(1), z.size(2), proj.size(1)};
  check_shape(proj, "proj", {s.r, s.d});
  check_shape(scale, "scale", {s.tasks, s.d});
  return s;
}

// Task of every output row: task_ids, or one row per task without them.
std::vector<int64_t> task_of_rows(const std::optional<at::Tensor>& task_ids, const UlptShapes& s) {
  if (!task_ids.has_value()) {
    std::vector<int64_t> identity(s.tasks);
    for (int64_t t = 0; t < s.tasks; ++t) identity[t] = t;
    return identity;
  }
  return checked_task_ids(*task_ids, s.tasks);
}

// Column blocks of about d / 8 columns, at most 256: the proj slab (r x block) and the prompt
// tile (n x block) then stay in L2 for r and n in the hundreds.
template <typename opmath_t>
int64_t ulpt_block_cols(int64_t d) {
  return column_block<opmath_t>(d, 8, 256);
}

// Scratch shared by forward and backward units.
template <typename opmath_t>
struct UlptScratch {
  std::vector<opmath_t> proj_tile, z_rows, tile, row;
  UlptScratch(const UlptShapes& s, int64_t block_cols)
      : proj_tile(s.r * block_cols), z_rows(s.n * s.r), tile(s.n * block_cols), row(block_cols) {}
};

template <typename scalar_t, typename opmath_t>
void pack_proj_block(const at::Tensor& proj, const ColumnBlock& blk, opmath_t* dst) {
  const scalar_t* src = proj.const_data_ptr<scalar_t>() + blk.begin * proj.stride(1);
  pack_tile(src, proj.stride(0), proj.stride(1), proj.size(0), blk.width, dst, blk.padded);
}

template <typename scalar_t, typename opmath_t>
void pack_task_z(const at::Tensor& z, int64_t t, opmath_t* dst) {
  pack_tile(z.const_data_ptr<scalar_t>() + t * z.stride(0), z.stride(1), z.stride(2), z.size(1), z.size(2), dst,
            z.size(2));
}

// Row t of a (T, d) vector (scale / shift may be an expanded stride-0 view), block slice.
template <typename scalar_t, typename opmath_t>
void load_task_vector(const at::Tensor& vec, int64_t t, const ColumnBlock& blk, opmath_t* dst) {
  const scalar_t* src = vec.const_data_ptr<scalar_t>() + t * vec.stride(0) + blk.begin * vec.stride(1);
  load_row(src, vec.stride(1), blk.width, dst, blk.padded);
}

// ----------------------------------------------------------------------------- forward
// prompts[t] = (z[t] @ proj) * scale[t] + shift[t] for every task with used[t] set; prompts is
// (T, n, d) contiguous.
template <typename scalar_t>
void ulpt_forward_kernel(const at::Tensor& z, const at::Tensor& proj, const at::Tensor& scale,
                         const at::Tensor& shift, const std::vector<bool>& used, const UlptShapes& s,
                         at::Tensor& prompts) {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t block_cols = ulpt_block_cols<opmath_t>(s.d);
  const int64_t num_blocks = ceil_div(s.d, block_cols);
  scalar_t* out_p = prompts.data_ptr<scalar_t>();
  const int64_t work_per_unit = s.n * block_cols * (s.r + 2);

  at::parallel_for(0, s.tasks * num_blocks, grain_for(work_per_unit), [&](int64_t begin, int64_t end) {
    UlptScratch<opmath_t> scratch(s, block_cols);
    std::vector<opmath_t> shift_row(block_cols);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t t = unit / num_blocks;
      if (!used[t]) continue;
      const ColumnBlock blk = column_block_at<opmath_t>(unit % num_blocks, block_cols, s.d);
      pack_proj_block<scalar_t>(proj, blk, scratch.proj_tile.data());
      pack_task_z<scalar_t>(z, t, scratch.z_rows.data());
      opmath_t* e = scratch.tile.data();
      matmul_tile<opmath_t, false>(scratch.z_rows.data(), s.r, 1, scratch.proj_tile.data(), blk.padded, e,
                                   blk.padded, s.n, s.r, blk.padded);
      load_task_vector<scalar_t>(scale, t, blk, scratch.row.data());
      load_task_vector<scalar_t>(shift, t, blk, shift_row.data());
      for (int64_t i = 0; i < s.n; ++i) {
        opmath_t* e_row = e + i * blk.padded;
        for (int64_t j = 0; j < blk.padded; j += Vec::size()) {
          at::vec::fmadd(Vec::loadu(e_row + j), Vec::loadu(scratch.row.data() + j), Vec::loadu(shift_row.data() + j))
              .store(e_row + j);
        }
      }
      scalar_t* dst = out_p + t * s.n * s.d + blk.begin;
      for (int64_t i = 0; i < s.n; ++i) store_row(e + i * blk.padded, blk.width, dst + i * s.d);
    }
  });
}

// out[row] = prompts[task_of_row[row]], copied one whole (d-long) prompt row at a time so the
// output is written sequentially.
template <typename scalar_t>
void copy_task_prompts(const at::Tensor& prompts, const std::vector<int64_t>& task_of_row, const UlptShapes& s,
                       at::Tensor& out) {
  const scalar_t* src = prompts.const_data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  const int64_t rows = static_cast<int64_t>(task_of_row.size()) * s.n;
  at::parallel_for(0, rows, grain_for(s.d), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t o = row / s.n, i = row % s.n;
      std::memcpy(dst + row * s.d, src + (task_of_row[o] * s.n + i) * s.d, s.d * sizeof(scalar_t));
    }
  });
}

// ----------------------------------------------------------------------------- backward
struct UlptGrads {
  bool z, proj, scale, shift;
};

// Where G_t (the output gradient summed over the rows of task t) is read from: grad_out
// itself when every task has exactly one row (no task_ids), else a summed copy.
template <typename scalar_t, typename opmath_t>
struct TaskGradSource {
  const scalar_t* direct = nullptr;  // grad_out, indexed with its strides
  int64_t task_stride = 0, row_stride = 0, col_stride = 0;
  at::Tensor summed;  // (T, n, d) in the compute type, contiguous

  void load_block(int64_t t, int64_t n, const ColumnBlock& blk, opmath_t* g) const {
    for (int64_t i = 0; i < n; ++i) {
      if (direct) {
        load_row(direct + t * task_stride + i * row_stride + blk.begin * col_stride, col_stride, blk.width,
                 g + i * blk.padded, blk.padded);
      } else {
        const opmath_t* src = summed.const_data_ptr<opmath_t>() + (t * n + i) * summed.size(2) + blk.begin;
        load_row(src, 1, blk.width, g + i * blk.padded, blk.padded);
      }
    }
  }
};

// G_t = sum of grad_out[row] over the rows of task t, in row order, one whole (d-long) row at
// a time so grad_out is read sequentially.  A task no row uses gets zeros.
template <typename scalar_t, typename opmath_t>
TaskGradSource<scalar_t, opmath_t> task_grad_source(const at::Tensor& grad_out, const RowsOfTask& rows_of,
                                                    const UlptShapes& s, bool one_row_per_task) {
  TaskGradSource<scalar_t, opmath_t> source;
  if (one_row_per_task) {
    source.direct = grad_out.const_data_ptr<scalar_t>();
    source.task_stride = grad_out.stride(0);
    source.row_stride = grad_out.stride(1);
    source.col_stride = grad_out.stride(2);
    return source;
  }
  at::Tensor summed = at::empty({s.tasks, s.n, s.d}, grad_out.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
  source.summed = summed;
  opmath_t* dst = summed.data_ptr<opmath_t>();
  const scalar_t* src = grad_out.const_data_ptr<scalar_t>();
  at::parallel_for(0, s.tasks * s.n, grain_for(s.d * 2), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / s.n, i = row % s.n;
      opmath_t* sum = dst + row * s.d;
      std::fill_n(sum, s.d, opmath_t(0));
      for (int64_t k = rows_of.start[t]; k < rows_of.start[t + 1]; ++k) {
        add_row(src + rows_of.rows[k] * grad_out.stride(0) + i * grad_out.stride(1), grad_out.stride(2), s.d, sum);
      }
    }
  });
  return source;
}

// col[j] = sum_i a[i, j] (* b[i, j] when b is given), rows summed in order.
template <typename T>
void column_sums(const T* a, const T* b, int64_t rows, int64_t padded, T* col) {
  using Vec = at::vec::Vectorized<T>;
  std::fill_n(col, padded, T(0));
  for (int64_t i = 0; i < rows; ++i) {
    const T* a_row = a + i * padded;
    for (int64_t j = 0; j < padded; j += Vec::size()) {
      const Vec term = b ? Vec::loadu(a_row + j) * Vec::loadu(b + i * padded + j) : Vec::loadu(a_row + j);
      (Vec::loadu(col + j) + term).store(col + j);
    }
  }
}

template <typename T>
void scale_rows(T* tile, const T* scale_row, int64_t rows, int64_t padded) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < padded; j += Vec::size()) {
      (Vec::loadu(tile + i * padded + j) * Vec::loadu(scale_row + j)).store(tile + i * padded + j);
    }
  }
}

// A task no row uses gets exact zeros and adds nothing to dproj, whatever its values (the
// general path would compute 0 * inf = NaN for a non-finite z, proj or scale).
template <typename scalar_t, typename opmath_t>
void write_unused_task_block(int64_t t, const ColumnBlock& blk, const UlptShapes& s, const UlptGrads& need,
                             int64_t out_offset, at::Tensor& grad_scale, at::Tensor& grad_shift,
                             at::Tensor& dz_partial, int64_t block) {
  if (need.shift) std::fill_n(grad_shift.data_ptr<scalar_t>() + out_offset, blk.width, scalar_t(0));
  if (need.scale) std::fill_n(grad_scale.data_ptr<scalar_t>() + out_offset, blk.width, scalar_t(0));
  if (need.z) std::fill_n(dz_partial.data_ptr<opmath_t>() + (block * s.tasks + t) * s.n * s.r, s.n * s.r, opmath_t(0));
}

template <typename scalar_t>
void ulpt_backward_kernel(const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& proj,
                          const at::Tensor& scale, const RowsOfTask& rows_of, bool one_row_per_task,
                          const UlptShapes& s, UlptGrads need, at::Tensor& grad_z, at::Tensor& grad_proj,
                          at::Tensor& grad_scale, at::Tensor& grad_shift) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t block_cols = ulpt_block_cols<opmath_t>(s.d);
  const int64_t num_blocks = ceil_div(s.d, block_cols);
  const int64_t r_padded = round_up(s.r, tile_cols<opmath_t>());
  const auto opmath_options = z.options().dtype(c10::CppTypeToScalarType<opmath_t>::value);
  at::Tensor dz_partial = need.z ? at::empty({num_blocks, s.tasks, s.n, s.r}, opmath_options) : at::Tensor();
  const auto grads = task_grad_source<scalar_t, opmath_t>(grad_out, rows_of, s, one_row_per_task);
  const int64_t work_per_unit = s.tasks * s.n * block_cols * (3 * s.r + 4);

  at::parallel_for(0, num_blocks, grain_for(work_per_unit), [&](int64_t begin, int64_t end) {
    UlptScratch<opmath_t> scratch(s, block_cols);
    std::vector<opmath_t> g(s.n * block_cols);
    std::vector<opmath_t> proj_t(need.z ? block_cols * r_padded : 0), dz_tile(need.z ? s.n * r_padded : 0);
    std::vector<opmath_t> dproj_tile(need.proj ? s.r * block_cols : 0);
    opmath_t* col = scratch.row.data();
    for (int64_t block = begin; block < end; ++block) {
      const ColumnBlock blk = column_block_at<opmath_t>(block, block_cols, s.d);
      if (need.scale) pack_proj_block<scalar_t>(proj, blk, scratch.proj_tile.data());
      if (need.z) {
        // proj[:, block]^T (width x r, zero-padded to r_padded columns) for dz = G P^T.
        const scalar_t* src = proj.const_data_ptr<scalar_t>() + blk.begin * proj.stride(1);
        pack_tile(src, proj.stride(1), proj.stride(0), blk.width, s.r, proj_t.data(), r_padded);
      }
      std::fill(dproj_tile.begin(), dproj_tile.end(), opmath_t(0));
      for (int64_t t = 0; t < s.tasks; ++t) {
        const int64_t out_offset = t * s.d + blk.begin;
        if (!rows_of.uses(t)) {
          write_unused_task_block<scalar_t, opmath_t>(t, blk, s, need, out_offset, grad_scale, grad_shift, dz_partial,
                                                      block);
          continue;
        }
        grads.load_block(t, s.n, blk, g.data());
        if (need.shift) {
          column_sums<opmath_t>(g.data(), nullptr, s.n, blk.padded, col);
          store_row(col, blk.width, grad_shift.data_ptr<scalar_t>() + out_offset);
        }
        if (need.scale || need.proj) pack_task_z<scalar_t>(z, t, scratch.z_rows.data());
        if (need.scale) {
          opmath_t* y = scratch.tile.data();  // z[t] @ proj, recomputed
          matmul_tile<opmath_t, false>(scratch.z_rows.data(), s.r, 1, scratch.proj_tile.data(), blk.padded, y,
                                       blk.padded, s.n, s.r, blk.padded);
          column_sums<opmath_t>(g.data(), y, s.n, blk.padded, col);
          store_row(col, blk.width, grad_scale.data_ptr<scalar_t>() + out_offset);
        }
        if (!need.z && !need.proj) continue;
        load_task_vector<scalar_t>(scale, t, blk, col);
        scale_rows(g.data(), col, s.n, blk.padded);  // g := G_t * scale[t]
        if (need.z) {
          // dz[t] over this block = (G_t * scale[t]) @ proj[:, block]^T.
          matmul_tile<opmath_t, false>(g.data(), blk.padded, 1, proj_t.data(), r_padded, dz_tile.data(), r_padded, s.n,
                                       blk.width, r_padded);
          opmath_t* dz = dz_partial.data_ptr<opmath_t>() + (block * s.tasks + t) * s.n * s.r;
          for (int64_t i = 0; i < s.n; ++i) std::copy_n(dz_tile.data() + i * r_padded, s.r, dz + i * s.r);
        }
        if (need.proj) {
          // dproj[:, block] += z[t]^T @ (G_t * scale[t]): A is z_rows read transposed.
          matmul_tile<opmath_t, true>(scratch.z_rows.data(), 1, s.r, g.data(), blk.padded, dproj_tile.data(),
                                      blk.padded, s.r, s.n, blk.padded);
        }
      }
      if (need.proj) {
        scalar_t* dst = grad_proj.data_ptr<scalar_t>() + blk.begin;
        for (int64_t k = 0; k < s.r; ++k) store_row(dproj_tile.data() + k * blk.padded, blk.width, dst + k * s.d);
      }
    }
  });

  if (need.z) {
    sum_partials_in_order(dz_partial.const_data_ptr<opmath_t>(), num_blocks, s.tasks * s.n * s.r,
                          grad_z.data_ptr<scalar_t>());
  }
}

}  // namespace

// ----------------------------------------------------------------------------- ops
// Bound to Python in registration.cpp; lopa/ops.py registers them as the CPU kernels of
// lopa::ulpt_fwd / lopa::ulpt_bwd.
at::Tensor ulpt_fwd(const at::Tensor& z, const at::Tensor& proj, const at::Tensor& scale, const at::Tensor& shift,
                    const std::optional<at::Tensor>& task_ids) {
  const UlptShapes s = check_ulpt_inputs(z, proj, scale);
  check_float_cpu(shift, "shift", z.scalar_type());
  check_shape(shift, "shift", {s.tasks, s.d});
  const std::vector<int64_t> task_of_row = task_of_rows(task_ids, s);
  at::Tensor out = new_output({static_cast<int64_t>(task_of_row.size()), s.n, s.d}, z.options());
  if (out.numel() == 0) return out;
  std::vector<bool> used(s.tasks, false);
  for (int64_t t : task_of_row) used[t] = true;
  // Without task_ids the output is the per-task prompts; with them, build each used task's
  // prompt once and copy it to its rows.
  at::Tensor prompts = task_ids.has_value() ? at::empty({s.tasks, s.n, s.d}, z.options()) : out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lopa_ulpt_fwd", [&] {
    ulpt_forward_kernel<scalar_t>(z, proj, scale, shift, used, s, prompts);
    if (task_ids.has_value()) copy_task_prompts<scalar_t>(prompts, task_of_row, s, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ulpt_bwd(
    const at::Tensor& grad_out, const at::Tensor& z, const at::Tensor& proj, const at::Tensor& scale,
    const std::optional<at::Tensor>& task_ids, bool need_z, bool need_proj, bool need_scale, bool need_shift) {
  const UlptShapes s = check_ulpt_inputs(z, proj, scale);
  const std::vector<int64_t> task_of_row = task_of_rows(task_ids, s);
  check_float_cpu(grad_out, "grad_out", z.scalar_type());
  check_shape(grad_out, "grad_out", {static_cast<int64_t>(task_of_row.size()), s.n, s.d});
  const RowsOfTask rows_of(task_of_row, s.tasks);
  const auto options = z.options();
  at::Tensor grad_z = need_z ? new_output(z.sizes(), options) : gradient_not_needed(options);
  at::Tensor grad_proj = need_proj ? new_output(proj.sizes(), options) : gradient_not_needed(options);
  at::Tensor grad_scale = need_scale ? new_output({s.tasks, s.d}, options) : gradient_not_needed(options);
  at::Tensor grad_shift = need_shift ? new_output({s.tasks, s.d}, options) : gradient_not_needed(options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lopa_ulpt_bwd", [&] {
    ulpt_backward_kernel<scalar_t>(grad_out, z, proj, scale, rows_of, !task_ids.has_value(), s,
                                   UlptGrads{need_z, need_proj, need_scale, need_shift}, grad_z, grad_proj,
                                   grad_scale, grad_shift);
  });
  return {grad_z, grad_proj, grad_scale, grad_shift};
}

}  // namespace lopa
