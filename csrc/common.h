// Helpers shared by lopa's CPU kernels: output allocation (with the NaN-poison test
// hook), task-id tables, strided row loads/stores with dtype conversion, vectorised math and
// small register-blocked matmuls for the thin (r-deep or r-wide) products.
//
// Conventions used by every kernel:
// * `scalar_t` is the tensor dtype, `opmath_t` the compute dtype (float for half types,
//   double for double).  Half inputs are converted once on load and rounded once on store.
// * Each output element is produced by exactly one work unit, in a fixed order; reductions
//   that cross units go through partial buffers that a second pass sums in a fixed order.
//   Unit boundaries depend only on the shapes, so results are bitwise identical whatever
//   the thread count.
// * Large tensors are walked in long contiguous row segments (hundreds of columns or whole
//   rows): short segments at a large row stride defeat the hardware prefetcher and cost
//   several times the bandwidth.
// * Scratch tiles are padded to a multiple of `tile_cols<opmath_t>()` and zero-filled past
//   the valid width, so vector loops over them need no tail and padded lanes add zeros.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

// Fully unroll a loop over a compile-time register count.  GCC otherwise keeps an array of
// vector accumulators in memory and stores every one of them on each iteration.
#if defined(__clang__)
#define LOPA_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define LOPA_UNROLL _Pragma("GCC unroll 16")
#else
#define LOPA_UNROLL
#endif

namespace lopa {

// ----------------------------------------------------------------------------- outputs
bool poison_outputs_enabled();
void set_poison_outputs(bool enabled);

// Every tensor an op returns is allocated here, so the poison hook covers all of them: a
// kernel that forgets to write an element leaves a NaN the tests catch.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs_enabled() && out.numel() > 0) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

// The placeholder returned for a gradient the caller did not ask for.
inline at::Tensor gradient_not_needed(const at::TensorOptions& options) {
  return at::empty({0}, options);
}

// ----------------------------------------------------------------------------- checks
inline void check_float_cpu(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), "lopa_cpp: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "lopa_cpp: ", name, " has dtype ", t.scalar_type(),
              " but expected ", dtype);
  TORCH_CHECK(t.layout() == at::kStrided, "lopa_cpp: ", name, " must be a strided tensor");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "lopa_cpp: ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

// task_ids as a checked int64 table.  Range is checked here, not only in Python, because the
// op can be called directly (torch.ops / torch.compile) and an id out of range would read
// outside the bank.
inline std::vector<int64_t> checked_task_ids(const at::Tensor& task_ids, int64_t num_tasks) {
  TORCH_CHECK(task_ids.device().is_cpu(), "lopa_cpp: task_ids must be a CPU tensor, got ",
              task_ids.device());
  TORCH_CHECK(at::isIntegralType(task_ids.scalar_type(), /*includeBool=*/false),
              "lopa_cpp: task_ids must be an integer tensor, got dtype ", task_ids.scalar_type());
  TORCH_CHECK(task_ids.dim() == 1, "lopa_cpp: task_ids must be 1-D, got shape ", task_ids.sizes());
  const at::Tensor ids = task_ids.to(at::kLong).contiguous();
  const int64_t* p = ids.const_data_ptr<int64_t>();
  std::vector<int64_t> table(p, p + ids.numel());
  for (int64_t id : table) {
    TORCH_CHECK_INDEX(id >= 0 && id < num_tasks, "task_ids contains ", id, ", outside the bank's ",
                      num_tasks, " tasks (valid: 0..", num_tasks - 1, ")");
  }
  return table;
}

// The output rows that each task feeds, in increasing row order (CSR layout).  Summing a
// task's rows in this order keeps per-task reductions deterministic.
struct RowsOfTask {
  std::vector<int64_t> start;  // num_tasks + 1 offsets into `rows`
  std::vector<int64_t> rows;

  bool uses(int64_t task) const { return start[task + 1] > start[task]; }

  RowsOfTask(const std::vector<int64_t>& task_of_row, int64_t num_tasks)
      : start(num_tasks + 1, 0), rows(task_of_row.size()) {
    for (int64_t t : task_of_row) ++start[t + 1];
    for (int64_t t = 0; t < num_tasks; ++t) start[t + 1] += start[t];
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t row = 0; row < static_cast<int64_t>(task_of_row.size()); ++row) {
      rows[next[task_of_row[row]]++] = row;
    }
  }
};

// ----------------------------------------------------------------------------- blocking
template <typename T>
constexpr int64_t vec_size() {
  return at::vec::Vectorized<T>::size();
}

// Columns produced per micro-kernel step (two vector registers); every padded width is a
// multiple of this.
template <typename T>
constexpr int64_t tile_cols() {
  return 2 * vec_size<T>();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Width of one column block: about d / target_blocks columns, a multiple of the tile width,
// at most max_cols.  Depends only on d, so block boundaries (and hence summation orders) do
// not depend on the number of threads.
template <typename T>
inline int64_t column_block(int64_t d, int64_t target_blocks, int64_t max_cols) {
  const int64_t tile = tile_cols<T>();
  const int64_t cols = round_up(ceil_div(std::max<int64_t>(d, 1), target_blocks), tile);
  return std::max(tile, std::min(cols, round_up(max_cols, tile)));
}

// Column-block width for kernels that stream (B, m, d)-sized tensors: blocks of up to 1024
// columns keep each row segment a long contiguous run; narrower blocks (down to 256) only
// when there are too few row units to give about 8 units of work in total.
template <typename T>
inline int64_t streaming_block_cols(int64_t d, int64_t row_units) {
  const int64_t wanted = std::max(ceil_div(d, 1024), std::min(ceil_div(8, std::max<int64_t>(row_units, 1)), ceil_div(d, 256)));
  return round_up(ceil_div(std::max<int64_t>(d, 1), std::max<int64_t>(wanted, 1)), tile_cols<T>());
}

// Units per parallel_for chunk such that a chunk carries at least ~32k multiply-adds, so tiny
// problems run inline instead of paying for a thread wake-up.
inline int64_t grain_for(int64_t work_per_unit) {
  constexpr int64_t kMinWorkPerChunk = 1 << 15;
  return std::max<int64_t>(1, kMinWorkPerChunk / std::max<int64_t>(work_per_unit, 1));
}

// A column block [begin, begin + width) and its padded width.
struct ColumnBlock {
  int64_t begin, width, padded;
};

template <typename T>
inline ColumnBlock column_block_at(int64_t index, int64_t block_cols, int64_t d) {
  const int64_t begin = index * block_cols;
  const int64_t width = std::min(block_cols, d - begin);
  return {begin, width, round_up(width, tile_cols<T>())};
}

// ----------------------------------------------------------------------------- rows
// dst[0:n] = src[0:n:stride] converted to the compute type; dst[n:padded] = 0.
template <typename scalar_t, typename opmath_t>
inline void load_row(const scalar_t* src, int64_t stride, int64_t n, opmath_t* dst, int64_t padded) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (stride == 1) {
      if (n > 0) std::memcpy(dst, src, n * sizeof(opmath_t));
    } else {
      for (int64_t j = 0; j < n; ++j) dst[j] = src[j * stride];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<opmath_t>(src[j * stride]);
  }
  std::fill(dst + n, dst + padded, opmath_t(0));
}

// dst[0:n] += src[0:n:stride] (the padded tail of dst is left alone: it stays zero).
template <typename scalar_t, typename opmath_t>
inline void add_row(const scalar_t* src, int64_t stride, int64_t n, opmath_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] += static_cast<opmath_t>(src[j * stride]);
}

// Contiguous dst[0:n] = src[0:n], rounded once to the output dtype.
template <typename scalar_t, typename opmath_t>
inline void store_row(const opmath_t* src, int64_t n, scalar_t* dst) {
  if (n <= 0) return;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    std::memcpy(dst, src, n * sizeof(opmath_t));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// src[0:n:stride] in the compute type: the tensor memory itself when it already is a
// contiguous float/double row, else a converted copy in `scratch`.
template <typename scalar_t, typename opmath_t>
inline const opmath_t* row_in_opmath(const scalar_t* src, int64_t stride, int64_t n, opmath_t* scratch) {
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (stride == 1) return src;
  }
  load_row(src, stride, n, scratch, n);
  return scratch;
}

// dst (rows x padded, leading dim `padded`) = src[i, j] read with arbitrary strides,
// converted, zero-padded past `cols`.  Walks memory in the order the source is laid out, so
// a transposed (B, d, r) head output is gathered with sequential reads.
template <typename scalar_t, typename opmath_t>
inline void pack_tile(const scalar_t* src, int64_t row_stride, int64_t col_stride, int64_t rows,
                      int64_t cols, opmath_t* dst, int64_t padded) {
  if (rows == 1 || std::abs(col_stride) <= std::abs(row_stride)) {
    for (int64_t i = 0; i < rows; ++i) load_row(src + i * row_stride, col_stride, cols, dst + i * padded, padded);
    return;
  }
  // Transposing gather, in 16 x 16 tiles so both the reads and the writes stay in a few
  // cache lines at a time.
  constexpr int64_t kTile = 16;
  for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
    for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
      for (int64_t j = j0; j < std::min(j0 + kTile, cols); ++j) {
        for (int64_t i = i0; i < std::min(i0 + kTile, rows); ++i) {
          dst[i * padded + j] = static_cast<opmath_t>(src[j * col_stride + i * row_stride]);
        }
      }
    }
  }
  for (int64_t i = 0; i < rows; ++i) std::fill(dst + i * padded + cols, dst + (i + 1) * padded, opmath_t(0));
}

// ----------------------------------------------------------------------------- vector math
// exp(x) for float and -88 <= x <= 89, inlined: Cephes' expf (x = n ln2 + f with ln2 split
// in two, a degree-5 polynomial for e^f, 2^n built in the exponent bits), within ~2 ulp of
// expf; from x = 88.38 on, 2^n (n = 128) is +inf, like expf's overflow.  The sigmoid is the
// bottleneck of the gate, and an out-of-line Sleef call per vector costs about twice as
// much on AVX2.  NaN stays NaN.
inline at::vec::Vectorized<float> exp_float_in_range(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec n = at::vec::fmadd(x, Vec(1.44269504088896341f), Vec(0.5f)).floor();
  Vec f = at::vec::fnmadd(n, Vec(0.693359375f), x);
  f = at::vec::fnmadd(n, Vec(-2.12194440e-4f), f);
  Vec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, f, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, f, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, f, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, f, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, f, Vec(5.0000001201e-1f));
  p = at::vec::fmadd(p, f * f, f + Vec(1.0f));
  const IVec biased = at::vec::convert_to_int_of_same_size(n) + IVec(127);
  return p * at::vec::cast<float>(biased << IVec(23));
}

// sigmoid(x) = 1 / (1 + exp(-x)); NaN stays NaN.  double uses Sleef's 1-ulp exp (float64
// results must match to ~1e-12); exp overflowing to inf gives exactly 0.
template <typename T>
inline at::vec::Vectorized<T> sigmoid(const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  return Vec(T(1)) / (Vec(T(1)) + x.neg().exp());
}

// float: x is clamped to [-89, 88] first (clamp keeps NaN), the range exp_float_in_range
// handles; the sigmoid is exactly 0 below -88.38 (exp overflows) and 1 above 87.4.
template <>
inline at::vec::Vectorized<float> sigmoid<float>(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  const Vec clamped = at::vec::clamp(x, Vec(-89.0f), Vec(88.0f));
  return Vec(1.0f) / (Vec(1.0f) + exp_float_in_range(clamped.neg()));
}

// ----------------------------------------------------------------------------- matmul
// C[i, c0:c0+2V] (+)= sum_k A[i, k] * B[k, c0:c0+2V] for R rows: 2R accumulators stay in
// registers (12 for R = 6: enough independent FMAs to cover their latency) and each B load
// is reused R times.
template <typename T, int R, bool kAccumulate>
inline void matmul_micro(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c,
                         int64_t ldc, int64_t depth) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec acc[R][2];
  LOPA_UNROLL for (int i = 0; i < R; ++i) {
    acc[i][0] = kAccumulate ? Vec::loadu(c + i * ldc) : Vec(T(0));
    acc[i][1] = kAccumulate ? Vec::loadu(c + i * ldc + W) : Vec(T(0));
  }
  for (int64_t k = 0; k < depth; ++k) {
    const Vec b0 = Vec::loadu(b + k * ldb);
    const Vec b1 = Vec::loadu(b + k * ldb + W);
    LOPA_UNROLL for (int i = 0; i < R; ++i) {
      const Vec ai(a[i * a_row + k * a_col]);
      acc[i][0] = at::vec::fmadd(ai, b0, acc[i][0]);
      acc[i][1] = at::vec::fmadd(ai, b1, acc[i][1]);
    }
  }
  LOPA_UNROLL for (int i = 0; i < R; ++i) {
    acc[i][0].store(c + i * ldc);
    acc[i][1].store(c + i * ldc + W);
  }
}

// C (rows x width) (+)= A (rows x depth, element (i, k) at a[i * a_row + k * a_col]) @
// B (depth x width, leading dim ldb).  `width` must be a multiple of tile_cols<T>().
// The sum over k always runs in order 0..depth-1 (deterministic); depth 0 gives zeros.
template <typename T, bool kAccumulate>
inline void matmul_tile(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ldb, T* c,
                        int64_t ldc, int64_t rows, int64_t depth, int64_t width) {
  constexpr int kRows = 6;
  for (int64_t col = 0; col < width; col += tile_cols<T>()) {
    int64_t i = 0;
    for (; i + kRows <= rows; i += kRows) {
      matmul_micro<T, kRows, kAccumulate>(a + i * a_row, a_row, a_col, b + col, ldb, c + i * ldc + col, ldc, depth);
    }
    const T* a_rest = a + i * a_row;
    T* c_rest = c + i * ldc + col;
    switch (rows - i) {
      case 5: matmul_micro<T, 5, kAccumulate>(a_rest, a_row, a_col, b + col, ldb, c_rest, ldc, depth); break;
      case 4: matmul_micro<T, 4, kAccumulate>(a_rest, a_row, a_col, b + col, ldb, c_rest, ldc, depth); break;
      case 3: matmul_micro<T, 3, kAccumulate>(a_rest, a_row, a_col, b + col, ldb, c_rest, ldc, depth); break;
      case 2: matmul_micro<T, 2, kAccumulate>(a_rest, a_row, a_col, b + col, ldb, c_rest, ldc, depth); break;
      case 1: matmul_micro<T, 1, kAccumulate>(a_rest, a_row, a_col, b + col, ldb, c_rest, ldc, depth); break;
      default: break;
    }
  }
}

// C[i, k] = sum_j A[i, j] * B[k, j] for RI rows and RK columns of C, over a padded depth:
// RI * RK independent vector accumulators (so the FMA latency is hidden, unlike one dot
// product at a time) and one horizontal sum per output.
template <typename T, int RI, int RK>
inline void matmul_nt_micro(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t depth) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc[RI][RK];
  LOPA_UNROLL for (int i = 0; i < RI; ++i) {
    LOPA_UNROLL for (int k = 0; k < RK; ++k) acc[i][k] = Vec(T(0));
  }
  for (int64_t j = 0; j < depth; j += Vec::size()) {
    Vec bv[RK];
    LOPA_UNROLL for (int k = 0; k < RK; ++k) bv[k] = Vec::loadu(b + k * ldb + j);
    LOPA_UNROLL for (int i = 0; i < RI; ++i) {
      const Vec av = Vec::loadu(a + i * lda + j);
      LOPA_UNROLL for (int k = 0; k < RK; ++k) acc[i][k] = at::vec::fmadd(av, bv[k], acc[i][k]);
    }
  }
  LOPA_UNROLL for (int i = 0; i < RI; ++i) {
    LOPA_UNROLL for (int k = 0; k < RK; ++k) {
      c[i * ldc + k] = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc[i][k]);
    }
  }
}

template <typename T, int RI>
inline void matmul_nt_rows(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t cols,
                           int64_t depth) {
  constexpr int kCols = 4;
  int64_t k = 0;
  for (; k + kCols <= cols; k += kCols) matmul_nt_micro<T, RI, kCols>(a, lda, b + k * ldb, ldb, c + k, ldc, depth);
  switch (cols - k) {
    case 3: matmul_nt_micro<T, RI, 3>(a, lda, b + k * ldb, ldb, c + k, ldc, depth); break;
    case 2: matmul_nt_micro<T, RI, 2>(a, lda, b + k * ldb, ldb, c + k, ldc, depth); break;
    case 1: matmul_nt_micro<T, RI, 1>(a, lda, b + k * ldb, ldb, c + k, ldc, depth); break;
    default: break;
  }
}

// C (rows x cols, leading dim ldc) = A (rows x depth) @ B (cols x depth)^T, both with unit
// column stride and zero padding up to `depth` (a multiple of the vector size): the
// products that sum over a column block (du = H v^T, dz = G P^T).
template <typename T>
inline void matmul_nt_tile(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t rows,
                           int64_t cols, int64_t depth) {
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2) matmul_nt_rows<T, 2>(a + i * lda, lda, b, ldb, c + i * ldc, ldc, cols, depth);
  if (i < rows) matmul_nt_rows<T, 1>(a + i * lda, lda, b, ldb, c + i * ldc, ldc, cols, depth);
}

// ----------------------------------------------------------------------------- reductions
// out[e] = sum_p partial[p, e] for p in block order, rounded once: the fixed-order second
// stage of reductions that cross column blocks (du, dz).
template <typename scalar_t, typename opmath_t>
inline void sum_partials_in_order(const opmath_t* partial, int64_t num_partials, int64_t numel,
                                  scalar_t* out) {
  at::parallel_for(0, numel, grain_for(num_partials), [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      opmath_t sum(0);
      for (int64_t p = 0; p < num_partials; ++p) sum += partial[p * numel + e];
      out[e] = static_cast<scalar_t>(sum);
    }
  });
}

}  // namespace lopa
