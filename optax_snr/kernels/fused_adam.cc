// One pass of Adam over memory, for XLA:CPU through the JAX FFI.
//
// Used by optax_snr/kernels/fused_adam.py, which compiles this file on first use. For every
// float32 leaf it reads p, g, m, v once and writes p, m, v once (28 bytes per
// parameter), with the float operations of XLA's compiled optax_snr.adam step:
//   m = fma(g, 1 - b1, b1 * m)                       signal
//   v = fma(g * g, 1 - b2, b2 * v)                   noise
//   u = (m * r1) / (sqrt(fma(v, r2, eps_root)) + eps)   r1 = 1 / (1 - b1^t), r2 likewise
//   p = fma(u, -learning_rate, p)
// Operands: scalars f32[9], then p, g, m, v for each leaf; results p, m, v for
// each leaf, aliased to the operands so that the update happens in place.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Leaf {
  const float* g;
  float* p;
  float* m;
  float* v;
  int64_t n;
};

void AdamRange(const float* __restrict__ g, float* __restrict__ p, float* __restrict__ m,
               float* __restrict__ v, int64_t begin, int64_t end, const float* s) {
  const float one_minus_b1 = s[0], b1 = s[1], one_minus_b2 = s[2], b2 = s[3];
  const float r1 = s[4], r2 = s[5], eps_root = s[6], eps = s[7], neg_lr = s[8];
  for (int64_t i = begin; i < end; ++i) {
    const float gi = g[i];
    const float mi = std::fma(gi, one_minus_b1, m[i] * b1);
    const float vi = std::fma(gi * gi, one_minus_b2, v[i] * b2);
    const float u = (mi * r1) / (std::sqrt(std::fma(vi, r2, eps_root)) + eps);
    p[i] = std::fma(u, neg_lr, p[i]);
    m[i] = mi;
    v[i] = vi;
  }
}

// Elements [lo, hi) of the leaves laid end to end.
void AdamSpan(const std::vector<Leaf>& leaves, const float* s, int64_t lo, int64_t hi) {
  int64_t base = 0;
  for (const Leaf& leaf : leaves) {
    const int64_t begin = std::max<int64_t>(lo - base, 0);
    const int64_t end = std::min<int64_t>(hi - base, leaf.n);
    if (begin < end) AdamRange(leaf.g, leaf.p, leaf.m, leaf.v, begin, end, s);
    base += leaf.n;
    if (base >= hi) break;
  }
}

ffi::Error FusedAdamImpl(ffi::RemainingArgs args, ffi::RemainingRets rets) {
  if (args.size() < 1 || (args.size() - 1) % 4 != 0 || rets.size() != (args.size() - 1) / 4 * 3) {
    return ffi::Error::InvalidArgument("expected scalars, then (p, g, m, v) per leaf");
  }
  auto scalars = args.get<ffi::Buffer<ffi::F32>>(0);
  if (!scalars.has_value() || scalars->element_count() != 9) {
    return ffi::Error::InvalidArgument("expected 9 float32 scalars");
  }
  const size_t num_leaves = (args.size() - 1) / 4;
  std::vector<Leaf> leaves(num_leaves);
  int64_t total = 0;
  for (size_t i = 0; i < num_leaves; ++i) {
    auto g = args.get<ffi::Buffer<ffi::F32>>(2 + 4 * i);
    auto p = rets.get<ffi::Buffer<ffi::F32>>(3 * i);
    auto m = rets.get<ffi::Buffer<ffi::F32>>(3 * i + 1);
    auto v = rets.get<ffi::Buffer<ffi::F32>>(3 * i + 2);
    if (!g.has_value() || !p.has_value() || !m.has_value() || !v.has_value()) {
      return ffi::Error::InvalidArgument("every leaf must be float32");
    }
    const int64_t n = g->element_count();
    if ((*p)->element_count() != n || (*m)->element_count() != n || (*v)->element_count() != n) {
      return ffi::Error::InvalidArgument("p, g, m and v of a leaf must have the same size");
    }
    // The results alias p, m and v, so they already hold the old values.
    leaves[i] = Leaf{g->typed_data(), (*p)->typed_data(), (*m)->typed_data(),
                     (*v)->typed_data(), n};
    total += n;
  }
  // One thread per 128K elements, at most one per core; small steps stay serial.
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t num_threads = std::clamp<int64_t>(total >> 17, 1, cores);
  const int64_t chunk = (total + num_threads - 1) / num_threads;
  const float* s = scalars->typed_data();
  std::vector<std::thread> workers;
  for (int64_t t = 1; t < num_threads; ++t) {
    workers.emplace_back(AdamSpan, std::cref(leaves), s, t * chunk,
                         std::min(total, (t + 1) * chunk));
  }
  AdamSpan(leaves, s, 0, std::min(total, chunk));
  for (auto& worker : workers) worker.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxSnrFusedAdam, FusedAdamImpl,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets());
