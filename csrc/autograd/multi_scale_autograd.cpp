// Autograd for multi_scale_forward, in C++ so that libtorch users can train through the block too.
//
// The forward's per-branch optional tensors are flattened into one list of the tensors present (autograd
// tracks tensors, not lists of optionals); backward calls multi_scale_backward, asking only for the
// gradients some input needs, and maps its results back onto that list.
#include <torch/autograd.h>
#include <torch/library.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include "../block_config.h"

namespace msfused {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using TensorVector = std::vector<Tensor>;
using ForwardResult = std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector>;

ForwardResult call_forward(const Tensor& x, at::TensorList weight, const OptionalTensorList& bias,
                           const OptionalTensorList& scale, const OptionalTensorList& shift,
                           const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps, c10::IntArrayRef factor,
                           c10::IntArrayRef bins, c10::string_view down_mode, c10::string_view up_mode,
                           bool align_corners, c10::string_view activation, c10::string_view input_position) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msfused::multi_scale_forward", "")
                       .typed<ForwardResult(const Tensor&, at::TensorList, const OptionalTensorList&,
                                            const OptionalTensorList&, const OptionalTensorList&,
                                            const c10::List<bool>&, c10::ArrayRef<double>, c10::IntArrayRef,
                                            c10::IntArrayRef, c10::string_view, c10::string_view, bool,
                                            c10::string_view, c10::string_view)>();
  return op.call(x, weight, bias, scale, shift, batch_stats, eps, factor, bins, down_mode, up_mode, align_corners,
                 activation, input_position);
}

using BackwardResult = ForwardResult;

BackwardResult call_backward(const Tensor& grad, const Tensor& x, at::TensorList weight,
                             const OptionalTensorList& scale, const OptionalTensorList& shift,
                             at::TensorList level, at::TensorList pre, at::TensorList mean, at::TensorList var,
                             const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps, c10::IntArrayRef factor,
                             c10::IntArrayRef bins, c10::string_view down_mode, c10::string_view up_mode,
                             bool align_corners, c10::string_view activation, c10::string_view input_position,
                             std::array<bool, 2> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("msfused::multi_scale_backward", "")
                       .typed<BackwardResult(const Tensor&, const Tensor&, at::TensorList, const OptionalTensorList&,
                                             const OptionalTensorList&, at::TensorList, at::TensorList,
                                             at::TensorList, at::TensorList, const c10::List<bool>&,
                                             c10::ArrayRef<double>, c10::IntArrayRef, c10::IntArrayRef,
                                             c10::string_view, c10::string_view, bool, c10::string_view,
                                             c10::string_view, std::array<bool, 2>)>();
  return op.call(grad, x, weight, scale, shift, level, pre, mean, var, batch_stats, eps, factor, bins, down_mode,
                 up_mode, align_corners, activation, input_position, output_mask);
}

// Which optional per-branch tensors are present, and where each lives in the flat parameter list:
// weight[0..B), then per branch bias, scale, shift where present.
struct ParamLayout {
  int64_t branches = 0;
  std::vector<int64_t> bias_at, scale_at, shift_at;  // index into params, or -1

  static ParamLayout make(int64_t B, const OptionalTensorList& bias, const OptionalTensorList& scale,
                          const OptionalTensorList& shift) {
    ParamLayout l;
    l.branches = B;
    int64_t next = B;
    auto place = [&](const OptionalTensorList& list, std::vector<int64_t>& at) {
      for (int64_t b = 0; b < B; ++b) {
        const std::optional<Tensor> t = list.get(b);
        at.push_back(t.has_value() && t->defined() ? next++ : -1);
      }
    };
    place(bias, l.bias_at);
    place(scale, l.scale_at);
    place(shift, l.shift_at);
    return l;
  }
  std::vector<int64_t> encode() const {
    std::vector<int64_t> v{branches};
    for (const auto* a : {&bias_at, &scale_at, &shift_at}) v.insert(v.end(), a->begin(), a->end());
    return v;
  }
  static ParamLayout decode(const std::vector<int64_t>& v) {
    ParamLayout l;
    l.branches = v[0];
    const int64_t B = l.branches;
    l.bias_at.assign(v.begin() + 1, v.begin() + 1 + B);
    l.scale_at.assign(v.begin() + 1 + B, v.begin() + 1 + 2 * B);
    l.shift_at.assign(v.begin() + 1 + 2 * B, v.begin() + 1 + 3 * B);
    return l;
  }
  OptionalTensorList gather(const variable_list& params, const std::vector<int64_t>& at) const {
    OptionalTensorList list;
    for (int64_t i : at) list.push_back(i >= 0 ? std::optional<Tensor>(params[i]) : std::nullopt);
    return list;
  }
};

// The block's non-tensor arguments, carried from forward to backward.
struct Config {
  c10::List<bool> batch_stats;
  std::vector<double> eps;
  std::vector<int64_t> factor, bins;
  std::string down_mode, up_mode, activation, input_position;
  bool align_corners;
};

// Marks the forward's extra results (result[1:]) non-differentiable and saves x, the parameters, those
// extras and the block's configuration for backward.
void save_forward(AutogradContext* ctx, const Tensor& x, const variable_list& p, const variable_list& result,
                  const std::vector<int64_t>& layout_code, const Config& cfg) {
  variable_list extra(result.begin() + 1, result.end());
  ctx->mark_non_differentiable(extra);
  // No zero-filled gradients for the saved-tensor outputs nobody differentiates (one of each per branch,
  // full size for a factor-1 branch's conv output): backward reads only out's gradient.
  ctx->set_materialize_grads(false);
  variable_list saved{x};
  saved.insert(saved.end(), p.begin(), p.end());
  saved.insert(saved.end(), extra.begin(), extra.end());
  ctx->save_for_backward(saved);
  ctx->saved_data["layout"] = c10::IValue(layout_code);
  ctx->saved_data["batch_stats"] = cfg.batch_stats;
  ctx->saved_data["eps"] = c10::IValue(cfg.eps);
  ctx->saved_data["factor"] = c10::IValue(cfg.factor);
  ctx->saved_data["bins"] = c10::IValue(cfg.bins);
  ctx->saved_data["down_mode"] = cfg.down_mode;
  ctx->saved_data["up_mode"] = cfg.up_mode;
  ctx->saved_data["align_corners"] = cfg.align_corners;
  ctx->saved_data["activation"] = cfg.activation;
  ctx->saved_data["input_position"] = cfg.input_position;
}

// The backward operators have no derivative: with create_graph=True a second order would be silently
// missing, so refuse it whenever anything they would differentiate requires grad.
void refuse_second_order(const variable_list& grad_outputs, const variable_list& saved, const char* op) {
  if (!at::GradMode::is_enabled()) return;
  bool differentiable = grad_outputs[0].requires_grad();
  for (const Tensor& t : saved) differentiable = differentiable || (t.defined() && t.requires_grad());
  TORCH_CHECK(!differentiable, "msfused: second-order gradients of ", op,
              " are not supported (backward with create_graph=True)");
}

class MultiScaleFunction : public torch::autograd::Function<MultiScaleFunction> {
 public:
  // params: the flat parameter list (ParamLayout). Returns out, then level, pre, mean, var per branch.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, at::TensorList params,
                               const std::vector<int64_t>& layout_code, const Config& cfg) {
    const ParamLayout layout = ParamLayout::decode(layout_code);
    const int64_t B = layout.branches;
    const variable_list p(params.begin(), params.end());
    const TensorVector weight(p.begin(), p.begin() + B);
    const OptionalTensorList bias = layout.gather(p, layout.bias_at), scale = layout.gather(p, layout.scale_at),
                             shift = layout.gather(p, layout.shift_at);
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, level, pre, mean, var] =
        call_forward(x, weight, bias, scale, shift, cfg.batch_stats, cfg.eps, cfg.factor, cfg.bins, cfg.down_mode,
                     cfg.up_mode, cfg.align_corners, cfg.activation, cfg.input_position);
    variable_list result{out};
    for (const TensorVector* list : {&level, &pre, &mean, &var}) result.insert(result.end(), list->begin(), list->end());
    save_forward(ctx, x, p, result, layout_code, cfg);
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto layout_code = ctx->saved_data["layout"].toIntVector();
    const ParamLayout layout = ParamLayout::decode(layout_code);
    const int64_t B = layout.branches;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const int64_t P = static_cast<int64_t>(saved.size()) - 1 - 4 * B;
    const variable_list p(saved.begin() + 1, saved.begin() + 1 + P);
    auto group = [&](int64_t k) { return TensorVector(saved.begin() + 1 + P + k * B, saved.begin() + 1 + P + (k + 1) * B); };
    const TensorVector weight(p.begin(), p.begin() + B);
    const OptionalTensorList scale = layout.gather(p, layout.scale_at), shift = layout.gather(p, layout.shift_at);

    refuse_second_order(grad_outputs, saved, "multi_scale_forward");
    // One gradient per forward argument: x, each param, then the two non-tensor arguments.
    if (!grad_outputs[0].defined()) return variable_list(1 + P + 2);  // out unused: every gradient is zero
    const bool need_x = ctx->needs_input_grad(0);
    bool need_weight = false;
    for (int64_t b = 0; b < B; ++b) need_weight = need_weight || ctx->needs_input_grad(1 + b);

    const auto factor = ctx->saved_data["factor"].toIntVector(), bins = ctx->saved_data["bins"].toIntVector();
    const std::string input_position = ctx->saved_data["input_position"].toStringRef();
    // Image pooling: the backward of the block on its 1x1 level, x's gradient a broadcast view of it (as
    // ATen's mean gives). The full-size gradient is then only allocated (by its consumer) once this node
    // has released what it saved, which keeps the training peak at the naive composition's.
    const bool on_level = pooled_only(factor, bins, input_position);
    const Tensor grad_out = on_level ? grad_outputs[0].sum({2, 3}, /*keepdim=*/true) : grad_outputs[0];
    auto [grad_x, grad_weight, grad_bias, grad_scale, grad_shift] = call_backward(
        grad_out, on_level ? group(0)[0] : x, weight, scale, shift, group(0), group(1), group(2), group(3),
        ctx->saved_data["batch_stats"].toBoolList(), ctx->saved_data["eps"].toDoubleVector(), factor, bins,
        ctx->saved_data["down_mode"].toStringRef(), ctx->saved_data["up_mode"].toStringRef(),
        ctx->saved_data["align_corners"].toBool(), ctx->saved_data["activation"].toStringRef(), input_position,
        {need_x, need_weight});
    if (on_level && need_x) grad_x = grad_x.div_(c10::Scalar(x.sym_size(2) * x.sym_size(3))).expand_symint(x.sym_sizes());

    variable_list grads(1 + P + 2);
    if (need_x) grads[0] = grad_x;
    for (int64_t b = 0; b < B; ++b) {
      if (need_weight) grads[1 + b] = grad_weight[b];
      if (layout.bias_at[b] >= 0) grads[1 + layout.bias_at[b]] = grad_bias[b];
      if (layout.scale_at[b] >= 0) grads[1 + layout.scale_at[b]] = grad_scale[b];
      if (layout.shift_at[b] >= 0) grads[1 + layout.shift_at[b]] = grad_shift[b];
    }
    return grads;
  }
};

// The flat parameter list of ParamLayout: weights, then the present biases, scales and shifts.
TensorVector flat_params(at::TensorList weight, std::initializer_list<const OptionalTensorList*> lists) {
  TensorVector params(weight.begin(), weight.end());
  for (const OptionalTensorList* list : lists)
    for (size_t b = 0; b < list->size(); ++b) {
      const std::optional<Tensor> t = list->get(b);
      if (t.has_value() && t->defined()) params.push_back(*t);
    }
  return params;
}

ForwardResult multi_scale_forward_autograd(const Tensor& x, at::TensorList weight, const OptionalTensorList& bias,
                                           const OptionalTensorList& scale, const OptionalTensorList& shift,
                                           const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps,
                                           c10::IntArrayRef factor, c10::IntArrayRef bins,
                                           c10::string_view down_mode, c10::string_view up_mode, bool align_corners,
                                           c10::string_view activation, c10::string_view input_position) {
  const int64_t B = static_cast<int64_t>(weight.size());
  TORCH_CHECK_VALUE(bias.size() == static_cast<size_t>(B) && scale.size() == static_cast<size_t>(B) &&
                        shift.size() == static_cast<size_t>(B),
                    "msfused: bias, scale and shift need one entry (or None) per branch");
  const ParamLayout layout = ParamLayout::make(B, bias, scale, shift);
  const TensorVector params = flat_params(weight, {&bias, &scale, &shift});
  Config cfg{batch_stats.copy(),
             eps.vec(),
             factor.vec(),
             bins.vec(),
             std::string(down_mode),
             std::string(up_mode),
             std::string(activation),
             std::string(input_position),
             align_corners};
  // As a TensorList: autograd tracks the elements of a TensorList, not of a std::vector.
  const variable_list r = MultiScaleFunction::apply(x, at::TensorList(params), layout.encode(), cfg);
  auto group = [&](int64_t k) { return TensorVector(r.begin() + 1 + k * B, r.begin() + 1 + (k + 1) * B); };
  return {r[0], group(0), group(1), group(2), group(3)};
}


// ---------------------------------------------------------------------------------------------------
// multi_scale_project_forward: the same scheme, the projection being one more "branch" of the flat
// parameter list (index B of the ParamLayout: its weight, then its bias, scale and shift where present).
// ---------------------------------------------------------------------------------------------------
using ProjectForwardResult =
    std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector, Tensor, Tensor, Tensor>;
using ProjectBackwardResult =
    std::tuple<Tensor, TensorVector, TensorVector, TensorVector, TensorVector, Tensor, Tensor, Tensor, Tensor>;

struct ProjectConfig {
  bool batch_stats = false;
  double eps = 0;
  std::string activation;
  bool save_pre = true;
  TensorVector parts;  // project_parts: a cache of the weight's layout, no gradient (kept out of the graph)
};

class MultiScaleProjectFunction : public torch::autograd::Function<MultiScaleProjectFunction> {
 public:
  // params: the flat parameter list (ParamLayout over B + 1 entries). Returns out, then level, pre, mean,
  // var per branch, then the projection's pre-activation, mean and var.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, at::TensorList params,
                               const std::vector<int64_t>& layout_code, const Config& cfg, const ProjectConfig& pcfg) {
    const ParamLayout layout = ParamLayout::decode(layout_code);
    const int64_t B = layout.branches - 1;
    const variable_list p(params.begin(), params.end());
    const TensorVector weight(p.begin(), p.begin() + B);
    OptionalTensorList bias = layout.gather(p, layout.bias_at), scale = layout.gather(p, layout.scale_at),
                       shift = layout.gather(p, layout.shift_at);
    const std::optional<Tensor> p_bias = bias.get(B), p_scale = scale.get(B), p_shift = shift.get(B);
    for (OptionalTensorList* list : {&bias, &scale, &shift}) list->pop_back();
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("msfused::multi_scale_project_forward", "")
                         .typed<ProjectForwardResult(
                             const Tensor&, at::TensorList, const OptionalTensorList&, const OptionalTensorList&,
                             const OptionalTensorList&, const c10::List<bool>&, c10::ArrayRef<double>,
                             c10::IntArrayRef, c10::IntArrayRef, c10::string_view, c10::string_view, bool,
                             c10::string_view, c10::string_view, const Tensor&, const std::optional<Tensor>&,
                             const std::optional<Tensor>&, const std::optional<Tensor>&, bool, double,
                             c10::string_view, bool, at::TensorList)>();
    auto [out, level, pre, mean, var, p_pre, p_mean, p_var] =
        op.call(x, weight, bias, scale, shift, cfg.batch_stats, cfg.eps, cfg.factor, cfg.bins, cfg.down_mode,
                cfg.up_mode, cfg.align_corners, cfg.activation, cfg.input_position, p[B], p_bias, p_scale, p_shift,
                pcfg.batch_stats, pcfg.eps, pcfg.activation, pcfg.save_pre, pcfg.parts);
    variable_list result{out};
    for (const TensorVector* list : {&level, &pre, &mean, &var}) result.insert(result.end(), list->begin(), list->end());
    result.insert(result.end(), {p_pre, p_mean, p_var});
    save_forward(ctx, x, p, result, layout_code, cfg);
    ctx->saved_data["project_batch_stats"] = pcfg.batch_stats;
    ctx->saved_data["project_eps"] = pcfg.eps;
    ctx->saved_data["project_activation"] = pcfg.activation;
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const ParamLayout layout = ParamLayout::decode(ctx->saved_data["layout"].toIntVector());
    const int64_t B = layout.branches - 1;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const int64_t P = static_cast<int64_t>(saved.size()) - 1 - 4 * B - 3;
    const variable_list p(saved.begin() + 1, saved.begin() + 1 + P);
    auto group = [&](int64_t k) { return TensorVector(saved.begin() + 1 + P + k * B, saved.begin() + 1 + P + (k + 1) * B); };
    const int64_t tail = 1 + P + 4 * B;
    const TensorVector weight(p.begin(), p.begin() + B);
    OptionalTensorList scale = layout.gather(p, layout.scale_at), shift = layout.gather(p, layout.shift_at);
    const std::optional<Tensor> p_scale = scale.get(B), p_shift = shift.get(B);
    scale.pop_back();
    shift.pop_back();
    refuse_second_order(grad_outputs, saved, "multi_scale_project_forward");
    if (!grad_outputs[0].defined()) return variable_list(1 + P + 3);  // out unused: every gradient is zero
    const bool need_x = ctx->needs_input_grad(0);
    bool need_weight = false;
    for (int64_t b = 0; b <= B; ++b) need_weight = need_weight || ctx->needs_input_grad(1 + b);
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("msfused::multi_scale_project_backward", "")
                         .typed<ProjectBackwardResult(
                             const Tensor&, const Tensor&, at::TensorList, const OptionalTensorList&,
                             const OptionalTensorList&, at::TensorList, at::TensorList, at::TensorList,
                             at::TensorList, const c10::List<bool>&, c10::ArrayRef<double>, c10::IntArrayRef,
                             c10::IntArrayRef, c10::string_view, c10::string_view, bool, c10::string_view,
                             c10::string_view, const Tensor&, const std::optional<Tensor>&,
                             const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&, bool, double,
                             c10::string_view, std::array<bool, 2>)>();
    auto [grad_x, grad_weight, grad_bias, grad_scale, grad_shift, grad_pw, grad_pb, grad_ps, grad_pt] = op.call(
        grad_outputs[0], x, weight, scale, shift, group(0), group(1), group(2), group(3),
        ctx->saved_data["batch_stats"].toBoolList(), ctx->saved_data["eps"].toDoubleVector(),
        ctx->saved_data["factor"].toIntVector(), ctx->saved_data["bins"].toIntVector(),
        ctx->saved_data["down_mode"].toStringRef(), ctx->saved_data["up_mode"].toStringRef(),
        ctx->saved_data["align_corners"].toBool(), ctx->saved_data["activation"].toStringRef(),
        ctx->saved_data["input_position"].toStringRef(), p[B], p_scale, p_shift, saved[tail], saved[tail + 1],
        saved[tail + 2], ctx->saved_data["project_batch_stats"].toBool(), ctx->saved_data["project_eps"].toDouble(),
        ctx->saved_data["project_activation"].toStringRef(), {need_x, need_weight});
    grad_weight.push_back(grad_pw);
    grad_bias.push_back(grad_pb);
    grad_scale.push_back(grad_ps);
    grad_shift.push_back(grad_pt);
    // One gradient per forward argument: x, each param, then the three non-tensor arguments.
    variable_list grads(1 + P + 3);
    if (need_x) grads[0] = grad_x;
    for (int64_t b = 0; b <= B; ++b) {
      if (need_weight) grads[1 + b] = grad_weight[b];
      if (layout.bias_at[b] >= 0) grads[1 + layout.bias_at[b]] = grad_bias[b];
      if (layout.scale_at[b] >= 0) grads[1 + layout.scale_at[b]] = grad_scale[b];
      if (layout.shift_at[b] >= 0) grads[1 + layout.shift_at[b]] = grad_shift[b];
    }
    return grads;
  }
};

ProjectForwardResult multi_scale_project_forward_autograd(
    const Tensor& x, at::TensorList weight, const OptionalTensorList& bias, const OptionalTensorList& scale,
    const OptionalTensorList& shift, const c10::List<bool>& batch_stats, c10::ArrayRef<double> eps,
    c10::IntArrayRef factor, c10::IntArrayRef bins, c10::string_view down_mode, c10::string_view up_mode,
    bool align_corners, c10::string_view activation, c10::string_view input_position, const Tensor& project_weight,
    const std::optional<Tensor>& project_bias, const std::optional<Tensor>& project_scale,
    const std::optional<Tensor>& project_shift, bool project_batch_stats, double project_eps,
    c10::string_view project_activation, bool save_pre, at::TensorList project_parts) {
  const int64_t B = static_cast<int64_t>(weight.size());
  for (const Tensor& part : project_parts)
    TORCH_CHECK_VALUE(!part.requires_grad(), "msfused: project_parts must not require grad: they are a copy of "
                      "project_weight's layout, whose gradient flows through project_weight");
  TORCH_CHECK_VALUE(bias.size() == static_cast<size_t>(B) && scale.size() == static_cast<size_t>(B) &&
                        shift.size() == static_cast<size_t>(B),
                    "msfused: bias, scale and shift need one entry (or None) per branch");
  // The projection as entry B of every list.
  TensorVector all_weight(weight.begin(), weight.end());
  all_weight.push_back(project_weight);
  OptionalTensorList all_bias = bias.copy(), all_scale = scale.copy(), all_shift = shift.copy();
  all_bias.push_back(project_bias);
  all_scale.push_back(project_scale);
  all_shift.push_back(project_shift);
  const ParamLayout layout = ParamLayout::make(B + 1, all_bias, all_scale, all_shift);
  const TensorVector params = flat_params(all_weight, {&all_bias, &all_scale, &all_shift});
  Config cfg{batch_stats.copy(),          eps.vec(),
             factor.vec(),                bins.vec(),
             std::string(down_mode),      std::string(up_mode),
             std::string(activation),     std::string(input_position),
             align_corners};
  ProjectConfig pcfg{project_batch_stats, project_eps, std::string(project_activation), save_pre,
                     project_parts.vec()};
  const variable_list r = MultiScaleProjectFunction::apply(x, at::TensorList(params), layout.encode(), cfg, pcfg);
  auto group = [&](int64_t k) { return TensorVector(r.begin() + 1 + k * B, r.begin() + 1 + (k + 1) * B); };
  const int64_t tail = 1 + 4 * B;
  return {r[0], group(0), group(1), group(2), group(3), r[tail], r[tail + 1], r[tail + 2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(msfused, Autograd, m) {
  m.impl("multi_scale_forward", &multi_scale_forward_autograd);
  m.impl("multi_scale_project_forward", &multi_scale_project_forward_autograd);
}

}  // namespace msfused
