// CPU backend: host side. Splits rows over threads and calls the row kernels of the
// instruction set this machine supports (row_kernels.h).
//
// Backward: rows are cut into contiguous chunks, each adding its dgamma/dbeta terms to
// its own fp32 (fp64 for fp64) partial row; the partial rows are then summed pairwise,
// in a fixed order. The result never depends on thread scheduling: it is bitwise
// reproducible for a given thread count (below a few hundred rows a thread, the chunks
// follow it, as torch's own CPU kernel's per-thread buffers do) and instruction set (the
// vector width).
#include <ATen/Version.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <fstream>
#include <numeric>
#include <string>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../layernorm.h"
#include "row_kernels.h"

namespace layernorm_ext {
namespace {

// Elements per parallel task: large enough to amortize a task, small enough to spread
// a mid-size tensor over the cores. On the 2-core VM, 2^14 against 2^15 took the float32
// forward of 8x4096 from 9.7 to 7.3 us (torch 8.8) and of 1024x20 from 12.9 to 9.4, its
// backward from 41.5 to 37.2 and 35.7 to 35.2, and lost on no shape tried; 2^13 lost at
// 16x768 and 16x1024 (bf16 16x1024 forward 6.1 -> 8.0 us).
constexpr int64_t kElementsPerTask = 1 << 14;

// The most rows a backward chunk adds into its partial dgamma/dbeta rows, unless a
// task's worth of rows is more (rows_per_task); for short rows, rounded up to whole
// units of line_rows: the error of a chunk's sums grows with its rows, that of the sum
// over chunks with their number.
constexpr int64_t kMaxChunkRows = 256;

// The longest rows whose tasks and chunks start on a cache line (line_rows): the AVX-512
// kernels take rows of at most one vector chunk (128 bytes of float32) a group at a time.
constexpr int64_t kLineAlignedRowBytes = 128;

int64_t round_up(int64_t value, int64_t multiple) {
  return at::ceil_div(value, multiple) * multiple;
}

// Size of the largest cache the first CPU sees, as sysfs lists it, else sysconf's level-3
// size, else 0. sysconf can be far off: on a 2-core AMD EPYC VM it says 320 MiB where the
// cores share a 32 MiB L3, so 32 MiB outputs were not streamed and the forward ran at
// 0.8x torch's instead of 1.45x. One instance's size, where bench/machine.py sums the
// instances: threads spread over several L3s (an 8-CCD EPYC's) could keep more, but
// sysfs lists CPUs beyond the ones this process runs on, and some VMs give every vCPU
// an L3 of its own; a threshold too high cost the 0.8x above, one too low is unmeasured.
int64_t last_level_cache_bytes() {
  int best_level = 0;
  int64_t best_bytes = 0;
  for (int index = 0; index < 16; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index);
    std::ifstream level_file(dir + "/level"), size_file(dir + "/size");
    int level = 0;
    int64_t size = 0;
    std::string unit;
    if (!(level_file >> level) || !(size_file >> size)) break;
    size_file >> unit;  // "32768K"
    if (!unit.empty() && (unit[0] == 'K' || unit[0] == 'k')) size <<= 10;
    if (!unit.empty() && unit[0] == 'M') size <<= 20;
    if (!unit.empty() && unit[0] == 'G') size <<= 30;
    if (size > 0 && level >= best_level) best_level = level, best_bytes = size;
  }
  if (best_bytes > 0) return best_bytes;
#ifdef _SC_LEVEL3_CACHE_SIZE  // glibc's
  const long llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
  return llc > 0 ? static_cast<int64_t>(llc) : 0;
#else
  return 0;
#endif
}

// The most the stream threshold is without LAYERNORM_EXT_STREAM_BYTES, whatever the
// cache size: a VM's sysfs shows its host's L3, of which its few vCPUs keep a fraction.
// On a 2-core Xeon VM listing a 480 MiB L3, LayerNorm float32 at D = 4096 (ours and
// torch's alternated in one process, medians of 12 calls, two processes each way) took,
// streamed from 64 MiB against from 480: forward 3.5 against 4.8-5.2 ms at 64 MiB,
// 15.4-15.9 against 22.2-22.6 at 256; backward 6.7 against 11.7-12.7 at 64 MiB (torch
// 11.4-12.2), 27.8-29.0 against 35.6-36.9 at 256; torch's calls after ours as fast, but
// for the forward at 128 MiB (15.7-15.9 -> 17.1 ms). Streamed from 32 MiB, our backward
// gained nothing there and torch's backward after ours slowed (8 MiB: 0.95 -> 1.34 ms),
// as at 4-16 MiB on a VM listing 260 MiB.
constexpr int64_t kMaxDefaultStreamBytes = int64_t(64) << 20;

// Outputs at least this large (the last-level cache's size, at most the cap above) are
// written with non-temporal stores: they cannot stay in the cache anyway, and streaming
// skips reading every line before writing it. Smaller outputs are stored normally, to
// stay cached for the next op. 32 MiB where the cache's size is unknown.
// LAYERNORM_EXT_STREAM_BYTES overrides the threshold (the tests use it), read once: at
// import, where Python asks for stream_threshold_warning().
struct StreamThreshold {
  int64_t bytes;
  std::string warning;  // about a value of LAYERNORM_EXT_STREAM_BYTES that was ignored
};

const StreamThreshold& stream_threshold() {
  static const StreamThreshold threshold = []() -> StreamThreshold {
    std::string warning;
    if (const char* bytes = std::getenv("LAYERNORM_EXT_STREAM_BYTES")) {
      // A whole number of bytes; anything else is ignored (atoll read "64M" as 64 and
      // "" as 0: every output streamed).
      char* end = nullptr;
      errno = 0;
      const long long value = std::strtoll(bytes, &end, 10);
      if (end != bytes && *end == '\0' && errno == 0) {
        return {std::max<int64_t>(value, 0), ""};  // a negative size streams everything
      }
      warning = std::string("layernorm_ext: ignoring LAYERNORM_EXT_STREAM_BYTES=\"") + bytes +
                "\", which is not a whole number of bytes";
    }
    const int64_t llc = last_level_cache_bytes();
    return {llc > 0 ? std::min(llc, kMaxDefaultStreamBytes) : int64_t(32) << 20, warning};
  }();
  return threshold;
}

bool stream_output(const at::Tensor& output) {
  return output.nbytes() >= static_cast<size_t>(stream_threshold().bytes);
}

int64_t rows_per_task(int64_t cols) {
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(cols, 1));
}

// The rows to split work at, so that a task or chunk of short rows starts on a cache
// line: on AVX-512 a group of short rows is read and its outputs written as contiguous
// vectors, which from a line's middle straddle two lines (and can_stream declines
// them). Longer rows are aligned or not row by row: 1.
int64_t line_rows(int64_t cols, int64_t element_bytes) {
  const int64_t row_bytes = cols * element_bytes;
  constexpr int64_t kLine = cpu::kCacheLineBytes;
  return row_bytes <= kLineAlignedRowBytes ? kLine / std::gcd(kLine, row_bytes) : 1;
}

// The row kernels of the best instruction set this CPU and ATen allow, and its name.
struct SelectedKernels {
  const cpu::KernelTable& table;
  const char* isa;
};

const SelectedKernels& selected_kernels() {
  static const SelectedKernels selected = [] () -> SelectedKernels {
#ifdef LAYERNORM_EXT_X86_ISAS  // set by setup.py when it built the AVX2/AVX512 objects
    const std::string capability = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    // setup.py also builds both with F16C and BMI2, which every CPU with AVX2 has but
    // ATen does not check for: a virtual CPU may hide them.
    const bool has_extras = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2");
    if (has_extras && capability == "AVX512") return {cpu::kernel_table_AVX512(), "AVX512"};
    if (has_extras && capability == "AVX2") return {cpu::kernel_table_AVX2(), "AVX2"};
#endif
    return {cpu::kernel_table_DEFAULT(), "DEFAULT"};
  }();
  return selected;
}

const cpu::KernelTable& kernel_table() { return selected_kernels().table; }

template <Norm kNorm, typename T, typename P>
const cpu::NormRowKernels<T, P>& row_kernels() {
  return std::get<cpu::RowKernels<T, P>>(kernel_table())[kNorm];
}

template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

template <Norm kNorm, typename T, typename P>
void forward_kernel(const ForwardArgs& a) {
  using acc_t = at::opmath_type<T>;
  const cpu::ForwardRows<T, P> rows{
      a.input.const_data_ptr<T>(),
      a.output.mutable_data_ptr<T>(),
      a.weight.defined() ? a.weight.const_data_ptr<P>() : nullptr,
      a.bias.defined() ? a.bias.const_data_ptr<P>() : nullptr,
      data_or_null<acc_t>(a.mean),
      a.rstd.mutable_data_ptr<acc_t>(),
      a.shape.rows,
      a.shape.cols,
      static_cast<acc_t>(a.eps),
      stream_output(a.output)};
  const auto forward = row_kernels<kNorm, T, P>().forward;
  // Tasks of whole units of line_rows: split at an odd row, 3407874x20 float32 took ~40
  // ms against ~34 for 3407872 rows (2 threads, the second task starting mid-line).
  const int64_t M = a.shape.rows;
  const int64_t unit = line_rows(a.shape.cols, sizeof(T));
  at::parallel_for(0, at::ceil_div(M, unit), at::ceil_div(rows_per_task(a.shape.cols), unit),
                   [&](int64_t begin, int64_t end) {
                     forward(rows, begin * unit, std::min(M, end * unit));
                     if (rows.stream_output) cpu::fence_streamed_stores();
                   });
}

// The parameter gradients a norm has: dgamma and dbeta (LayerNorm), dgamma (RMSNorm).
template <Norm kNorm>
constexpr int64_t kParamGrads = kNorm == Norm::kLayer ? 2 : 1;

template <Norm kNorm, typename T, typename P>
void backward_kernel(const BackwardArgs& a) {
  using acc_t = at::opmath_type<T>;
  const int64_t M = a.shape.rows;
  const int64_t N = a.shape.cols;
  const cpu::BackwardRows<T, P> rows{
      a.grad_out.const_data_ptr<T>(),
      a.input.const_data_ptr<T>(),
      a.mean.defined() ? a.mean.const_data_ptr<acc_t>() : nullptr,
      a.rstd.const_data_ptr<acc_t>(),
      a.weight.defined() ? a.weight.const_data_ptr<P>() : nullptr,
      a.grad_input.mutable_data_ptr<T>(),
      M,
      N,
      stream_output(a.grad_input)};
  const auto backward = row_kernels<kNorm, T, P>().backward;
  constexpr int64_t kGrads = kParamGrads<kNorm>;

  // A task's worth of rows a chunk, at most kMaxChunkRows beyond that (a chunk adds its
  // rows' terms one after another, so its rounding error grows with its rows: one chunk
  // a thread of 65536 rows gave dgamma 25x torch's error, whose composite rms_norm sums
  // pairwise), the rows split evenly over the threads below that, and rows enough that
  // the partial rows (kGrads acc_t rows a chunk) stay within half the chunk's input: a
  // few long rows over many threads would otherwise need partials several times the input.
  // Rounded up to whole units of line_rows, so that chunks of short rows start on a
  // cache line. With that and one fence a task (fence_streamed_stores), LayerNorm's
  // float32 backward of 3407872x20 took ~35 ms against ~40 ms, RMSNorm's ~30 against ~40
  // (a 2-core Xeon, medians of 5 processes); one chunk a thread, ~30 ms for both, has
  // the error of the long chain above. (Rounding longer rows would only cut their chunks
  // and threads: 32 rows of 4097 floats on 16 threads in 2 chunks, not 11.)
  const int64_t partial_rows = at::ceil_div<int64_t>(2 * kGrads * sizeof(acc_t), sizeof(T));
  const int64_t chunk_rows = round_up(
      std::max({rows_per_task(N),
                std::min(at::ceil_div<int64_t>(M, at::get_num_threads()), kMaxChunkRows),
                partial_rows}),
      line_rows(N, sizeof(T)));
  const int64_t chunks = at::ceil_div<int64_t>(M, chunk_rows);
  at::Tensor partials =
      at::zeros({chunks, kGrads, N}, a.input.options().dtype(a.rstd.scalar_type()));
  acc_t* partial = partials.mutable_data_ptr<acc_t>();
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      acc_t* dgamma = partial + chunk * kGrads * N;
      backward(rows, chunk * chunk_rows, std::min(M, (chunk + 1) * chunk_rows), dgamma,
               kGrads == 2 ? dgamma + N : nullptr);
    }
    if (rows.stream_output) cpu::fence_streamed_stores();
  });

  // grad_weight, then grad_bias for LayerNorm: the partial rows summed pairwise, in a
  // fixed order, into chunk 0's, row by row (contiguous, so the adds vectorize). Summed
  // one after another, 4096 chunks' partials of like-signed terms (2^20 rows) gave
  // RMSNorm's dgamma 12x the error of torch's (pairwise) sums.
  P* grads[kGrads];
  grads[0] = a.grad_weight.mutable_data_ptr<P>();
  if constexpr (kGrads == 2) grads[1] = a.grad_bias.mutable_data_ptr<P>();
  if (chunks == 0) {  // no rows
    for (int64_t g = 0; g < kGrads; ++g) std::fill_n(grads[g], N, P(0));
    return;
  }
  at::parallel_for(0, N, kElementsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t g = 0; g < kGrads; ++g) {
      const auto row = [&](int64_t chunk) { return partial + (chunk * kGrads + g) * N; };
      for (int64_t stride = 1; stride < chunks; stride *= 2) {
        for (int64_t chunk = 0; chunk + stride < chunks; chunk += 2 * stride) {
          acc_t* sum = row(chunk);
          const acc_t* terms = row(chunk + stride);
          for (int64_t j = begin; j < end; ++j) sum[j] += terms[j];
        }
      }
      const acc_t* sum = row(0);
      for (int64_t j = begin; j < end; ++j) grads[g][j] = static_cast<P>(sum[j]);
    }
  });
}

struct ForwardKernel {
  template <typename NormTag, typename InputTag, typename ParamTag>
  void operator()(NormTag, InputTag, ParamTag, const ForwardArgs& args) const {
    forward_kernel<NormTag::value, typename InputTag::type, typename ParamTag::type>(args);
  }
};

struct BackwardKernel {
  template <typename NormTag, typename InputTag, typename ParamTag>
  void operator()(NormTag, InputTag, ParamTag, const BackwardArgs& args) const {
    backward_kernel<NormTag::value, typename InputTag::type, typename ParamTag::type>(args);
  }
};

}  // namespace

const char* cpu_kernels_isa() { return selected_kernels().isa; }

int64_t stream_threshold_bytes() { return stream_threshold().bytes; }

const std::string& stream_threshold_warning() { return stream_threshold().warning; }

TORCH_LIBRARY_IMPL(layernorm_ext, CPU, m) {
  m.impl("forward", &layer_norm_forward<ForwardKernel>);
  m.impl("backward", &layer_norm_backward<BackwardKernel>);
  m.impl("rms_forward", &rms_norm_forward<ForwardKernel>);
  m.impl("rms_backward", &rms_norm_backward<BackwardKernel>);
}

}  // namespace layernorm_ext
