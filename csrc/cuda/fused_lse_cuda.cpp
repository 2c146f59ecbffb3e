// CUDA implementations of marginops::fused_lse and marginops::fused_lse_backward (schemas are defined by
// csrc/marginops.cpp, loaded before this extension).  This file only checks arguments, plans the grid,
// allocates outputs / workspaces on the current stream's allocator and dispatches on dtype; the kernels
// are in fused_lse_kernels.cuh (instantiated per dtype in fused_lse_<dtype>.cu).
//
// Switches (csrc/switches.h), decided once per op call: the ops' last argument `switches` carries them, as
// marginops/ops.py read them for the forward and passes them to its backward (-1: read at this call):
//   MARGINOPS_CUDA_PATH=fused  fused_lse / fused_lse_backward run the fused kernels (default: class-chunked)
//   MARGINOPS_CUDA_TF32=1      float32 inputs use TF32 tensor cores (default: exact SIMT fp32)
//   MARGINOPS_CUDA_FAST_BWD=1  fp16 backward rounds dcos once to fp16 instead of the fp32-accurate
//                              hi + lo pair (faster dW / dX products, less accurate).  bf16 inputs always
//                              use one fp16 rounding (see fused_lse_kernels.cuh), so it changes nothing there
// `deterministic` is accepted for the schema but every mode here is deterministic: there are no float
// atomics anywhere (see the comment at the top of fused_lse_kernels.cuh).
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fused_lse_chunked.h"
#include "fused_lse_params.h"
#include "margin_math.h"
#include "op_args.h"
#include "switches.h"
#include "wave_plan.h"

namespace marginops {
namespace cuda {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The non-target mode's scalar from the op's tensor argument (op_args.h).
double mode_scalar(const at::Tensor& non_target_param) {
  return non_target_param_value(non_target_param, "marginops.fused_lse (cuda): ");
}

int path_occupancy(KernelPath path, KernelKind kind, int* smem) {
  switch (path) {
    case KernelPath::kBf16: return bf16_occupancy(kind, smem);
    case KernelPath::kFp16: return fp16_occupancy(kind, smem);
    case KernelPath::kFp32: return fp32_occupancy(kind, smem);
    case KernelPath::kTf32: return tf32_occupancy(kind, smem);
    case KernelPath::kFp64: return fp64_occupancy(kind, smem);
  }
  return 0;
}

void path_forward(KernelPath path, const FusedLseParams& p) {
  switch (path) {
    case KernelPath::kBf16: return bf16_forward(p);
    case KernelPath::kFp16: return fp16_forward(p);
    case KernelPath::kFp32: return fp32_forward(p);
    case KernelPath::kTf32: return tf32_forward(p);
    case KernelPath::kFp64: return fp64_forward(p);
  }
}

void path_backward(KernelPath path, const FusedLseParams& p) {
  switch (path) {
    case KernelPath::kBf16: return bf16_backward(p);
    case KernelPath::kFp16: return fp16_backward(p);
    case KernelPath::kFp32: return fp32_backward(p);
    case KernelPath::kTf32: return tf32_backward(p);
    case KernelPath::kFp64: return fp64_backward(p);
  }
}

void check_row_vector(const at::Tensor& t, const char* name, int64_t B, at::ScalarType dtype,
                      const at::Device& device) {
  TORCH_CHECK(t.device() == device, "marginops.fused_lse (cuda): ", name, " must be on ", device, ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "marginops.fused_lse (cuda): ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "marginops.fused_lse (cuda): ", name, " must have shape (", B,
              ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "marginops.fused_lse (cuda): ", name, " must be contiguous");
}

// What validate() found out about one op call: sizes, the fused kernels' path, the accumulation dtype, the device.
struct CheckedCall {
  int64_t B = 0, D = 0, R = 0, k = 1, C_total = 0, N = 0;
  KernelPath path = KernelPath::kFp32;
  at::ScalarType acc = at::kFloat;
  const cudaDeviceProp* props = nullptr;
};

CheckedCall validate(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
                 const at::Tensor& target_logit, const at::Tensor& row_scale, const at::Tensor& threshold,
                 const std::optional<at::Tensor>& class_index, int64_t non_target, int64_t subcenters,
                 int64_t switches, bool mixed_precision = false) {
  CheckedCall pr;
  TORCH_CHECK(x.is_cuda(), "marginops.fused_lse (cuda): x must be a CUDA tensor, got ", x.device());
  const at::Device device = x.device();
  TORCH_CHECK(x.dim() == 2, "marginops.fused_lse (cuda): x must be 2-D (B, D), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "marginops.fused_lse (cuda): x must be contiguous");
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat || dt == at::kDouble,
              "marginops.fused_lse (cuda): x must be bfloat16, float16, float32 or float64, got ", dt);
  TORCH_CHECK(weight.device() == device, "marginops.fused_lse (cuda): weight must be on ", device, ", got ",
              weight.device());
  const bool mixed = weight.scalar_type() == at::kFloat && (dt == at::kBFloat16 || dt == at::kHalf);
  TORCH_CHECK(weight.scalar_type() == dt || (mixed && mixed_precision), "marginops.fused_lse (cuda): weight dtype ",
              weight.scalar_type(), " must match x dtype ", dt,
              mixed ? " in the fused CUDA kernels (a float32 weight with 16-bit x, mixed precision, runs on the "
                      "chunked path: backend='cuda')"
                    : " (or be float32 with bfloat16 / float16 x: mixed precision)");
  TORCH_CHECK(weight.dim() == 2, "marginops.fused_lse (cuda): weight must be 2-D (R, D), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "marginops.fused_lse (cuda): weight has ", weight.size(1),
              " features but x has ", x.size(1));
  TORCH_CHECK(weight.is_contiguous(), "marginops.fused_lse (cuda): weight must be contiguous");
  TORCH_CHECK(subcenters >= 1 && subcenters <= kMaxSubcenters, "marginops.fused_lse (cuda): subcenters must be in [1, ",
              kMaxSubcenters, "], got ", subcenters);
  TORCH_CHECK(weight.size(0) % subcenters == 0, "marginops.fused_lse (cuda): weight rows (", weight.size(0),
              ") must be a multiple of subcenters (", subcenters, ")");
  TORCH_CHECK(is_nontarget_mode(non_target), "marginops.fused_lse (cuda): non_target must be in [0, ",
              static_cast<int>(kNumNonTargetModes), ") (NonTargetMode of csrc/margin_math.h), got ", non_target);

  pr.B = x.size(0);
  pr.D = x.size(1);
  pr.R = weight.size(0);
  pr.k = subcenters;
  pr.C_total = pr.R / subcenters;
  pr.acc = dt == at::kDouble ? at::kDouble : at::kFloat;

  check_row_vector(labels, "labels", pr.B, at::kLong, device);
  check_row_vector(target_logit, "target_logit", pr.B, pr.acc, device);
  check_row_vector(row_scale, "row_scale", pr.B, pr.acc, device);
  check_row_vector(threshold, "threshold", pr.B, pr.acc, device);
  if (class_index.has_value()) {
    const at::Tensor& ci = *class_index;
    TORCH_CHECK(ci.device() == device, "marginops.fused_lse (cuda): class_index must be on ", device, ", got ",
                ci.device());
    TORCH_CHECK(ci.dim() == 1 && ci.scalar_type() == at::kLong,
                "marginops.fused_lse (cuda): class_index must be a 1-D int64 tensor, got shape ", ci.sizes(),
                " dtype ", ci.scalar_type());
    TORCH_CHECK(ci.is_contiguous(), "marginops.fused_lse (cuda): class_index must be contiguous");
    pr.N = ci.numel();
  } else {
    pr.N = pr.C_total;
  }
  TORCH_CHECK(pr.N > 0, "marginops.fused_lse (cuda): there must be at least one class column, got N = 0");
  TORCH_CHECK(pr.N < (int64_t{1} << 31), "marginops.fused_lse (cuda): at most 2^31 - 1 class columns, got ", pr.N);

  switch (dt) {
    case at::kBFloat16: pr.path = KernelPath::kBf16; break;
    case at::kHalf: pr.path = KernelPath::kFp16; break;
    case at::kFloat: pr.path = (switches & kSwitchTf32) != 0 ? KernelPath::kTf32 : KernelPath::kFp32; break;
    default: pr.path = KernelPath::kFp64; break;
  }
  return pr;
}

FusedLseParams base_params(const CheckedCall& pr, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& labels, const at::Tensor& target_logit, const at::Tensor& row_scale,
                           const at::Tensor& threshold, const std::optional<at::Tensor>& class_index,
                           double non_target_param, int64_t non_target, double filter_threshold) {
  FusedLseParams p;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.labels = labels.data_ptr<int64_t>();
  p.target_logit = target_logit.data_ptr();
  p.row_scale = row_scale.data_ptr();
  p.threshold = threshold.data_ptr();
  p.class_index = class_index.has_value() ? class_index->data_ptr<int64_t>() : nullptr;
  p.B = pr.B;
  p.D = pr.D;
  p.R = pr.R;
  p.N = pr.N;
  p.C_total = pr.C_total;
  p.k = static_cast<int>(pr.k);
  p.cpt_fwd = static_cast<int>(kFwdBN / pr.k);
  p.cpt_bwd = static_cast<int>(kBwdBN / pr.k);
  p.n_tiles_bwd = static_cast<int>(ceil_div(pr.N, p.cpt_bwd));
  p.non_target_param = non_target_param;
  p.non_target = static_cast<int>(non_target);
  p.filter = filter_threshold;
  const int64_t es = static_cast<int64_t>(x.element_size());
  p.vec = (pr.D * es) % 16 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0 &&
          reinterpret_cast<uintptr_t>(p.weight) % 16 == 0;
  p.stream = at::cuda::getCurrentCUDAStream().stream();
  return p;
}

// class_index values select weight rows.  The kernels skip ids outside [0, C_total) (so no input can make
// them read out of bounds), but a wrong id is a caller bug: report it like the CPU op does.  Needs one
// device-to-host copy, so it is skipped while a CUDA graph is being captured.  The backward also needs
// unique ids (each weight row's gradient is written by one CTA).
void check_class_index_values(const CheckedCall& pr, const std::optional<at::Tensor>& class_index, bool need_unique) {
  if (!class_index.has_value() || class_index->numel() == 0) return;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  const at::Tensor& ci = *class_index;
  const auto mm = at::aminmax(ci);
  const at::Tensor lohi = at::stack({std::get<0>(mm), std::get<1>(mm)}).cpu();
  const int64_t lo = lohi[0].item<int64_t>(), hi = lohi[1].item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < pr.C_total, "marginops.fused_lse (cuda): class_index values must lie in [0, ",
              pr.C_total, ") (weight has ", pr.R, " rows / subcenters=", pr.k, "), got min ", lo, " max ", hi);
  if (need_unique && ci.numel() > 1) {
    const at::Tensor sorted = std::get<0>(at::sort(ci));
    const at::Tensor same = at::eq(sorted.slice(0, 1), sorted.slice(0, 0, ci.numel() - 1));
    if (at::any(same).item<bool>()) {
      const int64_t first = sorted.slice(0, 1).masked_select(same)[0].item<int64_t>();
      TORCH_CHECK(false, "marginops.fused_lse (cuda): class_index must not repeat a class, ", first,
                  " appears more than once");
    }
  }
}

void check_device(const CheckedCall& pr, const char* what) {
  TORCH_CHECK(pr.props->major >= 8, "marginops.fused_lse (cuda, ", what, "): the CUDA kernels need compute "
              "capability 8.0 or newer (cp.async, bf16 tensor cores); this GPU is ", pr.props->major, ".",
              pr.props->minor, " (", pr.props->name, "): use backend='triton' or 'reference'");
}

int occupancy_or_throw(const CheckedCall& pr, KernelKind kind, const char* what) {
  int smem = 0;
  const int occ = path_occupancy(pr.path, kind, &smem);
  TORCH_CHECK(occ > 0, "marginops.fused_lse (cuda): the ", what, " kernel needs ", smem,
              " bytes of shared memory per block; ", pr.props->name, " allows ", pr.props->sharedMemPerBlockOptin);
  return occ;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_lse_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                  const at::Tensor& labels, const at::Tensor& target_logit,
                                                  const at::Tensor& row_scale, const at::Tensor& threshold,
                                                  const std::optional<at::Tensor>& class_index,
                                                  const at::Tensor& non_target_param, int64_t non_target,
                                                  double filter_threshold, int64_t subcenters, bool deterministic,
                                                  int64_t switches) {
  (void)deterministic;  // always deterministic (no float atomics)
  switches = decided_cuda_switches(switches);
  CheckedCall pr = validate(x, weight, labels, target_logit, row_scale, threshold, class_index, non_target, subcenters,
                        switches);
  const c10::cuda::CUDAGuard device_guard(x.device());
  pr.props = at::cuda::getCurrentDeviceProperties();
  check_device(pr, "forward");
  check_class_index_values(pr, class_index, /*need_unique=*/false);

  const auto acc_opts = x.options().dtype(pr.acc);
  at::Tensor lse = at::empty({pr.B}, acc_opts);
  at::Tensor argmax = at::empty({pr.B}, x.options().dtype(at::kLong));
  if (pr.B == 0) return {lse, argmax};

  // Grid: (row tiles) x (class splits), about one whole wave of CTAs (wave_plan.h); partials are O(splits * B).
  const int occ = occupancy_or_throw(pr, KernelKind::kForward, "forward");
  const int64_t row_tiles = ceil_div(pr.B, kFwdBM);
  const int64_t n_tiles = ceil_div(pr.N, kFwdBN / pr.k);
  const int64_t splits = whole_wave_splits(row_tiles, static_cast<int64_t>(pr.props->multiProcessorCount) * occ,
                                           1, std::min<int64_t>(n_tiles, 65535));

  at::Tensor part_m = at::empty({splits, pr.B}, acc_opts);
  at::Tensor part_s = at::empty({splits, pr.B}, acc_opts);
  at::Tensor part_c = at::empty({splits, pr.B}, acc_opts);
  at::Tensor part_j = at::empty({splits, pr.B}, x.options().dtype(at::kLong));

  FusedLseParams p = base_params(pr, x, weight, labels, target_logit, row_scale, threshold, class_index,
                                 mode_scalar(non_target_param), non_target, filter_threshold);
  p.splits = static_cast<int>(splits);
  p.lse_out = lse.data_ptr();
  p.argmax_out = argmax.data_ptr<int64_t>();
  p.part_m = part_m.data_ptr();
  p.part_s = part_s.data_ptr();
  p.part_c = part_c.data_ptr();
  p.part_j = part_j.data_ptr<int64_t>();
  path_forward(pr.path, p);
  return {lse, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_lse_backward_cuda(
    const at::Tensor& grad_lse_in, const at::Tensor& lse, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& target_logit, const at::Tensor& row_scale,
    const at::Tensor& threshold, const std::optional<at::Tensor>& class_index, const at::Tensor& non_target_param,
    int64_t non_target, double filter_threshold, int64_t subcenters, bool deterministic, bool need_grad_x,
    bool need_grad_weight, int64_t switches) {
  (void)deterministic;  // always deterministic (no float atomics)
  switches = decided_cuda_switches(switches);
  CheckedCall pr = validate(x, weight, labels, target_logit, row_scale, threshold, class_index, non_target, subcenters,
                        switches);
  // grad_lse comes from autograd and may be an expanded view: make it dense here.
  const at::Tensor grad_lse = grad_lse_in.contiguous();
  check_row_vector(grad_lse, "grad_lse", pr.B, pr.acc, x.device());
  check_row_vector(lse, "lse", pr.B, pr.acc, x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  pr.props = at::cuda::getCurrentDeviceProperties();
  check_device(pr, "backward");
  check_class_index_values(pr, class_index, /*need_unique=*/true);

  const auto acc_opts = x.options().dtype(pr.acc);
  at::Tensor grad_x = at::empty_like(x);
  // Rows of weight that no column references (class_index) must get exactly 0; without class_index the
  // dW kernel writes every row.
  // A frozen weight (need_grad_weight false): no C x D gradient and no dW kernel.  grad_x is formed anyway
  // (the dX kernel also gives grad_target_logit and grad_row_scale) and dropped.
  at::Tensor grad_weight = !need_grad_weight ? at::empty({0}, weight.options())
                           : class_index.has_value() || pr.B == 0 ? at::zeros_like(weight) : at::empty_like(weight);
  at::Tensor grad_target_logit = at::empty({pr.B}, acc_opts);
  at::Tensor grad_row_scale = at::empty({pr.B}, acc_opts);
  if (pr.B == 0) {
    return {need_grad_x ? grad_x : at::empty({0}, x.options()), grad_weight, grad_target_logit, grad_row_scale};
  }

  occupancy_or_throw(pr, KernelKind::kBackwardW, "backward (dW)");
  const int occ_x = occupancy_or_throw(pr, KernelKind::kBackwardX, "backward (dX)");
  const int64_t dc = backward_dchunk(pr.path);
  const int64_t dchunks = std::max<int64_t>(1, ceil_div(pr.D, dc));
  TORCH_CHECK(dchunks <= 65535, "marginops.fused_lse (cuda): D = ", pr.D, " is too large");
  const int64_t row_tiles = ceil_div(pr.B, kBwdBM);
  const int64_t n_tiles = ceil_div(pr.N, kBwdBN / pr.k);
  // dX grid: (row tiles) x (class splits) x (D chunks), about one whole wave (wave_plan.h); the per-split dX
  // partials are capped at 64 MiB (or one split).
  const int64_t acc_size = pr.acc == at::kDouble ? 8 : 4;
  const int64_t per_split = std::max<int64_t>(1, pr.B * pr.D * acc_size);
  const int64_t splits = whole_wave_splits(
      row_tiles * dchunks, static_cast<int64_t>(pr.props->multiProcessorCount) * occ_x, 1,
      std::min<int64_t>({n_tiles, 65535, std::max<int64_t>(1, (int64_t{64} << 20) / per_split)}));

  at::Tensor part_dx = at::empty({splits, pr.B, pr.D}, acc_opts);
  at::Tensor part_grs = at::empty({splits, pr.B}, acc_opts);
  at::Tensor part_gtl = at::empty({splits, pr.B}, acc_opts);

  FusedLseParams p = base_params(pr, x, weight, labels, target_logit, row_scale, threshold, class_index,
                                 mode_scalar(non_target_param), non_target, filter_threshold);
  p.grad_lse = grad_lse.data_ptr();
  p.lse = lse.data_ptr();
  p.splits = static_cast<int>(splits);
  p.dchunks = static_cast<int>(dchunks);
  p.split_dcos = (switches & kSwitchFastBwd) == 0;
  p.grad_x = grad_x.data_ptr();
  p.grad_weight = need_grad_weight ? grad_weight.data_ptr() : nullptr;
  p.grad_target_logit = grad_target_logit.data_ptr();
  p.grad_row_scale = grad_row_scale.data_ptr();
  p.part_dx = part_dx.data_ptr();
  p.part_grs = part_grs.data_ptr();
  p.part_gtl = part_gtl.data_ptr();
  path_backward(pr.path, p);
  if (!need_grad_x) grad_x = at::empty({0}, x.options());
  return {grad_x, grad_weight, grad_target_logit, grad_row_scale};
}

// ---- the class-chunked path (issue 13; loop: csrc/chunk_loop.h, kernels: chunk_epilogue.cuh): the
// default of the op on CUDA tensors; MARGINOPS_CUDA_PATH=fused (kSwitchFusedPath) selects the fused kernels above,
// and the ops fused_lse_cuda_fused / fused_lse_cuda_fused_backward (backend="cuda_fused") always run them.
namespace {

chunked::Problem chunked_problem(const CheckedCall& pr, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& labels, const at::Tensor& target_logit, const at::Tensor& row_scale,
                                 const at::Tensor& threshold, const std::optional<at::Tensor>& class_index,
                                 double non_target_param, int64_t non_target, double filter_threshold) {
  chunked::Problem P;
  P.x = x;
  P.weight = weight;
  P.labels = labels;
  P.target_logit = target_logit;
  P.row_scale = row_scale;
  P.threshold = threshold;
  P.class_index = class_index;
  P.non_target_param = non_target_param;
  P.non_target = non_target;
  P.filter = filter_threshold;
  P.B = pr.B;
  P.D = pr.D;
  P.R = pr.R;
  P.N = pr.N;
  P.k = pr.k;
  return P;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fused_lse_chunked_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& labels, const at::Tensor& target_logit,
                                                          const at::Tensor& row_scale, const at::Tensor& threshold,
                                                          const std::optional<at::Tensor>& class_index,
                                                          const at::Tensor& non_target_param, int64_t non_target,
                                                          double filter_threshold, int64_t subcenters,
                                                          bool deterministic, int64_t switches) {
  (void)deterministic;  // always deterministic (no atomics)
  switches = decided_cuda_switches(switches);
  const CheckedCall pr = validate(x, weight, labels, target_logit, row_scale, threshold, class_index, non_target,
                              subcenters, switches, /*mixed_precision=*/true);
  const c10::cuda::CUDAGuard device_guard(x.device());
  check_class_index_values(pr, class_index, /*need_unique=*/false);
  if (pr.B == 0) {
    return {at::empty({0}, x.options().dtype(pr.acc)), at::empty({0}, x.options().dtype(at::kLong))};
  }
  return chunked_forward(chunked_problem(pr, x, weight, labels, target_logit, row_scale, threshold, class_index,
                                         mode_scalar(non_target_param), non_target, filter_threshold),
                         at::cuda::getCurrentCUDAStream().stream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_lse_backward_chunked_cuda(
    const at::Tensor& grad_lse_in, const at::Tensor& lse, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& target_logit, const at::Tensor& row_scale,
    const at::Tensor& threshold, const std::optional<at::Tensor>& class_index, const at::Tensor& non_target_param,
    int64_t non_target, double filter_threshold, int64_t subcenters, bool deterministic, bool need_grad_x,
    bool need_grad_weight, int64_t switches) {
  (void)deterministic;
  switches = decided_cuda_switches(switches);
  const CheckedCall pr = validate(x, weight, labels, target_logit, row_scale, threshold, class_index, non_target,
                              subcenters, switches, /*mixed_precision=*/true);
  const at::Tensor grad_lse = grad_lse_in.contiguous();
  check_row_vector(grad_lse, "grad_lse", pr.B, pr.acc, x.device());
  check_row_vector(lse, "lse", pr.B, pr.acc, x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  check_class_index_values(pr, class_index, /*need_unique=*/true);
  if (pr.B == 0) {
    const auto acc_opts = x.options().dtype(pr.acc);
    return {need_grad_x ? at::zeros_like(x) : at::empty({0}, x.options()),
            need_grad_weight ? at::zeros_like(weight) : at::empty({0}, weight.options()), at::empty({0}, acc_opts),
            at::empty({0}, acc_opts)};
  }
  chunked::Problem P = chunked_problem(pr, x, weight, labels, target_logit, row_scale, threshold, class_index,
                                       mode_scalar(non_target_param), non_target, filter_threshold);
  P.fast_backward = (switches & kSwitchFastBwd) != 0;
  return chunked_backward(P, grad_lse, lse, need_grad_x, need_grad_weight, at::cuda::getCurrentCUDAStream().stream());
}

std::tuple<at::Tensor, at::Tensor> fused_lse_cuda_default(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& labels, const at::Tensor& target_logit,
                                                          const at::Tensor& row_scale, const at::Tensor& threshold,
                                                          const std::optional<at::Tensor>& class_index,
                                                          const at::Tensor& non_target_param, int64_t non_target,
                                                          double filter_threshold, int64_t subcenters,
                                                          bool deterministic, int64_t switches) {
  switches = decided_cuda_switches(switches);  // once: the path and the kernels' switches from one reading
  auto run = (switches & kSwitchFusedPath) != 0 ? fused_lse_cuda : fused_lse_chunked_cuda;
  return run(x, weight, labels, target_logit, row_scale, threshold, class_index, non_target_param, non_target,
             filter_threshold, subcenters, deterministic, switches);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_lse_backward_cuda_default(
    const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& labels, const at::Tensor& target_logit, const at::Tensor& row_scale,
    const at::Tensor& threshold, const std::optional<at::Tensor>& class_index, const at::Tensor& non_target_param,
    int64_t non_target, double filter_threshold, int64_t subcenters, bool deterministic, bool need_grad_x,
    bool need_grad_weight, int64_t switches) {
  switches = decided_cuda_switches(switches);
  auto run = (switches & kSwitchFusedPath) != 0 ? fused_lse_backward_cuda : fused_lse_backward_chunked_cuda;
  return run(grad_lse, lse, x, weight, labels, target_logit, row_scale, threshold, class_index, non_target_param,
             non_target, filter_threshold, subcenters, deterministic, need_grad_x, need_grad_weight, switches);
}

}  // namespace cuda
}  // namespace marginops

TORCH_LIBRARY_IMPL(marginops, CUDA, m) {
  m.impl("fused_lse", TORCH_FN(marginops::cuda::fused_lse_cuda_default));
  m.impl("fused_lse_backward", TORCH_FN(marginops::cuda::fused_lse_backward_cuda_default));
  m.impl("fused_lse_cuda_fused", TORCH_FN(marginops::cuda::fused_lse_cuda));
  m.impl("fused_lse_cuda_fused_backward", TORCH_FN(marginops::cuda::fused_lse_backward_cuda));
}
