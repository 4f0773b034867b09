// Input assembly on the CPU: executes a layout plan (lopa/layout.py) into a prompted model's
// inputs_embeds (R, T, d), every element written once, in two passes:
//
//   place_tokens  every position that is not a prompt row: a token row of the table (block
//                 position q reads token q before the block's prompt, q - P after it), or
//                 the pad row for positions outside every block;
//   place_prompt  the prompt rows of the given blocks, per prompt kind:
//                   kind 1 copy  bank[slot, i]                         (prompt tuning)
//                   kind 2 ULPT  (z[slot, i] @ P) * scale[slot] + shift[slot]
//                   kind 3 gate  zs[slot, i] * sigmoid(u[k, i] @ v[k])  (LoPA, instance k)
//                 computed in float32 (double for double) and rounded once into out's dtype.
//
// Every index read from the plan is range-checked before any memory is touched: the kernels
// can be called directly (lopa._C, torch.ops.lopa.assemble), so a bad plan must give an error,
// never a stray read.  Python side: lopa/assemble.py (the op lopa::assemble: dispatch,
// autograd), lopa/layout.py (the plan).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kFields = 6;  // row, start, tokens, split, prompt_rows, offset
enum Field { kRow = 0, kStart, kTokens, kSplit, kPrompt, kOffset };
enum Kind { kCopy = 1, kUlpt = 2, kGate = 3 };

template <typename out_t, typename in_t>
inline void copy_row(out_t* dst, const in_t* src, int64_t stride, int64_t n) {
  if constexpr (std::is_same_v<out_t, in_t>) {
    if (stride == 1) {
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(out_t));
      return;
    }
  }
  using acc_t = std::conditional_t<std::is_same_v<out_t, double> || std::is_same_v<in_t, double>, double, float>;
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<out_t>(static_cast<acc_t>(src[i * stride]));
}

void check_int_vector(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous(), "lopa_cpp: ", name,
              " must be a contiguous int64 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

void check_range(const int64_t* p, int64_t n, int64_t lo, int64_t hi, const char* name, const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(p[i] >= lo && p[i] < hi, "lopa_cpp: ", name, " contains ", p[i], ", outside ", what,
                      " (valid: ", lo, "..", hi - 1, ")");
  }
}

// Every block must fit its output row and read inside token_ids.
void check_blocks(const at::Tensor& blocks, int64_t rows, int64_t length, int64_t num_tokens) {
  check_int_vector(blocks, "blocks");
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(1) == kFields, "lopa_cpp: blocks must have shape (S, 6), got ",
              blocks.sizes());
  const int64_t* b = blocks.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < blocks.size(0); ++s, b += kFields) {
    const bool ok = b[kRow] >= 0 && b[kRow] < rows && b[kStart] >= 0 && b[kTokens] >= 0 && b[kPrompt] >= 0 &&
                    b[kSplit] >= 0 && b[kSplit] <= b[kTokens] && b[kStart] + b[kTokens] + b[kPrompt] <= length &&
                    b[kOffset] >= 0 && b[kOffset] + b[kTokens] <= num_tokens;
    TORCH_CHECK_INDEX(ok, "lopa_cpp: block ", s, " (row ", b[kRow], ", start ", b[kStart], ", tokens ", b[kTokens],
                      ", split ", b[kSplit], ", prompt rows ", b[kPrompt], ", offset ", b[kOffset],
                      ") does not fit an output of ", rows, " x ", length, " positions and ", num_tokens, " token ids");
  }
}

// ----------------------------------------------------------------------------- tokens
}  // namespace

namespace lopa {

void place_tokens(at::Tensor out, const at::Tensor& table, const at::Tensor& blocks, const at::Tensor& position_block,
                  const at::Tensor& token_ids, int64_t pad_id) {
  TORCH_CHECK(out.dim() == 3 && out.is_contiguous() && out.device().is_cpu(),
              "lopa_cpp: out must be a contiguous CPU (R, T, d) tensor, got ", out.sizes());
  TORCH_CHECK(table.dim() == 2 && table.stride(1) == 1 && table.device().is_cpu(),
              "lopa_cpp: table must be a CPU (V, d) tensor with contiguous rows");
  TORCH_CHECK(out.scalar_type() == table.scalar_type(), "lopa_cpp: out and table must have one dtype, got ",
              out.scalar_type(), " and ", table.scalar_type());
  const int64_t R = out.size(0), T = out.size(1), D = out.size(2), V = table.size(0);
  TORCH_CHECK(table.size(1) == D, "lopa_cpp: table has width ", table.size(1), " but out has width ", D);
  check_int_vector(position_block, "position_block");
  check_int_vector(token_ids, "token_ids");
  TORCH_CHECK(position_block.dim() == 2 && position_block.size(0) == R && position_block.size(1) == T,
              "lopa_cpp: position_block must have shape (", R, ", ", T, "), got ", position_block.sizes());
  const int64_t N = token_ids.numel(), S = blocks.size(0);
  check_blocks(blocks, R, T, N);
  if (out.numel() == 0) return;
  const int64_t* pb = position_block.const_data_ptr<int64_t>();
  const int64_t* ids = token_ids.const_data_ptr<int64_t>();
  check_range(pb, R * T, -1, S, "position_block", "the blocks (-1 marks a pad)");
  check_range(ids, N, 0, V, "token_ids", "the table's rows");
  const int64_t* bl = blocks.const_data_ptr<int64_t>();
  // A pad row is only read when some position is a pad.
  bool any_pad = false;
  for (int64_t p = 0; p < R * T && !any_pad; ++p) any_pad = pb[p] < 0;
  if (any_pad) check_range(&pad_id, 1, 0, V, "pad_id", "the table's rows");
  const int64_t stride = table.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lopa_place_tokens", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* tab = table.const_data_ptr<scalar_t>();
    at::parallel_for(0, R * T, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t blk = pb[p];
        int64_t src = pad_id;
        if (blk >= 0) {
          const int64_t* b = bl + blk * kFields;
          const int64_t q = p % T - b[kStart];
          if (q >= b[kSplit] && q < b[kSplit] + b[kPrompt]) continue;  // a prompt row: place_prompt's
          src = ids[b[kOffset] + (q < b[kSplit] ? q : q - b[kPrompt])];
        }
        std::memcpy(o + p * D, tab + src * stride, static_cast<size_t>(D) * sizeof(scalar_t));
      }
    });
  });
}

}  // namespace lopa

namespace {

// ----------------------------------------------------------------------------- prompts
struct PromptTarget {
  const int64_t* blocks;
  const int64_t* block_index;  // instance k -> block
  int64_t T, D;

  int64_t row_offset(int64_t k, int64_t i) const {  // element offset of prompt row i of instance k
    const int64_t* b = blocks + block_index[k] * kFields;
    return (b[kRow] * T + b[kStart] + b[kSplit] + i) * D;
  }
};

template <typename out_t, typename in_t>
void place_copy_rows(out_t* o, const PromptTarget& tgt, const std::vector<int64_t>& slot, const at::Tensor& bank,
                     int64_t K, int64_t M) {
  const in_t* src = bank.const_data_ptr<in_t>();
  const int64_t s0 = bank.stride(0), s1 = bank.stride(1), s2 = bank.stride(2);
  at::parallel_for(0, K * M, std::max<int64_t>(1, 16384 / std::max<int64_t>(tgt.D, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k = r / M, i = r % M;
      copy_row(o + tgt.row_offset(k, i), src + slot[k] * s0 + i * s1, s2, tgt.D);
    }
  });
}

// Rank-r rows: acc[0:padded] = sum_k coef[k] * basis[k, 0:padded] (basis packed, zero padded).
template <typename opmath_t>
inline void low_rank_row(const opmath_t* coef, const opmath_t* basis, int64_t R, int64_t padded, opmath_t* acc) {
  using Vec = at::vec::Vectorized<opmath_t>;
  for (int64_t j = 0; j < padded; j += Vec::size()) {
    Vec a(opmath_t(0));
    for (int64_t k = 0; k < R; ++k) a = at::vec::fmadd(Vec(coef[k]), Vec::loadu(basis + k * padded + j), a);
    a.store(acc + j);
  }
}

template <typename out_t, typename in_t>
void place_ulpt_rows(out_t* o, const PromptTarget& tgt, const std::vector<int64_t>& slot, const at::Tensor& z,
                     const at::Tensor& proj, const at::Tensor& scale, const at::Tensor& shift, int64_t K, int64_t M) {
  using opmath_t = at::opmath_type<in_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t R = z.size(2), D = tgt.D;
  const int64_t padded = lopa::round_up(std::max<int64_t>(D, 1), lopa::tile_cols<opmath_t>());
  std::vector<opmath_t> basis(R * padded);
  lopa::pack_tile(proj.const_data_ptr<in_t>(), proj.stride(0), proj.stride(1), R, D, basis.data(), padded);
  const in_t* z_p = z.const_data_ptr<in_t>();
  const in_t* sc_p = scale.const_data_ptr<in_t>();
  const in_t* sh_p = shift.const_data_ptr<in_t>();
  at::parallel_for(0, K * M, lopa::grain_for(R * D), [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> coef(std::max<int64_t>(R, 1)), acc(padded), sc(padded), sh(padded);
    int64_t loaded = -1;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k = r / M, i = r % M, t = slot[k];
      if (t != loaded) {  // consecutive rows mostly share their task
        lopa::load_row(sc_p + t * scale.stride(0), scale.stride(1), D, sc.data(), padded);
        lopa::load_row(sh_p + t * shift.stride(0), shift.stride(1), D, sh.data(), padded);
        loaded = t;
      }
      lopa::load_row(z_p + t * z.stride(0) + i * z.stride(1), z.stride(2), R, coef.data(), R);
      low_rank_row(coef.data(), basis.data(), R, padded, acc.data());
      for (int64_t j = 0; j < padded; j += Vec::size()) {
        at::vec::fmadd(Vec::loadu(acc.data() + j), Vec::loadu(sc.data() + j), Vec::loadu(sh.data() + j))
            .store(acc.data() + j);
      }
      lopa::store_row(acc.data(), D, o + tgt.row_offset(k, i));
    }
  });
}

template <typename out_t, typename in_t>
void place_gate_rows(out_t* o, const PromptTarget& tgt, const std::vector<int64_t>& slot, const at::Tensor& zs,
                     const at::Tensor& u, const at::Tensor& v, int64_t K, int64_t M) {
  using opmath_t = at::opmath_type<in_t>;
  using Vec = at::vec::Vectorized<opmath_t>;
  const int64_t R = u.size(2), D = tgt.D;
  const int64_t padded = lopa::round_up(std::max<int64_t>(D, 1), lopa::tile_cols<opmath_t>());
  const in_t* zs_p = zs.const_data_ptr<in_t>();
  const in_t* u_p = u.const_data_ptr<in_t>();
  const in_t* v_p = v.const_data_ptr<in_t>();
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> basis(R * padded), coef(std::max<int64_t>(R, 1)), zs_row(padded), acc(padded);
    for (int64_t k = begin; k < end; ++k) {
      // v[k] is packed once per instance (any strides: a transposed head output reads in order).
      lopa::pack_tile(v_p + k * v.stride(0), v.stride(1), v.stride(2), R, D, basis.data(), padded);
      for (int64_t i = 0; i < M; ++i) {
        lopa::load_row(u_p + k * u.stride(0) + i * u.stride(1), u.stride(2), R, coef.data(), R);
        lopa::load_row(zs_p + slot[k] * zs.stride(0) + i * zs.stride(1), zs.stride(2), D, zs_row.data(), padded);
        low_rank_row(coef.data(), basis.data(), R, padded, acc.data());
        for (int64_t j = 0; j < padded; j += Vec::size()) {
          (Vec::loadu(zs_row.data() + j) * lopa::sigmoid(Vec::loadu(acc.data() + j))).store(acc.data() + j);
        }
        lopa::store_row(acc.data(), D, o + tgt.row_offset(k, i));
      }
    }
  });
}

int64_t prompt_rows_of(int64_t kind, const std::vector<at::Tensor>& source) {
  const int64_t expected = kind == kUlpt ? 4 : kind == kGate ? 3 : 1;
  TORCH_CHECK(kind >= kCopy && kind <= kGate, "lopa_cpp: prompt kind must be 1 (copy), 2 (ULPT) or 3 (gate), got ", kind);
  TORCH_CHECK(static_cast<int64_t>(source.size()) == expected, "lopa_cpp: prompt kind ", kind, " takes ", expected,
              " source tensors, got ", source.size());
  for (const at::Tensor& t : source) {
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided && at::isFloatingType(t.scalar_type()) &&
                    t.scalar_type() == source[0].scalar_type(),
                "lopa_cpp: prompt source tensors must be strided floating CPU tensors of one dtype");
  }
  TORCH_CHECK(source[0].dim() == 3, "lopa_cpp: the prompt source must start with a (tasks, m, ·) tensor, got ",
              source[0].sizes());
  return source[0].size(1);
}

void check_prompt_source(int64_t kind, const std::vector<at::Tensor>& src, int64_t K, int64_t D) {
  const int64_t tasks = src[0].size(0), M = src[0].size(1);
  if (kind == kCopy) {
    lopa::check_shape(src[0], "bank", {tasks, M, D});
  } else if (kind == kUlpt) {
    const int64_t R = src[0].size(2);
    lopa::check_shape(src[1], "proj", {R, D});
    lopa::check_shape(src[2], "scale", {tasks, D});
    lopa::check_shape(src[3], "shift", {tasks, D});
  } else {
    lopa::check_shape(src[0], "zs", {tasks, M, D});
    TORCH_CHECK(src[1].dim() == 3, "lopa_cpp: u must be (K, m, r), got ", src[1].sizes());
    lopa::check_shape(src[1], "u", {K, M, src[1].size(2)});
    lopa::check_shape(src[2], "v", {K, src[1].size(2), D});
  }
}

}  // namespace

namespace lopa {

void place_prompt(at::Tensor out, const at::Tensor& blocks, const at::Tensor& block_index, const at::Tensor& slots,
                  int64_t kind, const std::vector<at::Tensor>& source) {
  TORCH_CHECK(out.dim() == 3 && out.is_contiguous() && out.device().is_cpu(),
              "lopa_cpp: out must be a contiguous CPU (R, T, d) tensor, got ", out.sizes());
  const int64_t R = out.size(0), T = out.size(1), D = out.size(2);
  check_int_vector(block_index, "block_index");
  check_int_vector(slots, "task_ids");
  const int64_t K = block_index.numel();
  TORCH_CHECK(slots.numel() == K, "lopa_cpp: task_ids has ", slots.numel(), " entries but block_index has ", K);
  const int64_t M = prompt_rows_of(kind, source);
  check_prompt_source(kind, source, K, D);
  check_blocks(blocks, R, T, std::numeric_limits<int64_t>::max() / 2);
  const int64_t* bi = block_index.const_data_ptr<int64_t>();
  check_range(bi, K, 0, blocks.size(0), "block_index", "the blocks");
  const int64_t* bl = blocks.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK_INDEX(bl[bi[k] * kFields + kPrompt] == M, "lopa_cpp: block ", bi[k], " has ",
                      bl[bi[k] * kFields + kPrompt], " prompt rows but the prompt source has ", M);
  }
  const std::vector<int64_t> slot = lopa::checked_task_ids(slots, source[0].size(0));
  if (K == 0 || M == 0 || D == 0) return;
  const PromptTarget tgt{bl, bi, T, D};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lopa_place_prompt", [&] {
    using out_t = scalar_t;
    out_t* o = out.data_ptr<out_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, source[0].scalar_type(), "lopa_place_prompt_src", [&] {
      if (kind == kCopy) {
        place_copy_rows<out_t, scalar_t>(o, tgt, slot, source[0], K, M);
      } else if (kind == kUlpt) {
        place_ulpt_rows<out_t, scalar_t>(o, tgt, slot, source[0], source[1], source[2], source[3], K, M);
      } else {
        place_gate_rows<out_t, scalar_t>(o, tgt, slot, source[0], source[1], source[2], K, M);
      }
    });
  });
}

}  // namespace lopa
