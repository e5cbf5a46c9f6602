// The CPU selective-scan rows, written once with GCC vector extensions and
// compiled once per instruction set: scan_cpu_<isa>.cpp defines MMV_ISA (the
// namespace) and includes this file, under a `#pragma GCC target` for AVX2.
// Nothing here depends on torch, so no inline function of another library is
// compiled for a wider instruction set than the machine may have.
//
// A row is one (batch, channel) sequence. All arrays are float32; B and C come
// transposed to (L, NP) and zero-padded to NP = 8 * NV states, A to NP. Padded
// states have A = B = C = 0, so they stay zero and add nothing.
#include <cstdint>
#include <cstring>

#include "scan_cpu.h"

namespace mmvmamba::cpu::MMV_ISA {

namespace {

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));

#define MMV_INLINE inline __attribute__((always_inline))

MMV_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

MMV_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

MMV_INLINE vf splat(float x) { return vf{} + x; }

MMV_INLINE float hsum(vf v) {
  v += __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3});
  v += __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5});
  v += __builtin_shuffle(v, vi{1, 0, 3, 2, 5, 4, 7, 6});
  return v[0];
}

// exp(x), relative error ~2e-7: x = k ln2 + r, |r| <= ln2 / 2, degree-6
// polynomial for e^r, 2^k through the exponent bits. x is clamped to the
// normal range (exp(-87.3) ~ 1e-38 stands in for smaller results).
MMV_INLINE vf vexp(vf x) {
  const vf lo = splat(-87.33f), hi = splat(88.37f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: rounds to an integer
  const vf k = (x * 1.44269504f + magic) - magic;
  vf r = x - k * 0.693145752f;
  r = r - k * 1.42860677e-6f;
  vf p = splat(1.0f / 720.0f);
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi bits = (__builtin_convertvector(k, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// softplus and sigmoid over this kernel's vexp.
#include "cpu_vec_softplus.h"

// Applies f to n floats of src + bias into dst, 8 at a time; the tail goes
// through a padded copy.
template <typename F>
MMV_INLINE void map_row(int64_t n, const float* src, float bias, float* dst,
                        F f) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store(dst + i, f(load(src + i) + bias));
  if (i < n) {
    float tmp[8] = {};
    std::memcpy(tmp, src + i, (n - i) * sizeof(float));
    store(tmp, f(load(tmp) + bias));
    std::memcpy(dst + i, tmp, (n - i) * sizeof(float));
  }
}

// Horizontal sums of eight vectors at once: result[i] = sum of v[i].
MMV_INLINE vf hsum8(const vf (&v)[8]) {
  const vi even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
  vf p[4];
  for (int i = 0; i < 4; ++i) {
    p[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], even) +
           __builtin_shuffle(v[2 * i], v[2 * i + 1], odd);
  }
  const vi lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const vf q0 = __builtin_shuffle(p[0], p[1], lo2) + __builtin_shuffle(p[0], p[1], hi2);
  const vf q1 = __builtin_shuffle(p[2], p[3], lo2) + __builtin_shuffle(p[2], p[3], hi2);
  const vi lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  return __builtin_shuffle(q0, q1, lo4) + __builtin_shuffle(q0, q1, hi4);
}

// One forward step: updates h and returns the vector whose sum is <C_l, h_l>.
template <int NV>
MMV_INLINE vf forward_step(const RowArgs& a, int64_t l, const vf (&A)[NV],
                           vf (&h)[NV]) {
  constexpr int NP = 8 * NV;
  const float dt = a.dt[l], dtu = dt * a.u[l];
  const float* Bl = a.Bt + l * NP;
  const float* Cl = a.Ct + l * NP;
  vf acc = vf{};
  for (int j = 0; j < NV; ++j) {
    h[j] = vexp(A[j] * dt) * h[j] + dtu * load(Bl + 8 * j);
    acc += load(Cl + 8 * j) * h[j];
  }
  return acc;
}

template <int NV>
void forward_row_nv(const RowArgs& a, float* y) {
  vf A[NV], h[NV], acc[8];
  for (int j = 0; j < NV; ++j) {
    A[j] = load(a.A + 8 * j);
    h[j] = vf{};
  }
  int64_t l = 0;
  for (; l + 8 <= a.length; l += 8) {
    for (int i = 0; i < 8; ++i) acc[i] = forward_step<NV>(a, l + i, A, h);
    store(y + l, hsum8(acc) + a.D * load(a.u + l));
  }
  for (; l < a.length; ++l) {
    y[l] = hsum(forward_step<NV>(a, l, A, h)) + a.D * a.u[l];
  }
}

// State adjoints and gradient sums of one reverse step.
template <int NV>
struct Adjoint {
  vf A[NV], dh[NV], decay_next[NV], dA[NV];
  float dD;
};

// One reverse step: updates the adjoint and dB, dC; returns in sum_b / sum_a
// the vectors whose sums are <dh_l, B_l> and <dh_l, A dA_l h_{l-1}>.
template <int NV>
MMV_INLINE void backward_step(const RowArgs& a, const RowGrads& g, int64_t l,
                              Adjoint<NV>& s, vf& sum_b, vf& sum_a) {
  constexpr int NP = 8 * NV;
  const float dt = a.dt[l], dy = g.dy[l], dtu = dt * a.u[l];
  const float* Bl = a.Bt + l * NP;
  const float* Cl = a.Ct + l * NP;
  const float* hl = g.states + l * NP;
  const float* decay_l = g.decays + l * NP;
  float* dBl = g.dBt + l * NP;
  float* dCl = g.dCt + l * NP;
  sum_b = sum_a = vf{};
  for (int j = 0; j < NV; ++j) {
    s.dh[j] = dy * load(Cl + 8 * j) + s.decay_next[j] * s.dh[j];
    const vf decay = load(decay_l + 8 * j);
    s.decay_next[j] = decay;
    store(dCl + 8 * j, load(dCl + 8 * j) + dy * load(hl + 8 * j));
    store(dBl + 8 * j, load(dBl + 8 * j) + dtu * s.dh[j]);
    sum_b += s.dh[j] * load(Bl + 8 * j);
    if (l > 0) {
      const vf w = s.dh[j] * decay * load(hl - NP + 8 * j);
      s.dA[j] += dt * w;
      sum_a += s.A[j] * w;
    }
  }
  s.dD += dy * a.u[l];
}

template <int NV>
void backward_row_nv(const RowArgs& a, const RowGrads& g) {
  constexpr int NP = 8 * NV;
  const int64_t L = a.length;
  Adjoint<NV> s;
  vf h[NV];
  for (int j = 0; j < NV; ++j) {
    s.A[j] = load(a.A + 8 * j);
    h[j] = s.dh[j] = s.decay_next[j] = s.dA[j] = vf{};
  }
  s.dD = 0.0f;
  // Recompute and keep every state h_l and decay exp(dt_l A).
  for (int64_t l = 0; l < L; ++l) {
    const float dt = a.dt[l], dtu = dt * a.u[l];
    for (int j = 0; j < NV; ++j) {
      const vf decay = vexp(s.A[j] * dt);
      h[j] = decay * h[j] + dtu * load(a.Bt + l * NP + 8 * j);
      store(g.states + l * NP + 8 * j, h[j]);
      store(g.decays + l * NP + 8 * j, decay);
    }
  }
  // Reverse scan with the state adjoint dh_l = dy_l C_l + dA_{l+1} dh_{l+1};
  // the steps above the last multiple of 8 first, then blocks of 8.
  int64_t l = L - 1;
  for (; l >= 0 && (l + 1) % 8 != 0; --l) {
    vf sum_b, sum_a;
    backward_step<NV>(a, g, l, s, sum_b, sum_a);
    const float sb = hsum(sum_b);
    g.du[l] = sb * a.dt[l] + a.D * g.dy[l];
    g.ddt[l] = sb * a.u[l] + hsum(sum_a);
  }
  vf sum_b[8], sum_a[8];
  for (; l >= 0; l -= 8) {
    const int64_t lo = l - 7;
    for (int i = 7; i >= 0; --i) {
      backward_step<NV>(a, g, lo + i, s, sum_b[i], sum_a[i]);
    }
    const vf sb = hsum8(sum_b);
    store(g.du + lo, sb * load(a.dt + lo) + a.D * load(g.dy + lo));
    store(g.ddt + lo, sb * load(a.u + lo) + hsum8(sum_a));
  }
  for (int j = 0; j < NV; ++j) store(g.dA + 8 * j, load(g.dA + 8 * j) + s.dA[j]);
  *g.dD += s.dD;
}

}  // namespace

void step_sizes(int64_t n, const float* delta, float bias, bool softplus,
                float* dt) {
  if (softplus) {
    map_row(n, delta, bias, dt, [](vf x) { return vsoftplus(x); });
  } else {
    map_row(n, delta, bias, dt, [](vf x) { return x; });
  }
}

void softplus_grad(int64_t n, const float* delta, float bias, float* ddt) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    store(ddt + i, load(ddt + i) * vsigmoid(load(delta + i) + bias));
  }
  if (i < n) {
    float x[8] = {}, d[8] = {};
    std::memcpy(x, delta + i, (n - i) * sizeof(float));
    std::memcpy(d, ddt + i, (n - i) * sizeof(float));
    store(d, load(d) * vsigmoid(load(x) + bias));
    std::memcpy(ddt + i, d, (n - i) * sizeof(float));
  }
}

void forward_row(int nv, const RowArgs& a, float* y) {
  switch (nv) {
    case 1: return forward_row_nv<1>(a, y);
    case 2: return forward_row_nv<2>(a, y);
    case 4: return forward_row_nv<4>(a, y);
    default: return forward_row_nv<8>(a, y);
  }
}

void backward_row(int nv, const RowArgs& a, const RowGrads& g) {
  switch (nv) {
    case 1: return backward_row_nv<1>(a, g);
    case 2: return backward_row_nv<2>(a, g);
    case 4: return backward_row_nv<4>(a, g);
    default: return backward_row_nv<8>(a, g);
  }
}

}  // namespace mmvmamba::cpu::MMV_ISA
