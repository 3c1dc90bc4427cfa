// Batch-norm reductions and the input gradient for channel-innermost CPU tensors, viewed as a
// row-major (rows, C) matrix: 2-D (N, C) input, channels_last, channels_last_3d.
//
// Why: torch's CPU kernels for these layouts add each channel's values one by one into a
// float per thread, so their error grows with the number of rows (about 100x that of NCHW
// input at (64, 64, 56, 56)); an accurate reduction built from torch ops costs extra passes.
// Here every pass reads its inputs once: rows are added in blocks of kBlockRows into
// accumulators of the input's precision (float for 16-bit input) and each block's sums into
// double, so the error stays that of a kBlockRows-term sum whatever the batch.
//
// Sums of (x - shift): the caller passes a shift near the channel means, which keeps the
// variance from the one-pass formula var = E[d^2] - E[d]^2 (d = x - shift) as accurate as a
// two-pass one; the caller checks that the shift was close enough and passes again if not.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kBlockRows = 32;
// Rows per parallel task: below this, threads cost more than they save.
constexpr int64_t kGrainRows = 256;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

void check_rows(const at::Tensor& t, const char* name, int64_t channels) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.is_contiguous(), name,
              " must be a contiguous CPU tensor of shape (rows, channels)");
  TORCH_CHECK(t.size(1) == channels, name, " has ", t.size(1), " channels, expected ", channels);
}

// Per-thread double sums of step's two accumulations over every row, for each channel; q may
// be null (one-input reductions). Returns 2 * C doubles: the first sums, then the second.
template <typename scalar_t, typename Step>
std::vector<double> paired_sums(const scalar_t* p, const scalar_t* q, const acc_type<scalar_t>* k,
                                int64_t rows, int64_t C, Step step) {
  using acc_t = acc_type<scalar_t>;
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * 2 * C, 0.0);
  at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
    double* __restrict__ s1 = partial.data() + static_cast<size_t>(at::get_thread_num()) * 2 * C;
    double* __restrict__ s2 = s1 + C;
    std::vector<acc_t> block(2 * C);
    acc_t* __restrict__ b1 = block.data();
    acc_t* __restrict__ b2 = b1 + C;
    for (int64_t r0 = begin; r0 < end; r0 += kBlockRows) {
      const int64_t r1 = std::min(end, r0 + kBlockRows);
      std::fill(block.begin(), block.end(), acc_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* __restrict__ pr = p + r * C;
        const scalar_t* __restrict__ qr = q == nullptr ? pr : q + r * C;
        for (int64_t c = 0; c < C; ++c) {
          step(static_cast<acc_t>(pr[c]), static_cast<acc_t>(qr[c]), k[c], b1[c], b2[c]);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        s1[c] += b1[c];
        s2[c] += b2[c];
      }
    }
  });
  std::vector<double> out(2 * C, 0.0);
  for (int t = 0; t < threads; ++t) {
    const double* src = partial.data() + static_cast<size_t>(t) * 2 * C;
    for (int64_t j = 0; j < 2 * C; ++j) out[j] += src[j];
  }
  return out;
}

at::ScalarType acc_scalar_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel tensor's values as doubles.
std::vector<double> doubles(const at::Tensor& t, int64_t channels) {
  TORCH_CHECK(t.numel() == channels, "per-channel tensors need ", channels, " values, got ", t.numel());
  const at::Tensor d = t.to(at::kCPU, at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  return std::vector<double>(p, p + channels);
}

template <typename acc_t>
std::vector<acc_t> narrowed(const std::vector<double>& v) {
  return std::vector<acc_t>(v.begin(), v.end());
}

template <typename scalar_t>
std::vector<double> grad_sums_impl(const at::Tensor& dy, const at::Tensor& x, const std::vector<double>& mean) {
  using acc_t = acc_type<scalar_t>;
  const std::vector<acc_t> m = narrowed<acc_t>(mean);
  return paired_sums<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), m.data(),
                               x.size(0), x.size(1), [](acc_t g, acc_t v, acc_t mu, acc_t& a, acc_t& b) {
                                 a += g;
                                 b += g * (v - mu);
                               });
}

void check_pair(const at::Tensor& dy, const at::Tensor& x) {
  check_rows(x, "x", x.size(-1));
  check_rows(dy, "dy", x.size(-1));
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dy.size(0) == x.size(0), "dy must have x's shape and dtype");
}

}  // namespace

// Per-channel (mean, biased variance, mean's rounding remainder), in float (double for double
// input): mean + remainder is the mean to about twice float's precision. The shift is the
// mean of sample_rows rows spread over the batch; a channel whose mean lies more than a
// standard deviation from it (its spread is below the sample's error: a constant channel, say)
// gets a second pass shifted by the first pass's mean.
std::vector<at::Tensor> mean_var(const at::Tensor& x, int64_t sample_rows) {
  const int64_t rows = x.size(0), C = x.size(-1);
  check_rows(x, "x", C);
  TORCH_CHECK(rows > 0 && sample_rows > 0, "mean_var needs rows and sample_rows > 0");
  const auto acc = acc_scalar_type(x);
  at::Tensor mean_out = at::empty({C}, x.options().dtype(acc));
  at::Tensor var_out = at::empty({C}, x.options().dtype(acc));
  at::Tensor low_out = at::empty({C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mean_var", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t step = std::max<int64_t>(1, rows / sample_rows);
    std::vector<double> shift(C, 0.0), mean(C), var(C);
    int64_t taken = 0;
    for (int64_t r = 0; r < rows; r += step, ++taken) {
      for (int64_t c = 0; c < C; ++c) shift[c] += static_cast<double>(xp[r * C + c]);
    }
    for (int64_t c = 0; c < C; ++c) shift[c] /= static_cast<double>(taken);
    for (int pass = 0; pass < 2; ++pass) {
      // The shift in the accumulation dtype, as the sums subtract it; the mean adds back
      // exactly that rounded value.
      const std::vector<acc_t> k = narrowed<acc_t>(shift);
      const std::vector<double> sums = paired_sums<scalar_t>(
          xp, nullptr, k.data(), rows, C, [](acc_t v, acc_t, acc_t s, acc_t& a, acc_t& b) {
            const acc_t d = v - s;
            a += d;
            b += d * d;
          });
      bool far = false;
      for (int64_t c = 0; c < C; ++c) {
        const double offset = sums[c] / rows;
        var[c] = std::max(0.0, sums[C + c] / rows - offset * offset);
        mean[c] = static_cast<double>(k[c]) + offset;
        far = far || offset * offset > var[c];
      }
      if (!far) break;
      shift = mean;
    }
    acc_t* mo = mean_out.data_ptr<acc_t>();
    acc_t* vo = var_out.data_ptr<acc_t>();
    acc_t* lo = low_out.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      mo[c] = static_cast<acc_t>(mean[c]);
      lo[c] = static_cast<acc_t>(mean[c] - static_cast<double>(mo[c]));
      vo[c] = static_cast<acc_t>(var[c]);
    }
  });
  return {mean_out, var_out, low_out};
}

// (sum(dy), sum(dy * (x - mean))) per channel, as a (2, C) double tensor.
at::Tensor grad_sums(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean) {
  check_pair(dy, x);
  const int64_t C = x.size(-1);
  const std::vector<double> m = doubles(mean, C);
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grad_sums",
                                  [&] { sums = grad_sums_impl<scalar_t>(dy, x, m); });
  return at::tensor(sums, at::kDouble).view({2, C});
}

// Training-mode batch-norm backward given the batch mean and invstd (weight may be None: 1):
// (dx, sum(dy), sum(dy * (x - mean))), dx None unless need_dx; the sums are double. With
// a = gamma * invstd, n rows: dx = a * (dy - sum(dy) / n) - a * invstd^2 * sum(dy * (x - mean)) / n * (x - mean).
std::vector<c10::optional<at::Tensor>> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                                const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                                bool need_dx) {
  check_pair(dy, x);
  const int64_t rows = x.size(0), C = x.size(-1);
  const std::vector<double> m = doubles(mean, C), inv = doubles(invstd, C);
  const bool affine = weight.has_value() && weight->defined();
  const std::vector<double> w = affine ? doubles(*weight, C) : std::vector<double>(C, 1.0);
  c10::optional<at::Tensor> dx;
  std::vector<double> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "backward", [&] {
    using acc_t = acc_type<scalar_t>;
    sums = grad_sums_impl<scalar_t>(dy, x, m);
    if (!need_dx) return;
    std::vector<acc_t> alpha(C), beta(C), gamma(C), mu(C);
    for (int64_t c = 0; c < C; ++c) {
      const double a = w[c] * inv[c];
      alpha[c] = static_cast<acc_t>(a);
      beta[c] = static_cast<acc_t>(-a * inv[c] * inv[c] * sums[C + c] / rows);
      gamma[c] = static_cast<acc_t>(-a * sums[c] / rows);
      mu[c] = static_cast<acc_t>(m[c]);
    }
    at::Tensor out = at::empty_like(x);
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* __restrict__ dr = dyp + r * C;
        const scalar_t* __restrict__ xr = xp + r * C;
        scalar_t* __restrict__ orow = op + r * C;
        for (int64_t c = 0; c < C; ++c) {
          orow[c] = static_cast<scalar_t>(alpha[c] * static_cast<acc_t>(dr[c]) +
                                          beta[c] * (static_cast<acc_t>(xr[c]) - mu[c]) + gamma[c]);
        }
      }
    });
    dx = out;
  });
  const at::Tensor all = at::tensor(sums, at::kDouble);
  return {dx, all.slice(0, 0, C), all.slice(0, C, 2 * C)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mean_var", &mean_var, "per-channel mean, biased variance and the mean's rounding remainder");
  m.def("backward", &backward, "training-mode batch-norm backward: (dx, sum(dy), sum(dy * (x - mean)))");
  m.def("grad_sums", &grad_sums, "per-channel sums of dy and dy * (x - mean)");
}
