// softplus and its derivative sigmoid over a CPU kernel's own vector type,
// shared by scan_cpu_kernel.h and cross_scan_cpu_kernel.h. It is a fragment,
// not a stand-alone header: a kernel includes it inside its ISA's anonymous
// namespace, after defining `vf` (its float vector, of any width), `splat`,
// `vexp` and MMV_INLINE, so each instruction set compiles its own copy
// around its own exp. No include guard: a translation unit may instantiate
// a kernel for more than one instruction set.

// softplus(x) as torch computes it (x above 20 passes through);
// log1p(e) = 2 atanh(e / (2 + e)) stays exact for tiny e = exp(-|x|).
MMV_INLINE vf vsoftplus(vf x) {
  const vf zero = vf{};
  const vf e = vexp(zero - (x < zero ? zero - x : x));
  const vf s = e / (2.0f + e);
  const vf s2 = s * s;
  vf p = splat(1.0f / 13.0f);
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  const vf sp = (x > zero ? x : zero) + 2.0f * s * p;
  return x > 20.0f ? x : sp;
}

// The softplus' derivative sigmoid(x), 1 above 20 as torch has it.
MMV_INLINE vf vsigmoid(vf x) {
  const vf zero = vf{}, one = splat(1.0f);
  const vf e = vexp(zero - (x < zero ? zero - x : x));
  const vf sg = (x < zero ? e : one) / (1.0f + e);
  return x > 20.0f ? one : sg;
}
