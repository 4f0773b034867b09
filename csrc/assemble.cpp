// Input assembly for prompt tuning on the CPU: writes a prompted model's inputs_embeds
// (B, m+L, d) in one pass, every element once.
//
//   out[b, j] = table[row_index[b, j]]                      j <  starts[b]
//             = prompt[prompt_index[b], j - starts[b]]       starts[b] <= j < starts[b] + m
//             = table[row_index[b, j - m]]                  j >= starts[b] + m
//
// Rows are independent: OpenMP over the B*(m+L) output rows, a memcpy per row when the
// dtypes agree, a converting loop otherwise (float32 prompt into a bfloat16 model).
// Python side: lopa/assemble.py (autograd, fake kernel, fallbacks).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <type_traits>

#include "common.h"

namespace {

template <typename out_t, typename in_t>
inline void copy_row(out_t* dst, const in_t* src, int64_t n) {
  if constexpr (std::is_same_v<out_t, in_t>) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(out_t));
  } else {
    using acc_t = std::conditional_t<std::is_same_v<out_t, double> || std::is_same_v<in_t, double>, double, float>;
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<out_t>(static_cast<acc_t>(src[i]));
    }
  }
}

void check_index_range(const at::Tensor& index, int64_t limit, const char* name, const char* what) {
  const int64_t* p = index.data_ptr<int64_t>();
  for (int64_t i = 0, n = index.numel(); i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < limit, "assemble_embeds: ", name, " contains ", p[i], ", outside ", what,
                " (valid: 0..", limit - 1, ")");
  }
}

void assemble_embeds(at::Tensor out, const at::Tensor& table, const at::Tensor& row_index, const at::Tensor& starts,
                     const at::Tensor& prompt, const at::Tensor& prompt_index) {
  TORCH_CHECK(out.dim() == 3 && out.is_contiguous(), "assemble_embeds: out must be a contiguous (B, m+L, d) tensor");
  TORCH_CHECK(table.dim() == 2 && table.stride(1) == 1, "assemble_embeds: table must be (N, d) with contiguous rows");
  TORCH_CHECK(prompt.dim() == 3 && prompt.is_contiguous(), "assemble_embeds: prompt must be a contiguous (P, m, d) tensor");
  TORCH_CHECK(row_index.dim() == 2 && row_index.is_contiguous() && row_index.scalar_type() == at::kLong,
              "assemble_embeds: row_index must be a contiguous int64 (B, L) tensor");
  TORCH_CHECK(starts.dim() == 1 && starts.is_contiguous() && starts.scalar_type() == at::kLong,
              "assemble_embeds: starts must be a contiguous int64 (B,) tensor");
  TORCH_CHECK(prompt_index.dim() == 1 && prompt_index.is_contiguous() && prompt_index.scalar_type() == at::kLong,
              "assemble_embeds: prompt_index must be a contiguous int64 (B,) tensor");
  TORCH_CHECK(out.scalar_type() == table.scalar_type(), "assemble_embeds: out and table must have one dtype, got ",
              out.scalar_type(), " and ", table.scalar_type());
  for (const at::Tensor* t : {&table, &row_index, &starts, &prompt, &prompt_index}) {
    TORCH_CHECK(t->device().is_cpu(), "assemble_embeds: the C++ kernel runs on CPU tensors");
  }
  const int64_t B = out.size(0), T = out.size(1), D = out.size(2);
  const int64_t M = prompt.size(1), L = row_index.size(1);
  TORCH_CHECK(T == M + L, "assemble_embeds: out has ", T, " positions, expected m + L = ", M + L);
  TORCH_CHECK(row_index.size(0) == B && starts.size(0) == B && prompt_index.size(0) == B,
              "assemble_embeds: row_index, starts and prompt_index must have B = ", B, " rows");
  TORCH_CHECK(table.size(1) == D && prompt.size(2) == D, "assemble_embeds: table and prompt must have width d = ", D);
  if (out.numel() == 0) return;
  check_index_range(row_index, table.size(0), "row_index", "the table's rows");
  check_index_range(starts, L + 1, "starts", "[0, L]");
  check_index_range(prompt_index, prompt.size(0), "prompt_index", "the prompts");

  const int64_t* rows = row_index.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* pidx = prompt_index.data_ptr<int64_t>();
  const int64_t table_stride = table.stride(0);
  const int64_t p0 = prompt.stride(0), p1 = prompt.stride(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "assemble_embeds", [&] {
    using out_t = scalar_t;
    out_t* o = out.data_ptr<out_t>();
    const out_t* tab = table.data_ptr<out_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prompt.scalar_type(), "assemble_embeds_prompt", [&] {
      using in_t = scalar_t;
      const in_t* pr = prompt.data_ptr<in_t>();
      at::parallel_for(0, B * T, grain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / T, j = r % T, s = st[b];
          out_t* dst = o + r * D;
          if (j >= s && j < s + M) {
            copy_row(dst, pr + pidx[b] * p0 + (j - s) * p1, D);
          } else {
            const int64_t tj = j < s ? j : j - M;
            copy_row(dst, tab + rows[b * L + tj] * table_stride, D);
          }
        }
      });
    });
  });
}

// ----------------------------------------------------------------------------- LoPA
// The same layout with LoPA's gated prompt computed in place: row b's prompt row i is
// zs[t_b, i] * sigmoid(u[b, i] @ v[b]), written straight into out[b, starts[b] + i] in the
// output dtype.  No (B, m, d) prompt tensor exists; every element of out is written once.

// out[b, pos] = table[row_index[b, j]] for the L token positions of every row.
template <typename out_t>
void place_token_rows(out_t* o, const out_t* tab, int64_t table_stride, const int64_t* rows, const int64_t* st,
                      int64_t B, int64_t L, int64_t M, int64_t D) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, B * L, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / L, j = r % L;
      const int64_t pos = j < st[b] ? j : j + M;
      copy_row(o + (b * (M + L) + pos) * D, tab + rows[r] * table_stride, D);
    }
  });
}

// Prompt rows, one batch row per work unit: v[b] is packed once (r x padded d, any source
// strides), then each prompt row is a rank-r combination of its rows, gated and scaled.
template <typename out_t, typename in_t>
void place_gated_rows(out_t* o, const at::Tensor& zs, const at::Tensor& u, const at::Tensor& v,
                      const std::vector<int64_t>& task, const int64_t* st, int64_t B, int64_t L) {
  using opmath_t = at::opmath_type<in_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t M = zs.size(1), D = zs.size(2), R = u.size(2);
  const int64_t padded = lopa::round_up(std::max<int64_t>(D, 1), lopa::tile_cols<opmath_t>());
  const in_t* zs_p = zs.const_data_ptr<in_t>();
  const in_t* u_p = u.const_data_ptr<in_t>();
  const in_t* v_p = v.const_data_ptr<in_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> v_rows(R * padded), u_row(std::max<int64_t>(R, 1)), zs_row(padded), gated(padded);
    for (int64_t b = begin; b < end; ++b) {
      lopa::pack_tile(v_p + b * v.stride(0), v.stride(1), v.stride(2), R, D, v_rows.data(), padded);
      for (int64_t i = 0; i < M; ++i) {
        lopa::load_row(u_p + b * u.stride(0) + i * u.stride(1), u.stride(2), R, u_row.data(), R);
        lopa::load_row(zs_p + task[b] * zs.stride(0) + i * zs.stride(1), zs.stride(2), D, zs_row.data(), padded);
        for (int64_t j = 0; j < padded; j += Vec::size()) {
          Vec acc(opmath_t(0));
          for (int64_t k = 0; k < R; ++k) {
            acc = at::vec::fmadd(Vec(u_row[k]), Vec::loadu(v_rows.data() + k * padded + j), acc);
          }
          (Vec::loadu(zs_row.data() + j) * lopa::sigmoid(acc)).store(gated.data() + j);
        }
        lopa::store_row(gated.data(), D, o + (b * (M + L) + st[b] + i) * D);
      }
    }
  });
}

void assemble_gated_embeds(at::Tensor out, const at::Tensor& table, const at::Tensor& row_index,
                           const at::Tensor& starts, const at::Tensor& zs, const at::Tensor& u, const at::Tensor& v,
                           const std::optional<at::Tensor>& task_ids) {
  TORCH_CHECK(out.dim() == 3 && out.is_contiguous(), "assemble_gated_embeds: out must be a contiguous (B, m+L, d) tensor");
  TORCH_CHECK(table.dim() == 2 && table.stride(1) == 1, "assemble_gated_embeds: table must be (N, d) with contiguous rows");
  TORCH_CHECK(row_index.dim() == 2 && row_index.is_contiguous() && row_index.scalar_type() == at::kLong,
              "assemble_gated_embeds: row_index must be a contiguous int64 (B, L) tensor");
  TORCH_CHECK(starts.dim() == 1 && starts.is_contiguous() && starts.scalar_type() == at::kLong,
              "assemble_gated_embeds: starts must be a contiguous int64 (B,) tensor");
  TORCH_CHECK(out.scalar_type() == table.scalar_type(), "assemble_gated_embeds: out and table must have one dtype, got ",
              out.scalar_type(), " and ", table.scalar_type());
  TORCH_CHECK(zs.dim() == 3 && u.dim() == 3 && v.dim() == 3,
              "assemble_gated_embeds: zs must be (T, m, d), u (B, m, r) and v (B, r, d)");
  TORCH_CHECK(u.scalar_type() == zs.scalar_type() && v.scalar_type() == zs.scalar_type(),
              "assemble_gated_embeds: zs, u and v must have one dtype");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&out, &table, &row_index, &starts, &zs, &u, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "assemble_gated_embeds: the C++ kernel runs on CPU tensors");
  }
  const int64_t B = out.size(0), T = out.size(1), D = out.size(2);
  const int64_t M = zs.size(1), L = row_index.size(1), R = u.size(2);
  TORCH_CHECK(T == M + L, "assemble_gated_embeds: out has ", T, " positions, expected m + L = ", M + L);
  TORCH_CHECK(row_index.size(0) == B && starts.size(0) == B && u.size(0) == B && v.size(0) == B,
              "assemble_gated_embeds: row_index, starts, u and v must have B = ", B, " rows");
  TORCH_CHECK(u.size(1) == M && v.size(1) == R && zs.size(2) == D && v.size(2) == D && table.size(1) == D,
              "assemble_gated_embeds: shapes disagree: zs ", zs.sizes(), ", u ", u.sizes(), ", v ", v.sizes(),
              ", width d = ", D);
  if (out.numel() == 0) return;
  check_index_range(row_index, table.size(0), "row_index", "the table's rows");
  check_index_range(starts, L + 1, "starts", "[0, L]");
  std::vector<int64_t> task(B, 0);
  if (task_ids.has_value()) {
    TORCH_CHECK(task_ids->dim() == 1 && task_ids->size(0) == B, "assemble_gated_embeds: task_ids must be (B,)");
    task = lopa::checked_task_ids(*task_ids, zs.size(0));
  } else {
    TORCH_CHECK(zs.size(0) == 1, "assemble_gated_embeds: zs is a bank of ", zs.size(0), " tasks, so task_ids is required");
  }
  const int64_t* rows = row_index.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "assemble_gated_embeds", [&] {
    using out_t = scalar_t;
    out_t* o = out.data_ptr<out_t>();
    place_token_rows(o, table.data_ptr<out_t>(), table.stride(0), rows, st, B, L, M, D);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zs.scalar_type(), "assemble_gated_prompt", [&] {
      place_gated_rows<out_t, scalar_t>(o, zs, u, v, task, st, B, L);
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lopa_cpp, m) {
  m.def(
      "assemble_embeds(Tensor(a!) out, Tensor table, Tensor row_index, Tensor starts, Tensor prompt, "
      "Tensor prompt_index) -> ()");
  m.def(
      "assemble_gated_embeds(Tensor(a!) out, Tensor table, Tensor row_index, Tensor starts, Tensor zs, "
      "Tensor u, Tensor v, Tensor? task_ids) -> ()");
}

TORCH_LIBRARY_IMPL(lopa_cpp, CPU, m) {
  m.impl("assemble_embeds", &assemble_embeds);
  m.impl("assemble_gated_embeds", &assemble_gated_embeds);
}
