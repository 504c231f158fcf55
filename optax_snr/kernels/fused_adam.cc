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
//
// A second handler, OptaxSnrFusedAdamQuantized, does the same step on leaves whose
// moments are kept in optax_snr.quantized form (storage/quantized.py): per leaf a
// uint8 code per entry (two per byte at 4 bits) and a float32 scale per block of the
// last axis. It decodes the old moments, steps at full precision, and encodes the
// new ones, block by block, with the float operations of XLA's compiled chain:
// 16 bytes of memory traffic per parameter at 8 bits instead of 28.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

// ---- Quantized moments ------------------------------------------------------------

// One moment buffer of one leaf: codes (rows x row_bytes) and scales (rows x count).
struct Codes {
  uint8_t* codes;
  float* scales;
  int64_t row_bytes;  // length at 8 bits, ceil(length / 2) at 4 bits.
  int bits;
};

struct QLeaf {
  const float* g;
  float* p;
  Codes m, v;
  int64_t rows, length, count, size;
  int64_t units;  // rows * ceil(count / 2): work comes in pairs of blocks of a row.
};

// The code maps of storage/quantized.py, computed with the float operations of
// XLA's compiled decode: signal sign(k) (k / H)^2 with k = code - H, noise
// ((code + 1) / N)^4; each times the block's scale.
template <int kBits>
inline float DecodeSignal(float code, float scale) {
  constexpr float kLevels = static_cast<float>((1 << (kBits - 1)) - 1);
  const float k = code + -kLevels;
  const float r = k * (1.0f / kLevels);
  return std::copysign(r * r, k) * scale;  // sign(k) * r^2: k is never -0.
}

template <int kBits>
inline float DecodeNoise(float code, float scale) {
  const float r = (code + 1.0f) * (1.0f / static_cast<float>(1 << kBits));
  const float r2 = r * r;
  return (r2 * r2) * scale;
}

// Codes of entries [start, start + n) of a row, one per byte, into k.
template <int kBits>
inline const uint8_t* RowCodes(const uint8_t* row, int64_t start, int64_t n, uint8_t* k) {
  if constexpr (kBits == 8) {
    return row + start;
  } else {
    int64_t j = 0;
    if (start & 1) k[j++] = static_cast<uint8_t>(row[start >> 1] >> 4);
    const uint8_t* __restrict__ bytes = row + ((start + j) >> 1);
    const int64_t pairs = (n - j) / 2;
    uint8_t* __restrict__ out = k + j;
    for (int64_t b = 0; b < pairs; ++b) {  // Byte (hi, lo) -> bytes lo, hi (little endian).
      const uint16_t two = static_cast<uint16_t>((bytes[b] & 15) | ((bytes[b] >> 4) << 8));
      std::memcpy(out + 2 * b, &two, sizeof two);
    }
    j += 2 * pairs;
    if (j < n) k[j] = static_cast<uint8_t>(row[(start + j) >> 1] & 15);
    return k;
  }
}

// Writes codes k[0, n) to entries [start, start + n) of a row.
template <int kBits>
inline void StoreCodes(uint8_t* row, int64_t start, const uint8_t* k, int64_t n) {
  if constexpr (kBits == 8) {
    std::copy(k, k + n, row + start);
  } else {  // Entry i is the low nibble of byte i / 2 when i is even, else the high one.
    int64_t j = 0;
    if (start & 1) {
      row[start >> 1] = static_cast<uint8_t>((row[start >> 1] & 15) | (k[0] << 4));
      j = 1;
    }
    uint8_t* __restrict__ bytes = row + ((start + j) >> 1);
    const uint8_t* __restrict__ in = k + j;
    const int64_t pairs = (n - j) / 2;
    for (int64_t b = 0; b < pairs; ++b) {
      uint16_t two;
      std::memcpy(&two, in + 2 * b, sizeof two);
      bytes[b] = static_cast<uint8_t>((two & 15) | ((two >> 8) << 4));
    }
    j += 2 * pairs;
    if (j < n) {
      uint8_t& byte = row[(start + j) >> 1];
      byte = static_cast<uint8_t>((byte & 0xF0) | k[j]);
    }
  }
}

// The largest |x| of x[0, n), NaN if any entry is NaN (as XLA's reduce-max). The
// bits of a float with its sign cleared order as integers as the floats do, and a NaN
// above +inf, so an integer max (which vectorizes) does it.
inline float BlockScale(const float* __restrict__ x, int64_t n) {
  uint32_t largest = 0;
  for (int64_t j = 0; j < n; ++j) {
    uint32_t bits;
    std::memcpy(&bits, x + j, sizeof bits);
    largest = std::max(largest, bits & 0x7FFFFFFFu);
  }
  float scale;
  std::memcpy(&scale, &largest, sizeof scale);
  return scale;
}

// Codes of a block x[0, n) with scale `scale` (storage/quantized.py's encode).
template <int kBits>
inline void EncodeSignal(const float* __restrict__ x, int64_t n, float scale,
                         uint8_t* __restrict__ k) {
  constexpr float kLevels = static_cast<float>((1 << (kBits - 1)) - 1);
  const float inv = 1.0f / (scale > 0.0f ? scale : 1.0f);
  for (int64_t j = 0; j < n; ++j) {
    const float r = std::nearbyint(std::sqrt(std::fabs(x[j]) * inv) * kLevels);
    // sign(x) * r + H: sign(x) * r is exact, so copysign gives the same value.
    k[j] = static_cast<uint8_t>(static_cast<int32_t>(std::copysign(r, x[j]) + kLevels));
  }
}

template <int kBits>
inline void EncodeNoise(const float* __restrict__ x, int64_t n, float scale,
                        uint8_t* __restrict__ k) {
  constexpr float kLevels = static_cast<float>(1 << kBits);
  const float inv = 1.0f / (scale > 0.0f ? scale : 1.0f);
  for (int64_t j = 0; j < n; ++j) {
    const float r = std::nearbyint(std::sqrt(std::sqrt(x[j] * inv)) * kLevels) + -1.0f;
    k[j] = static_cast<uint8_t>(static_cast<int32_t>(std::min(std::max(r, 0.0f), kLevels - 1.0f)));
  }
}

struct Scratch {
  std::vector<float> m, v;
  std::vector<uint8_t> mk, vk;
};

// One block: decode the old moments, step, then encode the new ones.
template <int kMBits, int kVBits>
void AdamBlock(const QLeaf& leaf, int64_t row, int64_t block, const float* s, Scratch& w) {
  const int64_t start = block * leaf.size;
  const int64_t n = std::min(leaf.size, leaf.length - start);
  float* m_scale = leaf.m.scales + row * leaf.count + block;
  float* v_scale = leaf.v.scales + row * leaf.count + block;
  uint8_t* m_row = leaf.m.codes + row * leaf.m.row_bytes;
  uint8_t* v_row = leaf.v.codes + row * leaf.v.row_bytes;
  const uint8_t* __restrict__ mk = RowCodes<kMBits>(m_row, start, n, w.mk.data());
  const uint8_t* __restrict__ vk = RowCodes<kVBits>(v_row, start, n, w.vk.data());
  const float* g = leaf.g + row * leaf.length + start;
  float* p = leaf.p + row * leaf.length + start;
  float* __restrict__ m = w.m.data();
  float* __restrict__ v = w.v.data();
  const float ms = *m_scale, vs = *v_scale;
  for (int64_t j = 0; j < n; ++j) m[j] = DecodeSignal<kMBits>(static_cast<float>(mk[j]), ms);
  for (int64_t j = 0; j < n; ++j) v[j] = DecodeNoise<kVBits>(static_cast<float>(vk[j]), vs);
  AdamRange(g, p, m, v, 0, n, s);  // The float32 kernel's step, on the decoded block.
  for (int64_t j = 0; j < n; ++j) v[j] = std::max(v[j], 0.0f);  // Stored clamped, as in the chain.
  *m_scale = BlockScale(m, n);
  EncodeSignal<kMBits>(m, n, *m_scale, w.mk.data());
  StoreCodes<kMBits>(m_row, start, w.mk.data(), n);
  *v_scale = BlockScale(v, n);
  EncodeNoise<kVBits>(v, n, *v_scale, w.vk.data());
  StoreCodes<kVBits>(v_row, start, w.vk.data(), n);
}

template <int kMBits, int kVBits>
void AdamUnits(const QLeaf& leaf, int64_t begin, int64_t end, const float* s, Scratch& w) {
  const int64_t per_row = (leaf.count + 1) / 2;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t row = u / per_row, pair = u % per_row;
    AdamBlock<kMBits, kVBits>(leaf, row, 2 * pair, s, w);
    if (2 * pair + 1 < leaf.count) AdamBlock<kMBits, kVBits>(leaf, row, 2 * pair + 1, s, w);
  }
}

// Work units [lo, hi) of the leaves laid end to end; a unit is two blocks of a row, so
// that no byte of 4-bit codes is shared between two threads.
void QuantizedSpan(const std::vector<QLeaf>& leaves, const float* s, int64_t lo, int64_t hi,
                   int64_t max_size) {
  Scratch w{std::vector<float>(max_size), std::vector<float>(max_size),
            std::vector<uint8_t>(max_size), std::vector<uint8_t>(max_size)};
  int64_t base = 0;
  for (const QLeaf& leaf : leaves) {
    const int64_t begin = std::max<int64_t>(lo - base, 0);
    const int64_t end = std::min<int64_t>(hi - base, leaf.units);
    if (begin < end) {
      if (leaf.m.bits == 8 && leaf.v.bits == 8) AdamUnits<8, 8>(leaf, begin, end, s, w);
      if (leaf.m.bits == 8 && leaf.v.bits == 4) AdamUnits<8, 4>(leaf, begin, end, s, w);
      if (leaf.m.bits == 4 && leaf.v.bits == 8) AdamUnits<4, 8>(leaf, begin, end, s, w);
      if (leaf.m.bits == 4 && leaf.v.bits == 4) AdamUnits<4, 4>(leaf, begin, end, s, w);
    }
    base += leaf.units;
    if (base >= hi) break;
  }
}

// Operands: scalars f32[9], then p, g, m codes, m scales, v codes, v scales per leaf.
// Results: p, m codes, m scales, v codes, v scales per leaf, aliased to the operands.
// Attribute layout: per leaf rows, length, count, size, m bits, v bits.
ffi::Error FusedAdamQuantizedImpl(ffi::RemainingArgs args, ffi::RemainingRets rets,
                                  ffi::Span<const int64_t> layout) {
  if (args.size() < 1 || (args.size() - 1) % 6 != 0) {
    return ffi::Error::InvalidArgument("expected scalars, then six operands per leaf");
  }
  const size_t num_leaves = (args.size() - 1) / 6;
  if (rets.size() != num_leaves * 5 || layout.size() != num_leaves * 6) {
    return ffi::Error::InvalidArgument("expected five results and six layout entries per leaf");
  }
  auto scalars = args.get<ffi::Buffer<ffi::F32>>(0);
  if (!scalars.has_value() || scalars->element_count() != 9) {
    return ffi::Error::InvalidArgument("expected 9 float32 scalars");
  }
  std::vector<QLeaf> leaves(num_leaves);
  int64_t total = 0, max_size = 1, entries = 0;
  for (size_t i = 0; i < num_leaves; ++i) {
    const int64_t* l = layout.begin() + 6 * i;
    const int64_t rows = l[0], length = l[1], count = l[2], size = l[3];
    const int m_bits = static_cast<int>(l[4]), v_bits = static_cast<int>(l[5]);
    auto g = args.get<ffi::Buffer<ffi::F32>>(2 + 6 * i);
    auto p = rets.get<ffi::Buffer<ffi::F32>>(5 * i);
    auto mc = rets.get<ffi::Buffer<ffi::U8>>(5 * i + 1);
    auto ms = rets.get<ffi::Buffer<ffi::F32>>(5 * i + 2);
    auto vc = rets.get<ffi::Buffer<ffi::U8>>(5 * i + 3);
    auto vs = rets.get<ffi::Buffer<ffi::F32>>(5 * i + 4);
    if (!g.has_value() || !p.has_value() || !mc.has_value() || !ms.has_value() ||
        !vc.has_value() || !vs.has_value()) {
      return ffi::Error::InvalidArgument("expected float32 p, g, scales and uint8 codes");
    }
    const bool bits_ok = (m_bits == 8 || m_bits == 4) && (v_bits == 8 || v_bits == 4);
    const auto row_bytes = [&](int bits) { return bits == 8 ? length : (length + 1) / 2; };
    if (!bits_ok || size < 1 || count < 1 || count * size < length ||
        g->element_count() != rows * length || (*p)->element_count() != rows * length ||
        (*mc)->element_count() != rows * row_bytes(m_bits) ||
        (*vc)->element_count() != rows * row_bytes(v_bits) ||
        (*ms)->element_count() != rows * count || (*vs)->element_count() != rows * count) {
      return ffi::Error::InvalidArgument("a leaf's buffers do not match its block layout");
    }
    leaves[i] = QLeaf{g->typed_data(),
                      (*p)->typed_data(),
                      Codes{(*mc)->typed_data(), (*ms)->typed_data(), row_bytes(m_bits), m_bits},
                      Codes{(*vc)->typed_data(), (*vs)->typed_data(), row_bytes(v_bits), v_bits},
                      rows,
                      length,
                      count,
                      size,
                      rows * ((count + 1) / 2)};
    total += leaves[i].units;
    entries += rows * length;
    max_size = std::max(max_size, size);
  }
  // As above: about one thread per 128K entries, at most one per core.
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t num_threads = std::clamp<int64_t>(std::min(entries >> 17, total), 1, cores);
  const int64_t chunk = (total + num_threads - 1) / num_threads;
  const float* s = scalars->typed_data();
  std::vector<std::thread> workers;
  for (int64_t t = 1; t < num_threads; ++t) {
    workers.emplace_back(QuantizedSpan, std::cref(leaves), s, t * chunk,
                         std::min(total, (t + 1) * chunk), max_size);
  }
  QuantizedSpan(leaves, s, 0, std::min(total, chunk), max_size);
  for (auto& worker : workers) worker.join();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxSnrFusedAdam, FusedAdamImpl,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxSnrFusedAdamQuantized, FusedAdamQuantizedImpl,
                              ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("layout"));
