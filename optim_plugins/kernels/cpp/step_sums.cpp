// Optimizer steps on CPU that also take op.telemetry's sums in the same pass: Adam/AdamW and SGD.
//
// Each update follows ATen's CPU fused kernel (what torch.optim.Adam(W)(fused=True) /
// torch._fused_adam(w)_ and SGD(fused=True) / torch._fused_sgd_ run) operation for operation: the
// same vector width, the same coefficients in double, the same scalar code for the tail, so that a
// recording step gives the parameters and states a step without telemetry gives. Per tensor they
// add four sums, read from registers the update already holds: g^2 (the gradient after
// unscaling), (new p - old p)^2, old p^2 and the new second moment v (Adam; 0 for SGD). Sums run in
// the parameter's dtype over blocks and in double across blocks.
//
// ATen's build lets the compiler contract a * b + c into fused multiply-adds; where that decided
// the bits (Adam's L2 weight decay in the vector code, the second moment of its scalar tail), the
// fma is written out here, so that the result does not hang on this compiler's choices. The
// equality with torch's kernels is tested (tests/test_cpp_kernels.py).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

namespace {

using Sums = std::array<double, 4>;  // g^2, update^2, old p^2, v

// The lanes of a vector accumulator (summed in the parameter's dtype over a block), added in double.
template <typename scalar_t>
double sum_lanes(at::vec::Vectorized<scalar_t> acc) {
  scalar_t lanes[at::vec::Vectorized<scalar_t>::size()];
  acc.store(lanes);
  double total = 0;
  for (scalar_t lane : lanes) total += double(lane);
  return total;
}

// What every kernel here checks before it changes anything: the lists' lengths, the sums tensor
// (float64, [n, columns]), every parameter a contiguous CPU float32/float64 tensor, every tensor of
// `like` like its parameter (contiguous, CPU, same dtype and size), and every tensor of `optional`
// either empty (none) or like it.
void check_tensors(const char* name, const std::vector<at::Tensor>& params,
                   const std::vector<const std::vector<at::Tensor>*>& like,
                   const std::vector<const std::vector<at::Tensor>*>& optional, const at::Tensor& sums,
                   int64_t columns) {
  const size_t n = params.size();
  bool lengths = true;
  for (const auto* list : like) lengths = lengths && list->size() == n;
  for (const auto* list : optional) lengths = lengths && list->size() == n;
  TORCH_CHECK(lengths, name, ": lists of different lengths");
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.is_contiguous() && sums.numel() == int64_t(columns * n),
              name, ": sums must be a contiguous float64 tensor of shape [n, ", columns, "]");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const bool floating = p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble;
    TORCH_CHECK(p.is_contiguous() && p.device().is_cpu() && floating, name, ": parameter ", i,
                " is not a contiguous CPU float32/float64 tensor");
    auto like_p = [&](const at::Tensor& t) {
      return t.is_contiguous() && t.scalar_type() == p.scalar_type() && t.numel() == p.numel() && t.device().is_cpu();
    };
    bool alike = true;
    for (const auto* list : like) alike = alike && like_p((*list)[i]);
    for (const auto* list : optional) alike = alike && ((*list)[i].numel() == 0 || like_p((*list)[i]));
    TORCH_CHECK(alike, name, ": tensor ", i, " is not a contiguous CPU tensor of its parameter's dtype and size");
  }
}

// What both steps check (check_tensors, and one step count per parameter); GradScaler's scale
// (nullptr without one).
const float* check_step(const char* name, const std::vector<at::Tensor>& params,
                        const std::vector<const std::vector<at::Tensor>*>& like_params, size_t steps,
                        const c10::optional<at::Tensor>& grad_scale, const at::Tensor& sums) {
  TORCH_CHECK(steps == params.size(), name, ": lists of different lengths");
  check_tensors(name, params, like_params, {}, sums, 4);
  if (!grad_scale.has_value()) return nullptr;
  TORCH_CHECK(grad_scale->scalar_type() == at::kFloat && grad_scale->numel() == 1,
              name, ": grad_scale must be one float32 value");
  return grad_scale->data_ptr<float>();
}

// Runs range(offset, size, sums) over a tensor's ranges on ATen's threads, split on cache lines as
// ATen's fused kernels split them, and adds the threads' sums into out[0..3].
template <typename scalar_t, typename Range>
void over_ranges(int64_t numel, double* out, const Range& range) {
  constexpr int64_t unit = 64 / sizeof(scalar_t);
  std::vector<Sums> partial(at::get_num_threads(), Sums{0, 0, 0, 0});
  at::parallel_for(0, (numel + unit - 1) / unit, 0, [&](int64_t begin, int64_t end) {
    begin *= unit;
    Sums local{0, 0, 0, 0};  // on this thread's stack: the threads' rows of `partial` share cache lines
    range(begin, std::min(end * unit, numel) - begin, local);
    for (int k = 0; k < 4; ++k) partial[at::get_thread_num()][k] += local[k];
  });
  for (const Sums& s : partial)
    for (int k = 0; k < 4; ++k) out[k] += s[k];
}

// The gradient a step uses at d: loaded, unscaled by GradScaler's scale (and written back, as
// torch's kernels do), its square added to acc_g, then negated for maximize.
template <typename scalar_t>
inline at::vec::Vectorized<scalar_t> step_grad(scalar_t* g, int64_t d, const float* grad_scale, bool maximize,
                                               at::vec::Vectorized<scalar_t>& acc_g) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Vec grad = Vec::loadu(g + d);
  if (grad_scale) {
    grad = grad / Vec(scalar_t(*grad_scale));
    grad.store(g + d);
  }
  acc_g = at::vec::fmadd(grad, grad, acc_g);  // the sums' FMAs touch no update bit
  return maximize ? grad * Vec(scalar_t(-1.0)) : grad;
}

// The same for one element of the scalar tail, its square added to sum_g in double.
template <typename scalar_t>
inline scalar_t step_grad(scalar_t* g, int64_t d, const float* grad_scale, bool maximize, double& sum_g) {
  scalar_t grad = g[d];
  if (grad_scale) {
    grad = g[d] / scalar_t(*grad_scale);
    g[d] = grad;
  }
  sum_g += double(grad) * double(grad);
  return maximize ? -grad : grad;
}

// The change of the parameter squared into acc_u, the old parameter squared into acc_p.
template <typename scalar_t>
inline void add_change(const at::vec::Vectorized<scalar_t>& param, const at::vec::Vectorized<scalar_t>& old_p,
                       at::vec::Vectorized<scalar_t>& acc_u, at::vec::Vectorized<scalar_t>& acc_p) {
  const at::vec::Vectorized<scalar_t> change = param - old_p;
  acc_u = at::vec::fmadd(change, change, acc_u);
  acc_p = at::vec::fmadd(old_p, old_p, acc_p);
}

// ------------------------------------------------------------------------------------------ Adam

struct Coefficients {
  double lr, beta1, beta2, weight_decay, eps, step_size, bias_correction2_sqrt;
  bool amsgrad, maximize, decoupled;
  const float* grad_scale;  // nullptr: gradients are already unscaled
};

template <typename scalar_t>
void step_range(scalar_t* p, scalar_t* g, scalar_t* m, scalar_t* v, scalar_t* vmax, int64_t size,
                const Coefficients& coefficients, Sums& sums) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const Coefficients c = coefficients;  // a local copy: the vector stores may alias a reference, not it
  const scalar_t weight = scalar_t(1 - c.beta1);  // exp_avg.lerp_(grad, 1 - beta1)
  const bool small_weight = std::abs(weight) < scalar_t(0.5);
  const Vec lerp_coeff = small_weight ? Vec(weight) : Vec(weight) - Vec(scalar_t(1));
  const Vec beta2(scalar_t(c.beta2)), one_minus_beta2(scalar_t(1 - c.beta2));
  const Vec decay(scalar_t(c.decoupled ? 1 - c.lr * c.weight_decay : c.weight_decay));
  const Vec bc2_sqrt(scalar_t(c.bias_correction2_sqrt)), eps(scalar_t(c.eps));
  const Vec neg_step_size(scalar_t(-c.step_size));
  const bool decay_on = c.weight_decay != 0.f;
  constexpr int64_t kBlock = 256 * Vec::size();  // elements summed in scalar_t before adding in double
  const int64_t vector_end = size - (size % Vec::size());
  int64_t d = 0;
  while (d < vector_end) {
    const int64_t block_end = std::min(vector_end, d + kBlock);
    Vec acc_g(0), acc_u(0), acc_p(0), acc_v(0);  // locals of the block: they stay in registers
    for (; d < block_end; d += Vec::size()) {
      const Vec old_p = Vec::loadu(p + d);
      Vec param = old_p;
      Vec grad = step_grad(g, d, c.grad_scale, c.maximize, acc_g);
      if (decay_on) {
        if (c.decoupled) param = param * decay;
        else grad = at::vec::fmadd(param, decay, grad);
      }
      Vec exp_avg = Vec::loadu(m + d);
      const Vec base = small_weight ? exp_avg : grad;
      exp_avg = at::vec::fmadd(lerp_coeff, grad - exp_avg, base);
      const Vec exp_avg_sq = Vec::loadu(v + d) * beta2 + one_minus_beta2 * grad * grad;
      exp_avg.store(m + d);
      exp_avg_sq.store(v + d);
      Vec second = exp_avg_sq;
      if (c.amsgrad) {
        second = at::vec::maximum(Vec::loadu(vmax + d), exp_avg_sq);
        second.store(vmax + d);
      }
      const Vec denom = (second.sqrt() / bc2_sqrt) + eps;
      param = param + neg_step_size * exp_avg / denom;
      param.store(p + d);
      add_change(param, old_p, acc_u, acc_p);
      acc_v = acc_v + exp_avg_sq;
    }
    sums[0] += sum_lanes(acc_g);
    sums[1] += sum_lanes(acc_u);
    sums[2] += sum_lanes(acc_p);
    sums[3] += sum_lanes(acc_v);
  }
  for (; d < size; d++) {  // the tail, in ATen's scalar form
    const scalar_t old_p = p[d];
    scalar_t grad = step_grad(g, d, c.grad_scale, c.maximize, sums[0]);
    if (decay_on) {
      if (c.decoupled) p[d] = p[d] * scalar_t(1 - c.lr * c.weight_decay);
      else grad += p[d] * scalar_t(c.weight_decay);
    }
    if (small_weight) {
      m[d] = m[d] + weight * (grad - m[d]);
    } else {
      m[d] = grad - (grad - m[d]) * (scalar_t(1) - weight);
    }
    v[d] = std::fma(v[d], scalar_t(c.beta2), scalar_t(1 - c.beta2) * grad * grad);
    scalar_t denom;
    if (c.amsgrad) {
      vmax[d] = std::max(vmax[d], v[d]);
      denom = std::sqrt(vmax[d]) / scalar_t(c.bias_correction2_sqrt) + scalar_t(c.eps);
    } else {
      denom = std::sqrt(v[d]) / scalar_t(c.bias_correction2_sqrt) + scalar_t(c.eps);
    }
    p[d] = p[d] - scalar_t(c.step_size) * m[d] / denom;
    const double change = double(p[d] - old_p);
    sums[1] += change * change;
    sums[2] += double(old_p) * double(old_p);
    sums[3] += double(v[d]);
  }
}

void adam_step_with_sums(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                         const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                         const std::vector<at::Tensor>& max_exp_avg_sqs, const std::vector<at::Tensor>& steps,
                         double lr, double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                         bool maximize, bool decoupled, const c10::optional<at::Tensor>& grad_scale,
                         at::Tensor sums) {
  std::vector<const std::vector<at::Tensor>*> like_params = {&grads, &exp_avgs, &exp_avg_sqs};
  if (amsgrad) like_params.push_back(&max_exp_avg_sqs);
  const float* scale = check_step("adam_step_with_sums", params, like_params, steps.size(), grad_scale, sums);
  double* out = sums.data_ptr<double>();
  for (size_t i = 0; i < params.size(); ++i) {
    const double step = steps[i].item<float>();  // as ATen: the step count read as float
    Coefficients c{lr, beta1, beta2, weight_decay, eps, 0, 0, amsgrad, maximize, decoupled, scale};
    c.step_size = lr / (1 - std::pow(beta1, step));
    c.bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, step));
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "adam_step_with_sums", [&] {
      scalar_t* p = params[i].data_ptr<scalar_t>();
      scalar_t* g = grads[i].data_ptr<scalar_t>();
      scalar_t* m = exp_avgs[i].data_ptr<scalar_t>();
      scalar_t* v = exp_avg_sqs[i].data_ptr<scalar_t>();
      scalar_t* vmax = amsgrad ? max_exp_avg_sqs[i].data_ptr<scalar_t>() : nullptr;
      over_ranges<scalar_t>(params[i].numel(), out + 4 * i, [&](int64_t at, int64_t size, Sums& sum) {
        step_range<scalar_t>(p + at, g + at, m + at, v + at, vmax ? vmax + at : nullptr, size, c, sum);
      });
    });
  }
}

// ------------------------------------------------------------------------------------------ SGD

struct SgdOptions {
  double weight_decay, momentum, lr, dampening;
  bool nesterov, maximize, first_step;
  const float* grad_scale;
};

template <typename scalar_t>
void sgd_range(scalar_t* p, scalar_t* g, scalar_t* buf, int64_t size, const SgdOptions& options, Sums& sums) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const SgdOptions o = options;  // a local copy: the options stay in registers (as step_range's)
  constexpr int64_t kBlock = 256 * Vec::size();
  const int64_t vector_end = size - (size % Vec::size());
  int64_t d = 0;
  while (d < vector_end) {
    const int64_t block_end = std::min(vector_end, d + kBlock);
    Vec acc_g(0), acc_u(0), acc_p(0);
    for (; d < block_end; d += Vec::size()) {
      const Vec old_p = Vec::loadu(p + d);
      Vec grad = step_grad(g, d, o.grad_scale, o.maximize, acc_g);
      if (o.weight_decay != 0.0) grad = at::vec::fmadd(old_p, Vec(scalar_t(o.weight_decay)), grad);
      if (o.momentum != 0.0) {
        Vec velocity;
        if (o.first_step) {
          velocity = grad;
        } else {
          velocity = Vec::loadu(buf + d) * Vec(scalar_t(o.momentum));
          velocity = at::vec::fmadd(Vec(scalar_t(1 - o.dampening)), grad, velocity);
        }
        velocity.store(buf + d);
        grad = o.nesterov ? at::vec::fmadd(velocity, Vec(scalar_t(o.momentum)), grad) : velocity;
      }
      const Vec param = old_p + grad * Vec(scalar_t(-o.lr));
      param.store(p + d);
      add_change(param, old_p, acc_u, acc_p);
    }
    sums[0] += sum_lanes(acc_g);
    sums[1] += sum_lanes(acc_u);
    sums[2] += sum_lanes(acc_p);
  }
  for (; d < size; d++) {  // the tail, in ATen's scalar form
    const scalar_t old_p = p[d];
    scalar_t grad = step_grad(g, d, o.grad_scale, o.maximize, sums[0]);
    if (o.weight_decay != 0.0) grad += p[d] * scalar_t(o.weight_decay);
    if (o.momentum != 0.0) {
      if (o.first_step) {
        buf[d] = grad;
      } else {
        buf[d] = buf[d] * scalar_t(o.momentum) + grad * scalar_t(1 - o.dampening);
      }
      if (o.nesterov) {
        grad += buf[d] * scalar_t(o.momentum);
      } else {
        grad = buf[d];
      }
    }
    p[d] -= grad * scalar_t(o.lr);
    const double change = double(p[d] - old_p);
    sums[1] += change * change;
    sums[2] += double(old_p) * double(old_p);
  }
}

void sgd_step_with_sums(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& momentum_buffers, const std::vector<at::Tensor>& steps,
                        double weight_decay, double momentum, double lr, double dampening, bool nesterov,
                        bool maximize, const c10::optional<at::Tensor>& grad_scale, at::Tensor sums) {
  const bool has_buffer = momentum != 0.0;
  std::vector<const std::vector<at::Tensor>*> like_params = {&grads};
  if (has_buffer) like_params.push_back(&momentum_buffers);
  const float* scale = check_step("sgd_step_with_sums", params, like_params, steps.size(), grad_scale, sums);
  double* out = sums.data_ptr<double>();
  for (size_t i = 0; i < params.size(); ++i) {
    const SgdOptions o{weight_decay, momentum, lr, dampening, nesterov, maximize,
                       steps[i].item<double>() == 1.0, scale};
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "sgd_step_with_sums", [&] {
      scalar_t* p = params[i].data_ptr<scalar_t>();
      scalar_t* g = grads[i].data_ptr<scalar_t>();
      scalar_t* buf = has_buffer ? momentum_buffers[i].data_ptr<scalar_t>() : nullptr;
      over_ranges<scalar_t>(params[i].numel(), out + 4 * i, [&](int64_t at, int64_t size, Sums& sum) {
        sgd_range<scalar_t>(p + at, g + at, buf ? buf + at : nullptr, size, o, sum);
      });
    });
  }
}

// ------------------------------------------------------------------- around a step (the copy path)

// For a step that cannot take op.telemetry's sums itself (foreach, per-tensor and factored updates):
// before it, each parameter copied with its sums of g^2 and p^2 in the same pass (sums[i] = {g^2,
// p^2}); after it, sum (new p - old p)^2 and sum v of the second moment (an empty tensor: none) in
// one pass (sums[i] = {update^2, v}). 12 and 8-12 bytes a parameter, where the copy, norm and
// subtraction passes they replace move 36.

// Two sums over a tensor's elements on ATen's threads, written to out[0] and out[1]: vector(d, first,
// second) for the vector at element d (accumulating into two vectors, summed in scalar_t over 256
// vectors, then in double), scalar(d, sums) for each element of a range's tail.
template <typename scalar_t, typename Vector, typename Scalar>
void two_sums(int64_t numel, double* out, const Vector& vector, const Scalar& scalar) {
  using Vec = at::vec::Vectorized<scalar_t>;
  Sums total{0, 0, 0, 0};
  over_ranges<scalar_t>(numel, total.data(), [&](int64_t at, int64_t size, Sums& sum) {
    const int64_t vector_end = size - size % Vec::size();
    int64_t d = 0;
    while (d < vector_end) {
      const int64_t block_end = std::min(vector_end, d + 256 * Vec::size());
      Vec first(0), second(0);
      for (; d < block_end; d += Vec::size()) vector(at + d, first, second);
      sum[0] += sum_lanes(first);
      sum[1] += sum_lanes(second);
    }
    for (; d < size; ++d) scalar(at + d, sum);
  });
  out[0] = total[0];
  out[1] = total[1];
}

void copy_with_sums(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& copies,
                    const std::vector<at::Tensor>& grads, at::Tensor sums) {
  check_tensors("copy_with_sums", params, {&copies, &grads}, {}, sums, 2);
  double* out = sums.data_ptr<double>();
  for (size_t i = 0; i < params.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "copy_with_sums", [&] {
      using Vec = at::vec::Vectorized<scalar_t>;
      const scalar_t* p = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].data_ptr<scalar_t>();
      scalar_t* copy = copies[i].data_ptr<scalar_t>();
      two_sums<scalar_t>(
          params[i].numel(), out + 2 * i,
          [&](int64_t d, Vec& acc_g, Vec& acc_p) __attribute__((always_inline)) {
            const Vec value = Vec::loadu(p + d), grad = Vec::loadu(g + d);
            value.store(copy + d);
            acc_g = at::vec::fmadd(grad, grad, acc_g);
            acc_p = at::vec::fmadd(value, value, acc_p);
          },
          [&](int64_t d, Sums& sum) __attribute__((always_inline)) {
            copy[d] = p[d];
            sum[0] += double(g[d]) * double(g[d]);
            sum[1] += double(p[d]) * double(p[d]);
          });
    });
  }
}

void change_sums(const std::vector<at::Tensor>& olds, const std::vector<at::Tensor>& news,
                 const std::vector<at::Tensor>& second_moments, at::Tensor sums) {
  check_tensors("change_sums", news, {&olds}, {&second_moments}, sums, 2);
  double* out = sums.data_ptr<double>();
  for (size_t i = 0; i < news.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES(news[i].scalar_type(), "change_sums", [&] {
      using Vec = at::vec::Vectorized<scalar_t>;
      const scalar_t* old = olds[i].data_ptr<scalar_t>();
      const scalar_t* now = news[i].data_ptr<scalar_t>();
      const scalar_t* v = second_moments[i].numel() ? second_moments[i].data_ptr<scalar_t>() : nullptr;
      two_sums<scalar_t>(
          news[i].numel(), out + 2 * i,
          [&](int64_t d, Vec& acc_u, Vec& acc_v) __attribute__((always_inline)) {
            const Vec change = Vec::loadu(now + d) - Vec::loadu(old + d);
            acc_u = at::vec::fmadd(change, change, acc_u);
            if (v) acc_v = acc_v + Vec::loadu(v + d);
          },
          [&](int64_t d, Sums& sum) __attribute__((always_inline)) {
            const double change = double(now[d] - old[d]);
            sum[0] += change * change;
            if (v) sum[1] += double(v[d]);
          });
    });
  }
}

}  // namespace

// torch.ops.optim_plugins.* (optim_plugins/kernels/cpp/__init__.py builds and loads them)
TORCH_LIBRARY_FRAGMENT(optim_plugins, module) {
  module.def("adam_step_with_sums", &adam_step_with_sums);
  module.def("sgd_step_with_sums", &sgd_step_with_sums);
  module.def("copy_with_sums", &copy_with_sums);
  module.def("change_sums", &change_sums);
}
