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

at::Tensor per_channel(const at::Tensor& t, at::ScalarType dtype, int64_t channels) {
  TORCH_CHECK(t.numel() == channels, "per-channel tensors need ", channels, " values, got ", t.numel());
  return t.to(at::kCPU, dtype).contiguous();
}

// Per-thread double sums of first(p, q, k) and second(p, q, k) over every row, for each
// channel; q may be null (one-input reductions). Returns a (2, C) double tensor.
template <typename scalar_t, typename Step>
at::Tensor paired_sums(const scalar_t* p, const scalar_t* q, const acc_type<scalar_t>* k,
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
  at::Tensor out = at::zeros({2, C}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (int t = 0; t < threads; ++t) {
    const double* src = partial.data() + static_cast<size_t>(t) * 2 * C;
    for (int64_t j = 0; j < 2 * C; ++j) o[j] += src[j];
  }
  return out;
}

at::ScalarType acc_scalar_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

// (sum(x - shift), sum((x - shift)^2)) per channel, as a (2, C) double tensor.
at::Tensor shifted_sums(const at::Tensor& x, const at::Tensor& shift) {
  const int64_t C = x.size(-1);
  check_rows(x, "x", C);
  const at::Tensor k = per_channel(shift, acc_scalar_type(x), C);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "shifted_sums", [&] {
    using acc_t = acc_type<scalar_t>;
    out = paired_sums<scalar_t>(
        x.const_data_ptr<scalar_t>(), nullptr, k.const_data_ptr<acc_t>(), x.size(0), C,
        [](acc_t v, acc_t, acc_t s, acc_t& a, acc_t& b) {
          const acc_t d = v - s;
          a += d;
          b += d * d;
        });
  });
  return out;
}

// Per-channel (mean, biased variance, mean's rounding remainder), in float (double for double
// input): mean + remainder is the mean to about twice float's precision. The shift is the
// mean of sample_rows rows spread over the batch; a channel whose mean lies more than a
// standard deviation from it (its spread is below the sample's error: a constant channel, say)
// gets a second pass shifted by the first pass's mean.
std::vector<at::Tensor> mean_var(const at::Tensor& x, int64_t sample_rows) {
  const int64_t rows = x.size(0), C = x.size(-1);
  check_rows(x, "x", C);
  TORCH_CHECK(rows > 0 && sample_rows > 0, "mean_var needs rows and sample_rows > 0");
  const int64_t step = std::max<int64_t>(1, rows / sample_rows);
  at::Tensor shift = at::zeros({C}, at::kDouble);
  double* sp = shift.data_ptr<double>();
  int64_t taken = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mean_var_sample", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; r += step, ++taken) {
      for (int64_t c = 0; c < C; ++c) sp[c] += static_cast<double>(xp[r * C + c]);
    }
  });
  for (int64_t c = 0; c < C; ++c) sp[c] /= static_cast<double>(taken);
  const auto acc = acc_scalar_type(x);
  at::Tensor mean = at::empty({C}, at::kDouble), var = at::empty({C}, at::kDouble);
  double* mp = mean.data_ptr<double>();
  double* vp = var.data_ptr<double>();
  for (int pass = 0; pass < 2; ++pass) {
    // The shift in the accumulation dtype, as the kernel subtracts it; the mean adds back
    // exactly that rounded value.
    const at::Tensor k = shift.to(acc);
    const at::Tensor k64 = k.to(at::kDouble);
    const at::Tensor sums = shifted_sums(x, k);
    const double* s1 = sums.const_data_ptr<double>();
    const double* s2 = s1 + C;
    const double* kp = k64.const_data_ptr<double>();
    bool far = false;
    for (int64_t c = 0; c < C; ++c) {
      const double offset = s1[c] / rows;
      const double v = std::max(0.0, s2[c] / rows - offset * offset);
      mp[c] = kp[c] + offset;
      vp[c] = v;
      far = far || offset * offset > v;
    }
    if (!far) break;
    shift.copy_(mean);
  }
  // The mean rounded to the accumulation dtype, and what the rounding lost.
  const at::Tensor high = mean.to(acc);
  return {high, var.to(acc), (mean - high.to(at::kDouble)).to(acc)};
}

// (sum(dy), sum(dy * (x - mean))) per channel, as a (2, C) double tensor.
at::Tensor grad_sums(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean) {
  const int64_t C = x.size(-1);
  check_rows(x, "x", C);
  check_rows(dy, "dy", C);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dy.size(0) == x.size(0),
              "dy must have x's shape and dtype");
  const at::Tensor m = per_channel(mean, acc_scalar_type(x), C);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grad_sums", [&] {
    using acc_t = acc_type<scalar_t>;
    out = paired_sums<scalar_t>(
        dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), m.const_data_ptr<acc_t>(),
        x.size(0), C, [](acc_t g, acc_t v, acc_t mu, acc_t& a, acc_t& b) {
          a += g;
          b += g * (v - mu);
        });
  });
  return out;
}

// alpha * dy + beta * (x - mean) + gamma, per channel, in x's dtype and (rows, C) layout.
at::Tensor grad_input(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                      const at::Tensor& alpha, const at::Tensor& beta, const at::Tensor& gamma) {
  const int64_t C = x.size(-1);
  check_rows(x, "x", C);
  check_rows(dy, "dy", C);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && dy.size(0) == x.size(0),
              "dy must have x's shape and dtype");
  const auto acc = acc_scalar_type(x);
  const at::Tensor m = per_channel(mean, acc, C), a = per_channel(alpha, acc, C),
                   b = per_channel(beta, acc, C), g = per_channel(gamma, acc, C);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grad_input", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* dyp = dy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* mp = m.const_data_ptr<acc_t>();
    const acc_t* ap = a.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    at::parallel_for(0, x.size(0), kGrainRows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* __restrict__ dr = dyp + r * C;
        const scalar_t* __restrict__ xr = xp + r * C;
        scalar_t* __restrict__ orow = op + r * C;
        for (int64_t c = 0; c < C; ++c) {
          const acc_t v = ap[c] * static_cast<acc_t>(dr[c]) +
                          bp[c] * (static_cast<acc_t>(xr[c]) - mp[c]) + gp[c];
          orow[c] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

// Training-mode batch-norm backward given the batch mean and invstd (weight may be undefined:
// 1): (dx, sum(dy), sum(dy * (x - mean))), dx undefined unless need_dx; the sums are double.
// dx = gamma * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))).
std::vector<at::Tensor> backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                 bool need_dx) {
  const int64_t rows = x.size(0), C = x.size(-1);
  const at::Tensor sums = grad_sums(dy, x, mean);
  const at::Tensor sum_dy = sums[0], dot = sums[1];
  at::Tensor dx;
  if (need_dx) {
    const at::Tensor inv = invstd.to(at::kDouble);
    const at::Tensor alpha = weight.has_value() && weight->defined() ? weight->to(at::kDouble) * inv : inv;
    const at::Tensor beta = -alpha * inv * inv * dot / static_cast<double>(rows);
    const at::Tensor gamma = -alpha * sum_dy / static_cast<double>(rows);
    dx = grad_input(dy, x, mean, alpha, beta, gamma);
  }
  return {dx, sum_dy, dot};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shifted_sums", &shifted_sums, "per-channel sums of x - shift and its square");
  m.def("mean_var", &mean_var, "per-channel mean, biased variance and the mean's rounding remainder");
  m.def("backward", &backward, "training-mode batch-norm backward: (dx, sum(dy), sum(dy * (x - mean)))");
  m.def("grad_sums", &grad_sums, "per-channel sums of dy and dy * (x - mean)");
  m.def("grad_input", &grad_input, "alpha * dy + beta * (x - mean) + gamma per channel");
}
