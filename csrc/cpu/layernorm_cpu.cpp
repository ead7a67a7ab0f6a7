// CPU kernels: one row at a time, vectorized with at::vec, parallel over rows.
//
// Forward: Welford statistics, then the normalized row, while the row is still in
// L1/L2 (one trip to DRAM per tensor). Backward: two row sums, then dx, with the
// dgamma/dbeta contributions added to fp32 (fp64 for fp64) per-chunk partial rows that
// are summed in a fixed order at the end: the result is bitwise reproducible for a
// given thread count.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>

#include "../layernorm.h"
#include "../layernorm_math.h"

namespace layernorm_ext {
namespace {

using at::vec::Vectorized;

// Loads and stores of T as vectors of its accumulation type (float for half/bf16).
template <typename T>
struct VecIO {
  using acc_t = at::opmath_type<T>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kWidth = Vec::size();

  static Vec load(const T* p) {
    if constexpr (std::is_same_v<T, acc_t>) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    }
  }
  // Loads p[0:kWidth], or `fill` where p is null (a missing weight or bias).
  static Vec load_or(const T* p, acc_t fill) { return p ? load(p) : Vec(fill); }

  static void store(T* p, const Vec& v) {
    if constexpr (std::is_same_v<T, acc_t>) {
      v.store(p);
    } else {
      at::vec::convert_from_float<T>(v, v).store(p, kWidth);
    }
  }
};

// Scalar counterpart of VecIO::load_or, for the row tails.
template <typename T, typename acc_t = at::opmath_type<T>>
acc_t load_scalar_or(const T* p, int64_t i, acc_t fill) {
  return p ? static_cast<acc_t>(p[i]) : fill;
}

// Elements per parallel task: large enough to amortize the task, small enough to
// split a mid-size tensor over the cores.
constexpr int64_t kElementsPerTask = 1 << 15;

int64_t rows_per_task(int64_t cols) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
}

// Welford over one row: every vector lane keeps its own moments over a strided
// subset (all lanes share the count), then lanes and the scalar tail are combined
// with Chan's formula in a fixed order.
template <typename T>
math::WelfordState<at::opmath_type<T>> row_moments(const T* x, int64_t n) {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  Vec mean(0), m2(0);
  int64_t steps = 0;
  int64_t j = 0;
  for (; j + IO::kWidth <= n; j += IO::kWidth) {
    ++steps;
    math::welford_step(mean, m2, IO::load(x + j), acc_t(1) / static_cast<acc_t>(steps));
  }
  math::WelfordState<acc_t> total{acc_t(0), acc_t(0), 0};
  if (steps > 0) {
    std::array<acc_t, IO::kWidth> lane_mean, lane_m2;
    mean.store(lane_mean.data());
    m2.store(lane_m2.data());
    for (int64_t lane = 0; lane < IO::kWidth; ++lane) {
      total = math::welford_combine(total, {lane_mean[lane], lane_m2[lane], steps});
    }
  }
  math::WelfordState<acc_t> tail{acc_t(0), acc_t(0), 0};
  for (; j < n; ++j) tail = math::welford_update(tail, static_cast<acc_t>(x[j]));
  return math::welford_combine(total, tail);
}

template <typename T, typename P>
void forward_kernel(const ForwardArgs& a) {
  using IO = VecIO<T>;
  using PIO = VecIO<P>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  static_assert(std::is_same_v<acc_t, typename PIO::acc_t>);

  const int64_t N = a.shape.cols;
  const T* x = a.input.const_data_ptr<T>();
  T* y = a.output.mutable_data_ptr<T>();
  const P* w = a.weight.defined() ? a.weight.const_data_ptr<P>() : nullptr;
  const P* b = a.bias.defined() ? a.bias.const_data_ptr<P>() : nullptr;
  acc_t* mean_out = a.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd_out = a.rstd.mutable_data_ptr<acc_t>();
  const acc_t eps = static_cast<acc_t>(a.eps);

  at::parallel_for(0, a.shape.rows, rows_per_task(N), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* xr = x + row * N;
      T* yr = y + row * N;
      const auto moments = row_moments(xr, N);
      const acc_t mean = moments.mean;
      const acc_t rstd = math::rstd_from_moments(moments, eps);
      mean_out[row] = mean;
      rstd_out[row] = rstd;
      const Vec mean_v(mean), rstd_v(rstd);
      int64_t j = 0;
      for (; j + IO::kWidth <= N; j += IO::kWidth) {
        const Vec xhat = math::normalize(IO::load(xr + j), mean_v, rstd_v);
        IO::store(yr + j, math::affine(xhat, PIO::load_or(w ? w + j : nullptr, acc_t(1)),
                                       PIO::load_or(b ? b + j : nullptr, acc_t(0))));
      }
      for (; j < N; ++j) {
        const acc_t xhat = math::normalize(static_cast<acc_t>(xr[j]), mean, rstd);
        yr[j] = static_cast<T>(
            math::affine(xhat, load_scalar_or(w, j, acc_t(1)), load_scalar_or(b, j, acc_t(0))));
      }
    }
  });
}

// Sum of a vector's lanes in a fixed order.
template <typename Vec, typename acc_t>
acc_t lane_sum(const Vec& v) {
  std::array<acc_t, Vec::size()> lanes;
  v.store(lanes.data());
  acc_t s = 0;
  for (auto l : lanes) s += l;
  return s;
}

template <typename T, typename P>
void backward_kernel(const BackwardArgs& a) {
  using IO = VecIO<T>;
  using PIO = VecIO<P>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using AccIO = VecIO<acc_t>;

  const int64_t M = a.shape.rows;
  const int64_t N = a.shape.cols;
  const T* dy = a.grad_out.const_data_ptr<T>();
  const T* x = a.input.const_data_ptr<T>();
  const acc_t* mean_in = a.mean.const_data_ptr<acc_t>();
  const acc_t* rstd_in = a.rstd.const_data_ptr<acc_t>();
  const P* w = a.weight.defined() ? a.weight.const_data_ptr<P>() : nullptr;
  T* dx = a.grad_input.mutable_data_ptr<T>();

  // Rows are split into a fixed number of contiguous chunks, each with its own
  // partial dgamma/dbeta row, so the summation order never depends on scheduling.
  const int64_t chunk_rows = std::max(rows_per_task(N), at::ceil_div<int64_t>(M, at::get_num_threads()));
  const int64_t chunks = at::ceil_div(M, chunk_rows);
  at::Tensor partials = at::zeros({chunks, 2, N}, a.input.options().dtype(a.mean.scalar_type()));
  acc_t* partial = partials.mutable_data_ptr<acc_t>();

  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* dgamma = partial + chunk * 2 * N;
      acc_t* dbeta = dgamma + N;
      const int64_t row_end = std::min(M, (chunk + 1) * chunk_rows);
      for (int64_t row = chunk * chunk_rows; row < row_end; ++row) {
        const T* dyr = dy + row * N;
        const T* xr = x + row * N;
        T* dxr = dx + row * N;
        const acc_t mean = mean_in[row];
        const acc_t rstd = rstd_in[row];
        const Vec mean_v(mean), rstd_v(rstd);

        // Pass 1: g = dy * w; the row sums of g and g * xhat.
        Vec sum_g_v(0), sum_g_xhat_v(0);
        int64_t j = 0;
        for (; j + IO::kWidth <= N; j += IO::kWidth) {
          const Vec g = IO::load(dyr + j) * PIO::load_or(w ? w + j : nullptr, acc_t(1));
          const Vec xhat = math::normalize(IO::load(xr + j), mean_v, rstd_v);
          sum_g_v = sum_g_v + g;
          sum_g_xhat_v = sum_g_xhat_v + g * xhat;
        }
        acc_t sum_g = lane_sum<Vec, acc_t>(sum_g_v);
        acc_t sum_g_xhat = lane_sum<Vec, acc_t>(sum_g_xhat_v);
        for (int64_t k = j; k < N; ++k) {
          const acc_t g = static_cast<acc_t>(dyr[k]) * load_scalar_or(w, k, acc_t(1));
          sum_g += g;
          sum_g_xhat += g * math::normalize(static_cast<acc_t>(xr[k]), mean, rstd);
        }
        const acc_t mean_g = sum_g / static_cast<acc_t>(N);
        const acc_t mean_g_xhat = sum_g_xhat / static_cast<acc_t>(N);

        // Pass 2 (row now in cache): dx, and the dgamma/dbeta contributions.
        const Vec mean_g_v(mean_g), mean_g_xhat_v(mean_g_xhat);
        for (j = 0; j + IO::kWidth <= N; j += IO::kWidth) {
          const Vec dy_v = IO::load(dyr + j);
          const Vec g = dy_v * PIO::load_or(w ? w + j : nullptr, acc_t(1));
          const Vec xhat = math::normalize(IO::load(xr + j), mean_v, rstd_v);
          IO::store(dxr + j, math::input_grad(g, xhat, rstd_v, mean_g_v, mean_g_xhat_v));
          AccIO::store(dgamma + j, AccIO::load(dgamma + j) + dy_v * xhat);
          AccIO::store(dbeta + j, AccIO::load(dbeta + j) + dy_v);
        }
        for (; j < N; ++j) {
          const acc_t dy_s = static_cast<acc_t>(dyr[j]);
          const acc_t g = dy_s * load_scalar_or(w, j, acc_t(1));
          const acc_t xhat = math::normalize(static_cast<acc_t>(xr[j]), mean, rstd);
          dxr[j] = static_cast<T>(math::input_grad(g, xhat, rstd, mean_g, mean_g_xhat));
          dgamma[j] += dy_s * xhat;
          dbeta[j] += dy_s;
        }
      }
    }
  });

  // Fixed-order reduction of the chunk partials into the parameters' dtype.
  P* grad_weight = a.grad_weight.mutable_data_ptr<P>();
  P* grad_bias = a.grad_bias.mutable_data_ptr<P>();
  at::parallel_for(0, N, kElementsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      acc_t dgamma = 0, dbeta = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        dgamma += partial[chunk * 2 * N + j];
        dbeta += partial[chunk * 2 * N + N + j];
      }
      grad_weight[j] = static_cast<P>(dgamma);
      grad_bias[j] = static_cast<P>(dbeta);
    }
  });
}

Tensor3 forward_cpu(const at::Tensor& input, at::IntArrayRef normalized_shape,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                    double eps) {
  ForwardArgs args = prepare_forward(input, normalized_shape, weight, bias, eps);
  if (args.shape.rows > 0) {
    LAYERNORM_DISPATCH_TYPES(input.scalar_type(), args.param_dtype, "layernorm_ext_forward_cpu",
                             [&](auto input_tag, auto param_tag) {
                             forward_kernel<typename decltype(input_tag)::type,
                                            typename decltype(param_tag)::type>(args);
                           });
  }
  return {args.output, args.mean, args.rstd};
}

Tensor3 backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                     at::IntArrayRef normalized_shape, const at::Tensor& mean,
                     const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                     const std::optional<at::Tensor>& bias) {
  BackwardArgs args =
      prepare_backward(grad_out, input, normalized_shape, mean, rstd, weight, bias);
  LAYERNORM_DISPATCH_TYPES(input.scalar_type(), args.param_dtype, "layernorm_ext_backward_cpu",
                           [&](auto input_tag, auto param_tag) {
                             backward_kernel<typename decltype(input_tag)::type,
                                            typename decltype(param_tag)::type>(args);
                           });
  return {args.grad_input, args.grad_weight, args.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  m.impl("forward", &forward_cpu);
  m.impl("backward", &backward_cpu);
}

}  // namespace layernorm_ext
