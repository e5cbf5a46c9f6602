// CPU implementation of mmvmamba::selective_scan_fwd / _bwd.
//
// Work is split into tasks of (batch, group, run of channels) spread over
// at::parallel_for. A task transposes its group's B and C once to (L, N)
// float32 and runs the sequential scan of each of its channels with the state
// vectorised over N (scan_cpu_kernel.h, AVX2 when the processor has it).
// The backward recomputes a row's states into a per-task buffer, then runs
// the reverse scan; dB / dC are summed per task and reduced afterwards.
//
// MMVMAMBA_CPU_ISA (cpu_isa.h, parsed here for every CPU kernel) limits the
// row kernels, read at each call: AVX2 + FMA where built, supported and
// allowed, else the portable ones (to run them on any x86-64 too).
// torch.ops.mmvmamba.cpu_isa() says which rows run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"
#include "scan.h"
#include "scan_cpu.h"

namespace mmvmamba {
namespace {

struct CpuRows {
  decltype(&cpu::generic::step_sizes) step_sizes;
  decltype(&cpu::generic::softplus_grad) softplus_grad;
  decltype(&cpu::generic::forward_row) forward_row;
  decltype(&cpu::generic::backward_row) backward_row;
};

constexpr const char* kIsaEnv = "MMVMAMBA_CPU_ISA";

}  // namespace

CpuIsa processor_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const CpuIsa isa = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
      return CpuIsa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
      return CpuIsa::kAvx2;
    return CpuIsa::kGeneric;
  }();
  return isa;
#else
  return CpuIsa::kGeneric;
#endif
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "generic";
  }
}

CpuIsa cpu_isa_limit() {
  const char* value = std::getenv(kIsaEnv);
  const std::string wanted = value ? value : "";
  if (wanted.empty() || wanted == "auto") return processor_isa();
  CpuIsa limit = CpuIsa::kGeneric;
  if (wanted == "avx512") {
    limit = CpuIsa::kAvx512;
  } else if (wanted == "avx2") {
    limit = CpuIsa::kAvx2;
  } else {
    TORCH_CHECK(wanted == "generic", kIsaEnv,
                " must be auto, avx512, avx2 or generic, got '", wanted, "'");
  }
  TORCH_CHECK(static_cast<int>(limit) <= static_cast<int>(processor_isa()),
              kIsaEnv, "=", wanted, " but this processor has no ", wanted,
              " (its widest: ", cpu_isa_name(processor_isa()), ")");
  return limit;
}

namespace {

bool avx2_built() {
#ifdef MMVMAMBA_CPU_AVX2
  return true;
#else
  return false;
#endif
}

// The row kernels the next call runs: "avx2" or "generic".
std::string cpu_isa() {
  const CpuIsa limit = cpu_isa_limit();
  return avx2_built() && static_cast<int>(limit) >= 1 ? "avx2" : "generic";
}

const CpuRows& cpu_rows() {
  static const CpuRows generic{cpu::generic::step_sizes,
                               cpu::generic::softplus_grad,
                               cpu::generic::forward_row,
                               cpu::generic::backward_row};
#ifdef MMVMAMBA_CPU_AVX2
  static const CpuRows avx2{cpu::avx2::step_sizes, cpu::avx2::softplus_grad,
                            cpu::avx2::forward_row, cpu::avx2::backward_row};
  if (cpu_isa() == "avx2") return avx2;
#else
  cpu_isa_limit();  // checks the setting
#endif
  return generic;
}

// Number of 8-float vectors holding N states (1, 2, 4 or 8).
int state_vectors(int64_t d_state) {
  const int64_t nv = (d_state + 7) / 8;
  return nv <= 1 ? 1 : nv <= 2 ? 2 : nv <= 4 ? 4 : 8;
}

// Tasks are (batch, group, part); a part is a run of `per_part` channels.
struct Tasks {
  int64_t parts, per_part, count;
};

Tasks make_tasks(const ScanShape& s) {
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t rows = s.batch * s.groups;
  int64_t parts = std::clamp<int64_t>(ceil_div(want, rows), 1,
                                      std::max<int64_t>(s.per_group, 1));
  const int64_t per_part = ceil_div(s.per_group, parts);
  parts = ceil_div(s.per_group, per_part);
  return {parts, per_part, rows * parts};
}

// Returns the row as float32: the data itself for float, else a converted
// copy in `buf`.
template <typename T>
const float* as_float(const T* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

template <typename T>
void store_row(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    if (src != dst) std::memcpy(dst, src, n * sizeof(float));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// (N, L) of T -> (L, NP) float32, zero-padded states.
template <typename T>
void transpose_in(const T* src, int64_t N, int64_t L, int NP, float* dst) {
  std::fill(dst, dst + L * NP, 0.0f);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t l = 0; l < L; ++l) dst[l * NP + n] = static_cast<float>(src[n * L + l]);
  }
}

// (L, NP) float32 -> (N, L) float32.
void transpose_out(const float* src, int64_t N, int64_t L, int NP, float* dst) {
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t l = 0; l < L; ++l) dst[n * L + l] = src[l * NP + n];
  }
}

// Raw pointers of one call's (contiguous) arguments.
template <typename T>
struct Inputs {
  const T *u, *delta, *B, *C;
  const float *A, *D, *delta_bias;
  bool softplus;
};

template <typename T>
void forward_cpu(const ScanShape& s, const Inputs<T>& in, T* y) {
  const CpuRows& rows = cpu_rows();
  const int nv = state_vectors(s.d_state);
  const int NP = 8 * nv;
  const int64_t L = s.length, N = s.d_state;
  const Tasks tasks = make_tasks(s);
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Bt(L * NP), Ct(L * NP), A(NP), ubuf(L), dbuf(L),
        dt(L), ybuf(L);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (s.groups * tasks.parts);
      const int64_t g = (t / tasks.parts) % s.groups;
      const int64_t first = g * s.per_group + (t % tasks.parts) * tasks.per_part;
      const int64_t last = std::min(first + tasks.per_part, (g + 1) * s.per_group);
      const int64_t bc = (b * s.groups + g) * N * L;
      transpose_in(in.B + bc, N, L, NP, Bt.data());
      transpose_in(in.C + bc, N, L, NP, Ct.data());
      for (int64_t d = first; d < last; ++d) {
        const int64_t row = (b * s.channels + d) * L;
        std::fill(A.begin(), A.end(), 0.0f);
        std::copy(in.A + d * N, in.A + (d + 1) * N, A.begin());
        const float* delta = as_float(in.delta + row, L, dbuf.data());
        rows.step_sizes(L, delta, in.delta_bias ? in.delta_bias[d] : 0.0f,
                        in.softplus, dt.data());
        const cpu::RowArgs args{L, as_float(in.u + row, L, ubuf.data()), dt.data(),
                           A.data(), Bt.data(), Ct.data(),
                           in.D ? in.D[d] : 0.0f};
        float* out = ybuf.data();
        if constexpr (std::is_same_v<T, float>) out = y + row;
        rows.forward_row(nv, args, out);
        store_row(out, L, y + row);
      }
    }
  });
}

// Per-call backward outputs; dA, dD, d(delta_bias) per batch entry and dB,
// dC per channel part, reduced by the caller.
template <typename T>
struct Grads {
  const T* dy;
  T *du, *ddelta;
  float *dA, *dD, *ddelta_bias;  // (batch, channels, N), (batch, channels) x2
  float *dB, *dC;                // (parts, batch, groups, N, L)
};

template <typename T>
void backward_cpu(const ScanShape& s, const Inputs<T>& in, const Grads<T>& out,
                  const Tasks& tasks) {
  const CpuRows& rows = cpu_rows();
  const int nv = state_vectors(s.d_state);
  const int NP = 8 * nv;
  const int64_t L = s.length, N = s.d_state;
  at::parallel_for(0, tasks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Bt(L * NP), Ct(L * NP), states(L * NP), decays(L * NP),
        dBt(L * NP),
        dCt(L * NP), A(NP), dA(NP), ubuf(L), dbuf(L), dybuf(L), dt(L),
        dubuf(L), ddtbuf(L);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (s.groups * tasks.parts);
      const int64_t g = (t / tasks.parts) % s.groups;
      const int64_t part = t % tasks.parts;
      const int64_t first = g * s.per_group + part * tasks.per_part;
      const int64_t last = std::min(first + tasks.per_part, (g + 1) * s.per_group);
      const int64_t bc = (b * s.groups + g) * N * L;
      transpose_in(in.B + bc, N, L, NP, Bt.data());
      transpose_in(in.C + bc, N, L, NP, Ct.data());
      std::fill(dBt.begin(), dBt.end(), 0.0f);
      std::fill(dCt.begin(), dCt.end(), 0.0f);
      for (int64_t d = first; d < last; ++d) {
        const int64_t row = (b * s.channels + d) * L;
        const float bias = in.delta_bias ? in.delta_bias[d] : 0.0f;
        std::fill(A.begin(), A.end(), 0.0f);
        std::copy(in.A + d * N, in.A + (d + 1) * N, A.begin());
        std::fill(dA.begin(), dA.end(), 0.0f);
        const float* delta = as_float(in.delta + row, L, dbuf.data());
        rows.step_sizes(L, delta, bias, in.softplus, dt.data());
        const cpu::RowArgs args{L, as_float(in.u + row, L, ubuf.data()), dt.data(),
                           A.data(), Bt.data(), Ct.data(),
                           in.D ? in.D[d] : 0.0f};
        float* du = dubuf.data();
        float* ddt = ddtbuf.data();
        if constexpr (std::is_same_v<T, float>) {
          du = out.du + row;
          ddt = out.ddelta + row;
        }
        float dD = 0.0f;
        const cpu::RowGrads grads{as_float(out.dy + row, L, dybuf.data()),
                             states.data(), decays.data(), du, ddt, dA.data(), dBt.data(),
                             dCt.data(), &dD};
        rows.backward_row(nv, args, grads);
        if (in.softplus) rows.softplus_grad(L, delta, bias, ddt);
        float dbias = 0.0f;
        for (int64_t l = 0; l < L; ++l) dbias += ddt[l];
        store_row(du, L, out.du + row);
        store_row(ddt, L, out.ddelta + row);
        const int64_t bd = b * s.channels + d;
        std::copy(dA.begin(), dA.begin() + N, out.dA + bd * N);
        out.dD[bd] = dD;
        out.ddelta_bias[bd] = dbias;
      }
      const int64_t slot = part * s.batch * s.groups * N * L + bc;
      transpose_out(dBt.data(), N, L, NP, out.dB + slot);
      transpose_out(dCt.data(), N, L, NP, out.dC + slot);
    }
  });
}

template <typename T>
Inputs<T> inputs_of(const at::Tensor& u, const at::Tensor& delta,
                    const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, const at::Tensor& D,
                    const at::Tensor& delta_bias, bool softplus) {
  return {u.const_data_ptr<T>(),
          delta.const_data_ptr<T>(),
          B.const_data_ptr<T>(),
          C.const_data_ptr<T>(),
          A.const_data_ptr<float>(),
          D.defined() ? D.const_data_ptr<float>() : nullptr,
          delta_bias.defined() ? delta_bias.const_data_ptr<float>() : nullptr,
          softplus};
}

FwdResult selective_scan_fwd_cpu(const at::Tensor& u_in,
                                 const at::Tensor& delta_in,
                                 const at::Tensor& A_in, const at::Tensor& B_in,
                                 const at::Tensor& C_in,
                                 const std::optional<at::Tensor>& D_in,
                                 const std::optional<at::Tensor>& bias_in,
                                 bool delta_softplus) {
  const ScanShape s = check_scan_args(u_in, delta_in, A_in, B_in, C_in, D_in,
                                      bias_in, c10::DeviceType::CPU);
  const at::Tensor u = u_in.contiguous(), delta = delta_in.contiguous(),
                   A = A_in.contiguous(), B = B_in.contiguous(),
                   C = C_in.contiguous(), D = contiguous_or_undefined(D_in),
                   bias = contiguous_or_undefined(bias_in);
  at::Tensor y = at::empty(u.sizes(), u.options());
  at::Tensor checkpoints = at::empty({0}, u.options().dtype(at::kFloat));
  if (y.numel() == 0) return {y, checkpoints};
  MMVMAMBA_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_fwd_cpu", [&] {
    forward_cpu<scalar_t>(
        s, inputs_of<scalar_t>(u, delta, A, B, C, D, bias, delta_softplus),
        y.mutable_data_ptr<scalar_t>());
  });
  return {y, checkpoints};
}

BwdResult selective_scan_bwd_cpu(
    const at::Tensor& grad_in, const at::Tensor& u_in,
    const at::Tensor& delta_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const std::optional<at::Tensor>& D_in,
    const std::optional<at::Tensor>& bias_in, bool delta_softplus,
    const at::Tensor& checkpoints) {
  const ScanShape s = check_scan_args(u_in, delta_in, A_in, B_in, C_in, D_in,
                                      bias_in, c10::DeviceType::CPU);
  check_scan_grad_args(grad_in, u_in, checkpoints, s, /*cuda=*/false);
  const at::Tensor dy = grad_in.contiguous(), u = u_in.contiguous(),
                   delta = delta_in.contiguous(), A = A_in.contiguous(),
                   B = B_in.contiguous(), C = C_in.contiguous(),
                   D = contiguous_or_undefined(D_in),
                   bias = contiguous_or_undefined(bias_in);
  const auto f32 = u.options().dtype(at::kFloat);
  at::Tensor du = at::empty(u.sizes(), u.options());
  at::Tensor ddelta = at::empty(u.sizes(), u.options());
  if (u.numel() == 0) {
    return {du, ddelta, at::zeros(A.sizes(), f32), at::zeros(B.sizes(), B.options()),
            at::zeros(C.sizes(), C.options()), at::zeros({s.channels}, f32),
            at::zeros({s.channels}, f32)};
  }
  const Tasks tasks = make_tasks(s);
  at::Tensor dA = at::empty({s.batch, s.channels, s.d_state}, f32);
  at::Tensor dD = at::empty({s.batch, s.channels}, f32);
  at::Tensor dbias = at::empty({s.batch, s.channels}, f32);
  at::Tensor dB = at::empty({tasks.parts, s.batch, s.groups, s.d_state, s.length}, f32);
  at::Tensor dC = at::empty_like(dB);
  MMVMAMBA_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_bwd_cpu", [&] {
    const Grads<scalar_t> grads{dy.const_data_ptr<scalar_t>(),
                                du.mutable_data_ptr<scalar_t>(),
                                ddelta.mutable_data_ptr<scalar_t>(),
                                dA.mutable_data_ptr<float>(),
                                dD.mutable_data_ptr<float>(),
                                dbias.mutable_data_ptr<float>(),
                                dB.mutable_data_ptr<float>(),
                                dC.mutable_data_ptr<float>()};
    backward_cpu<scalar_t>(
        s, inputs_of<scalar_t>(u, delta, A, B, C, D, bias, delta_softplus),
        grads, tasks);
  });
  return {du,
          ddelta,
          dA.sum(0),
          dB.sum(0).to(u.scalar_type()),
          dC.sum(0).to(u.scalar_type()),
          dD.sum(0),
          dbias.sum(0)};
}

}  // namespace
}  // namespace mmvmamba

TORCH_LIBRARY_FRAGMENT(mmvmamba, m) {
  // The CPU row kernels the next call runs ("avx2" or "generic"), under the
  // current MMVMAMBA_CPU_ISA.
  m.def("cpu_isa() -> str", &mmvmamba::cpu_isa);
}

TORCH_LIBRARY_IMPL(mmvmamba, CPU, m) {
  m.impl("selective_scan_fwd", &mmvmamba::selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &mmvmamba::selective_scan_bwd_cpu);
}
