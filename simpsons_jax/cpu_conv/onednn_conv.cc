// 2-D convolutions for XLA:CPU through oneDNN, called from JAX with jax.ffi.
//
// Layouts are JAX's: activations NHWC, kernels HWIO, float32. Activations are
// handed to oneDNN as they are (no copies); the kernel is reordered to the
// layout oneDNN chooses for the CPU it runs on (AVX2, AVX-512, AMX), and the
// kernel gradient back to HWIO. Primitives are built once per shape and kept.
//
// The convolutions take the stride and the (low, high) padding of both
// spatial axes as attributes:
//   OnednnConvForward(x, w) -> y
//   OnednnConvBackwardData(dy, w) -> dx            (dx's shape from the result)
//   OnednnConvBackwardWeights(x, dy) -> dw         (dw's shape from the result)
//   OnednnConvBackwardWeightsBias(x, dy) -> dw, db
// and the notebook network's blocks, conv + bias, ReLU and 2x2 max pool (odd
// edges dropped):
//   ConvBiasReluPoolForward(x, w, b) -> y, code  (code: 4 bits a window, where
//                                                 its positive maximum stands)
//   ConvBiasReluPoolForwardU8(x, w, b) -> y, code  (x: uint8 images, divided
//                                                 by the divisor attribute)
//   ConvBiasReluPoolBackwardU8(x, code, g) -> dw, db  (3x3 kernels; the conv's
//                                                 gradient stays in L1)
//   ReluMaxPoolForward(x) -> y, code              (ReLU and pool alone)
//   ReluMaxPoolBackward(code, dy) -> d(conv)     (each window's gradient split
//                                                 evenly between its code's)

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dims = dnnl::memory::dims;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

struct Geometry {
  // x: N, H, W, C; w: KH, KW, C, O; y: N, OH, OW, O.
  std::array<int64_t, 4> x, w, y;
  int64_t stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right;

  std::string Key(char kind) const {
    std::string key(1, kind);
    for (const auto* a : {&x, &w, &y})
      for (int64_t d : *a) key += "," + std::to_string(d);
    for (int64_t v : {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right})
      key += "," + std::to_string(v);
    return key;
  }
  dnnl::memory::desc Activation(const std::array<int64_t, 4>& s) const {
    return {{s[0], s[3], s[1], s[2]}, dt::f32, tag::nhwc};
  }
  dnnl::memory::desc Kernel(tag t) const {
    return {{w[3], w[2], w[0], w[1]}, dt::f32, t};
  }
  dims Strides() const { return {stride_h, stride_w}; }
  dims PadLow() const { return {pad_top, pad_left}; }
  dims PadHigh() const { return {pad_bottom, pad_right}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Scratchpads are passed per execution: XLA may run one primitive from
// several threads at once (several devices, or independent ops), and a
// library-owned scratchpad is one per primitive.
dnnl::primitive_attr Attributes() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::memory::desc BiasDesc(const Geometry& g) {
  return {{g.w[3]}, dt::f32, tag::a};
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g,
                                                      bool bias = false) {
  if (bias)
    return {Engine(),          dnnl::prop_kind::forward_training,
            dnnl::algorithm::convolution_direct,
            g.Activation(g.x), g.Kernel(tag::any),
            BiasDesc(g),       g.Activation(g.y),
            g.Strides(),       g.PadLow(),
            g.PadHigh(),       Attributes()};
  return {Engine(),          dnnl::prop_kind::forward_training,
          dnnl::algorithm::convolution_direct,
          g.Activation(g.x), g.Kernel(tag::any),
          g.Activation(g.y), g.Strides(),
          g.PadLow(),        g.PadHigh(),
          Attributes()};
}

// What one convolution needs at run time: the primitive and the kernel's
// layout that it wants.
struct Entry {
  dnnl::primitive primitive;
  dnnl::memory::desc kernel_desc;
  dnnl::memory::desc scratchpad_desc;
};

std::mutex cache_mutex;
std::unordered_map<std::string, std::shared_ptr<const Entry>> cache;

template <typename Build>
std::shared_ptr<const Entry> Cached(const std::string& key, Build build) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto entry = std::make_shared<const Entry>(build());
  cache.emplace(key, entry);
  return entry;
}

// This execution's own scratchpad.
dnnl::memory Scratchpad(const Entry& entry) {
  return dnnl::memory(entry.scratchpad_desc, Engine());
}

// Reorders a kernel (at most 1.3 MB here) on the calling thread. A team of
// OpenMP threads for it waited on the other core, which XLA keeps busy with an
// independent op meanwhile: a 6 KB kernel took 0.46 ms (0.01 ms in PyTorch).
void ReorderKernel(dnnl::memory& from, dnnl::memory& to, dnnl::stream& stream) {
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  dnnl::reorder(from, to).execute(stream, from, to);
  omp_set_num_threads(threads);
}

// The kernel in `want`'s layout: the HWIO buffer itself, or a reordered copy.
dnnl::memory KernelIn(const dnnl::memory::desc& want, const Geometry& g,
                      float* hwio, dnnl::stream& stream) {
  dnnl::memory user(g.Kernel(tag::hwio), Engine(), hwio);
  if (want == user.get_desc()) return user;
  dnnl::memory packed(want, Engine());
  ReorderKernel(user, packed, stream);
  return packed;
}

template <typename T>
std::array<int64_t, 4> Shape4(const T& buffer) {
  auto d = buffer.dimensions();
  return {d[0], d[1], d[2], d[3]};
}

template <typename Body>
ffi::Error Guarded(Body body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution failed: ") +
                                e.what());
  }
}

ffi::Error Forward(const Geometry& g, float* x, float* w, float* b, float* y) {
  return Guarded([&] {
    auto entry = Cached(g.Key(b ? 'F' : 'f'), [&] {
      auto pd = ForwardDesc(g, b != nullptr);
      return Entry{dnnl::convolution_forward(pd), pd.weights_desc(),
                   pd.scratchpad_desc()};
    });
    dnnl::stream stream(Engine());
    dnnl::memory src(g.Activation(g.x), Engine(), x);
    dnnl::memory dst(g.Activation(g.y), Engine(), y);
    dnnl::memory kernel = KernelIn(entry->kernel_desc, g, w, stream);
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, kernel}, {DNNL_ARG_DST, dst}};
    if (b) args.emplace(DNNL_ARG_BIAS, dnnl::memory(BiasDesc(g), Engine(), b));
    args.emplace(DNNL_ARG_SCRATCHPAD, Scratchpad(*entry));
    entry->primitive.execute(stream, args);
    stream.wait();
  });
}

ffi::Error BackwardDataImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t stride_h,
                            int64_t stride_w, int64_t pad_top,
                            int64_t pad_bottom, int64_t pad_left,
                            int64_t pad_right) {
  Geometry g{Shape4(*dx),  Shape4(w),  Shape4(dy), stride_h, stride_w,
             pad_top,      pad_bottom, pad_left,   pad_right};
  return Guarded([&] {
    auto entry = Cached(g.Key('d'), [&] {
      dnnl::convolution_backward_data::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, g.Activation(g.x),
          g.Kernel(tag::any), g.Activation(g.y), g.Strides(), g.PadLow(),
          g.PadHigh(), ForwardDesc(g), Attributes());
      return Entry{dnnl::convolution_backward_data(pd), pd.weights_desc(),
                   pd.scratchpad_desc()};
    });
    dnnl::stream stream(Engine());
    dnnl::memory diff_dst(g.Activation(g.y), Engine(), dy.typed_data());
    dnnl::memory diff_src(g.Activation(g.x), Engine(), dx->typed_data());
    dnnl::memory kernel = KernelIn(entry->kernel_desc, g, w.typed_data(), stream);
    entry->primitive.execute(stream, {{DNNL_ARG_SCRATCHPAD, Scratchpad(*entry)},
                                      {DNNL_ARG_DIFF_DST, diff_dst},
                                      {DNNL_ARG_WEIGHTS, kernel},
                                      {DNNL_ARG_DIFF_SRC, diff_src}});
    stream.wait();
  });
}

ffi::Error BackwardWeights(const Geometry& g, float* x, float* dy, float* dw,
                           float* db) {
  return Guarded([&] {
    auto entry = Cached(g.Key(db ? 'W' : 'w'), [&] {
      auto fwd = ForwardDesc(g, db != nullptr);
      auto pd = db ? dnnl::convolution_backward_weights::primitive_desc(
                         Engine(), dnnl::algorithm::convolution_direct,
                         g.Activation(g.x), g.Kernel(tag::any), BiasDesc(g),
                         g.Activation(g.y), g.Strides(), g.PadLow(),
                         g.PadHigh(), fwd, Attributes())
                   : dnnl::convolution_backward_weights::primitive_desc(
                         Engine(), dnnl::algorithm::convolution_direct,
                         g.Activation(g.x), g.Kernel(tag::any),
                         g.Activation(g.y), g.Strides(), g.PadLow(),
                         g.PadHigh(), fwd, Attributes());
      return Entry{dnnl::convolution_backward_weights(pd),
                   pd.diff_weights_desc(), pd.scratchpad_desc()};
    });
    dnnl::stream stream(Engine());
    dnnl::memory src(g.Activation(g.x), Engine(), x);
    dnnl::memory diff_dst(g.Activation(g.y), Engine(), dy);
    dnnl::memory user(g.Kernel(tag::hwio), Engine(), dw);
    bool direct = entry->kernel_desc == user.get_desc();
    dnnl::memory diff_kernel =
        direct ? user : dnnl::memory(entry->kernel_desc, Engine());
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, src},
        {DNNL_ARG_DIFF_DST, diff_dst},
        {DNNL_ARG_DIFF_WEIGHTS, diff_kernel}};
    if (db)
      args.emplace(DNNL_ARG_DIFF_BIAS, dnnl::memory(BiasDesc(g), Engine(), db));
    args.emplace(DNNL_ARG_SCRATCHPAD, Scratchpad(*entry));
    entry->primitive.execute(stream, args);
    if (!direct) ReorderKernel(diff_kernel, user, stream);
    stream.wait();
  });
}

ffi::Error BackwardWeightsImpl(ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h,
                               int64_t stride_w, int64_t pad_top,
                               int64_t pad_bottom, int64_t pad_left,
                               int64_t pad_right) {
  Geometry g{Shape4(x),    Shape4(*dw), Shape4(dy), stride_h, stride_w,
             pad_top,      pad_bottom,  pad_left,   pad_right};
  return BackwardWeights(g, x.typed_data(), dy.typed_data(), dw->typed_data(),
                         nullptr);
}

ffi::Error BackwardWeightsBiasImpl(
    ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
    ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> db,
    int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
    int64_t pad_left, int64_t pad_right) {
  Geometry g{Shape4(x),    Shape4(*dw), Shape4(dy), stride_h, stride_w,
             pad_top,      pad_bottom,  pad_left,   pad_right};
  return BackwardWeights(g, x.typed_data(), dy.typed_data(), dw->typed_data(),
                         db->typed_data());
}

// Eight float32 channels at a time, as GCC vector extensions: compiled for
// AVX-512, AVX2 and plain x86-64 (target_clones), the loader picks one.
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline F8 Load(const float* p) {
  F8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, F8 v) { std::memcpy(p, &v, sizeof v); }

// One window's ReLU + max and its code, for eight channels. Scalars go
// through the same code as one-lane vectors would not: see the tail loop.
struct PoolOut {
  F8 y;
  I8 code;
};

inline PoolOut PoolWindow(F8 v0, F8 v1, F8 v2, F8 v3) {
  const F8 zero = {};
  const F8 m01 = v0 > v1 ? v0 : v1, m23 = v2 > v3 ? v2 : v3;
  const F8 top = m01 > m23 ? m01 : m23;
  const F8 m = top > zero ? top : zero;
  // NaN propagates, as XLA's maximum does (the loss check then stops).
  const I8 nan = (v0 != v0) | (v1 != v1) | (v2 != v2) | (v3 != v3);
  const I8 bits = ((v0 == m) & 1) | ((v1 == m) & 2) | ((v2 == m) & 4) | ((v3 == m) & 8);
  return {nan ? v0 + v1 + v2 + v3 : m, top > zero ? bits : I8{}};
}

// ReLU + 2x2 max pool of two rows of x (each w by c, p0 the upper) into one
// row of out (w/2 by c). Bit k (k = 2 * row + column in the window) of a
// window's code is set where x equals the window's maximum and is positive.
__attribute__((always_inline)) inline void ReluMaxPoolRow(const float* p0,
                                                          const float* p1,
                                                          int64_t w, int64_t c,
                                                          float* out,
                                                          int8_t* bits) {
  for (int64_t j = 0; j < w / 2; ++j) {
    const float* q0 = p0 + 2 * j * c;
    const float* q1 = p1 + 2 * j * c;
    float* q = out + j * c;
    int8_t* k = bits + j * c;
    int64_t ch = 0;
    for (; ch + kLanes <= c; ch += kLanes) {
      PoolOut r = PoolWindow(Load(q0 + ch), Load(q0 + c + ch), Load(q1 + ch),
                             Load(q1 + c + ch));
      Store(q + ch, r.y);
      for (int64_t l = 0; l < kLanes; ++l) k[ch + l] = static_cast<int8_t>(r.code[l]);
    }
    for (; ch < c; ++ch) {  // The last c % 8 channels, one lane used.
      PoolOut r = PoolWindow(F8{q0[ch]}, F8{q0[c + ch]}, F8{q1[ch]}, F8{q1[c + ch]});
      q[ch] = r.y[0];
      k[ch] = static_cast<int8_t>(r.code[0]);
    }
  }
}

// ReLU + 2x2 max pool of x (n, h, w, c) into out (n, h/2, w/2, c) and codes.
__attribute__((target_clones("avx512f", "avx2", "default"))) void ReluMaxPool(
    const float* in, int64_t n, int64_t h, int64_t w, int64_t c, float* out,
    int8_t* bits) {
  const int64_t h2 = h / 2, w2 = w / 2;
#pragma omp parallel for
  for (int64_t row = 0; row < n * h2; ++row) {
    const int64_t b = row / h2, i = row % h2;
    const float* p0 = in + (b * h + 2 * i) * w * c;
    ReluMaxPoolRow(p0, p0 + w * c, w, c, out + row * w2 * c, bits + row * w2 * c);
  }
}

// Convolution + bias with stride 1 for few input channels (C <= 4: the first
// layer's RGB), written directly: oneDNN's kernels for 3 input channels keep
// most of the vector unit idle (the first block took a third of the inference
// pass). Output channels go in vectors of 8. Away from the edges, eight output
// pixels at a time with the kernel's width and the channels known at compile
// time, so each kernel vector loaded serves eight FMAs held in registers; at
// the edges, one pixel at a time, skipping the padding. Each sum runs over
// (dy, dx, c) in order, as a plain convolution's does.
// Rows row0, row0 + 1, ... of the image are at x.
template <int C, int KW>
__attribute__((always_inline)) inline void DirectConvBiasRow(
    const float* x, int64_t row0, int64_t h, int64_t w, const float* k, int64_t kh,
    int64_t kw_runtime, int64_t oc, const float* bias, int64_t i, int64_t ow,
    int64_t pad_top, int64_t pad_left, float* out) {
  constexpr int64_t kPixels = 8;
  const int64_t kw = KW > 0 ? KW : kw_runtime;
  for (int64_t o = 0; o < oc; o += kLanes) {
    const F8 b = bias ? Load(bias + o) : F8{};
    int64_t j = 0;
    while (j < ow) {
      const int64_t left = j - pad_left;
      if (KW > 0 && left >= 0 && left + kPixels - 1 + KW - 1 < w && j + kPixels <= ow) {
        F8 acc[kPixels];
        for (int64_t p = 0; p < kPixels; ++p) acc[p] = b;
        for (int64_t dy = 0; dy < kh; ++dy) {
          const int64_t iy = i - pad_top + dy;
          if (iy < 0 || iy >= h) continue;
          const float* row = x + ((iy - row0) * w + left) * C;
          const float* kv = k + dy * KW * C * oc + o;
          for (int dx = 0; dx < KW; ++dx)
            for (int c = 0; c < C; ++c) {
              const F8 kvec = Load(kv + (dx * C + c) * oc);
              for (int64_t p = 0; p < kPixels; ++p)
                acc[p] += row[(p + dx) * C + c] * kvec;
            }
        }
        for (int64_t p = 0; p < kPixels; ++p) Store(out + (j + p) * oc + o, acc[p]);
        j += kPixels;
        continue;
      }
      F8 acc = b;
      for (int64_t dy = 0; dy < kh; ++dy) {
        const int64_t iy = i - pad_top + dy;
        if (iy < 0 || iy >= h) continue;
        for (int64_t dx = 0; dx < kw; ++dx) {
          const int64_t ix = left + dx;
          if (ix < 0 || ix >= w) continue;
          const float* kv = k + (dy * kw + dx) * C * oc + o;
          for (int c = 0; c < C; ++c)
            acc += x[((iy - row0) * w + ix) * C + c] * Load(kv + c * oc);
        }
      }
      Store(out + j * oc + o, acc);
      ++j;
    }
  }
}

// DirectConvBiasRow for the input's channels (1 to 4); the notebook's 3x3
// kernels get the fast interior path.
__attribute__((always_inline)) inline void DirectConvRow(
    const float* x, int64_t row0, int64_t h, int64_t w, int64_t c, const float* k,
    int64_t kh, int64_t kw, int64_t oc, const float* bias, int64_t i, int64_t ow,
    int64_t pad_top, int64_t pad_left, float* out) {
#define SIMPSONS_ROW(C, KW)                                                     \
  DirectConvBiasRow<C, KW>(x, row0, h, w, k, kh, kw, oc, bias, i, ow, pad_top, \
                           pad_left, out)
  if (kw == 3) {
    if (c == 1) SIMPSONS_ROW(1, 3);
    else if (c == 2) SIMPSONS_ROW(2, 3);
    else if (c == 3) SIMPSONS_ROW(3, 3);
    else SIMPSONS_ROW(4, 3);
  } else {
    if (c == 1) SIMPSONS_ROW(1, 0);
    else if (c == 2) SIMPSONS_ROW(2, 0);
    else if (c == 3) SIMPSONS_ROW(3, 0);
    else SIMPSONS_ROW(4, 0);
  }
#undef SIMPSONS_ROW
}

bool DirectConvHandles(const std::array<int64_t, 4>& xs,
                       const std::array<int64_t, 4>& ws, int64_t stride_h,
                       int64_t stride_w) {
  return xs[3] >= 1 && xs[3] <= 4 && ws[3] % kLanes == 0 && stride_h == 1 &&
         stride_w == 1;
}

// One pooled output row r (of n * oh/2) of the whole block for
// DirectConvHandles' cases: conv + bias of x (n, h, w, c) with the HWIO kernel
// k, two output rows into `rows` (which stays in L1), then ReLU + pool into y
// (n, oh/2, ow/2, oc) and its codes. The conv rows the pool drops (an odd
// last row) are never computed. uint8 images are divided by `divisor` (as
// XLA's convert and divide would) into `converted`, the rows this output row
// reads, so the float copy of the batch is never written to memory.
template <typename T>
__attribute__((always_inline)) inline void DirectBlockRow(
    int64_t r, const T* x, float divisor, int64_t h, int64_t w, int64_t c,
    const float* k, int64_t kh, int64_t kw, int64_t oc, const float* bias,
    int64_t oh, int64_t ow, int64_t pad_top, int64_t pad_left, float* y,
    int8_t* bits, float* rows, float* converted) {
  const int64_t h2 = oh / 2, row_out = (ow / 2) * oc;
  const T* image = x + (r / h2) * h * w * c;
  const float* in = nullptr;
  int64_t row0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    in = image;
  } else {
    row0 = std::max<int64_t>(0, 2 * (r % h2) - pad_top);
    const int64_t end = std::min<int64_t>(h, 2 * (r % h2) + 1 - pad_top + kh);
    for (int64_t e = 0; e < (end - row0) * w * c; ++e)
      converted[e] = static_cast<float>(image[row0 * w * c + e]) / divisor;
    in = converted;
  }
  for (int64_t half = 0; half < 2; ++half) {
    const int64_t i = 2 * (r % h2) + half;
    float* out = rows + half * ow * oc;
    DirectConvRow(in, row0, h, w, c, k, kh, kw, oc, bias, i, ow, pad_top, pad_left,
                  out);
  }
  ReluMaxPoolRow(rows, rows + ow * oc, ow, oc, y + r * row_out, bits + r * row_out);
}

// The block over the batch, for float and for uint8 images, each compiled for
// AVX-512, AVX2 and plain x86-64. (The OpenMP region must be in the cloned
// function itself for its body to be compiled for each.)
#define SIMPSONS_DIRECT(NAME, T)                                                 \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) \
  void NAME(const T* x, float divisor, int64_t n, int64_t h, int64_t w,          \
            int64_t c, const float* k, int64_t kh, int64_t kw, int64_t oc,       \
            const float* bias, int64_t oh, int64_t ow, int64_t pad_top,          \
            int64_t pad_left, float* y, int8_t* bits) {                          \
    _Pragma("omp parallel") {                                                    \
      std::vector<float> rows(2 * ow * oc);                                      \
      std::vector<float> converted(std::is_same_v<T, float> ? 0 : (kh + 1) * w * c); \
      _Pragma("omp for") for (int64_t r = 0; r < n * (oh / 2); ++r)              \
        DirectBlockRow<T>(r, x, divisor, h, w, c, k, kh, kw, oc, bias, oh, ow,  \
                          pad_top, pad_left, y, bits, rows.data(),              \
                          converted.data());                                    \
    }                                                                            \
  }
SIMPSONS_DIRECT(DirectConvBiasReluPool, float)
SIMPSONS_DIRECT(DirectConvBiasReluPoolU8, uint8_t)
#undef SIMPSONS_DIRECT

// A plain convolution (no bias, no pool) of DirectConvHandles' cases: the
// ResNet's stem. Compiled for AVX-512, AVX2 and plain x86-64.
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void
DirectConv(const float* x, int64_t n, int64_t h, int64_t w, int64_t c, const float* k,
           int64_t kh, int64_t kw, int64_t oc, int64_t oh, int64_t ow,
           int64_t pad_top, int64_t pad_left, float* y) {
#pragma omp parallel for
  for (int64_t r = 0; r < n * oh; ++r) {
    const float* image = x + (r / oh) * h * w * c;
    float* out = y + r * ow * oc;
    DirectConvRow(image, 0, h, w, c, k, kh, kw, oc, nullptr, r % oh, ow, pad_top,
                  pad_left, out);
  }
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride_h,
                       int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                       int64_t pad_left, int64_t pad_right) {
  Geometry g{Shape4(x),    Shape4(w),  Shape4(*y), stride_h, stride_w,
             pad_top,      pad_bottom, pad_left,   pad_right};
  if (DirectConvHandles(g.x, g.w, stride_h, stride_w)) {
    DirectConv(x.typed_data(), g.x[0], g.x[1], g.x[2], g.x[3], w.typed_data(),
               g.w[0], g.w[1], g.w[3], g.y[1], g.y[2], pad_top, pad_left,
               y->typed_data());
    return ffi::Error::Success();
  }
  return Forward(g, x.typed_data(), w.typed_data(), nullptr, y->typed_data());
}

// Convolution + bias, ReLU and pool, a few images at a time: each chunk's
// convolution output stays in cache between oneDNN writing it and the pool
// reading it, instead of a round trip through memory for the whole batch.
constexpr int64_t kChunkFloats = 1 << 20;  // 4 MB of convolution output.

ffi::Error ConvBiasReluPoolForwardImpl(
    ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
    ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> code,
    int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
    int64_t pad_left, int64_t pad_right) {
  auto xs = Shape4(x), ws = Shape4(w);
  const int64_t n = xs[0];
  const int64_t oh = (xs[1] + pad_top + pad_bottom - ws[0]) / stride_h + 1;
  const int64_t ow = (xs[2] + pad_left + pad_right - ws[1]) / stride_w + 1;
  const int64_t oc = ws[3], per_image = oh * ow * oc;
  if (DirectConvHandles(xs, ws, stride_h, stride_w)) {
    DirectConvBiasReluPool(x.typed_data(), 1.0f, n, xs[1], xs[2], xs[3], w.typed_data(),
                           ws[0], ws[1], oc, b.typed_data(), oh, ow, pad_top,
                           pad_left, y->typed_data(), code->typed_data());
    return ffi::Error::Success();
  }
  const int64_t pooled = (oh / 2) * (ow / 2) * oc;
  const int64_t rows = std::max<int64_t>(1, std::min(n, kChunkFloats / per_image));
  std::vector<float> scratch(rows * per_image);
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t m = std::min(rows, n - start);
    Geometry g{{m, xs[1], xs[2], xs[3]}, ws,       {m, oh, ow, oc}, stride_h,
               stride_w,                 pad_top, pad_bottom,      pad_left,
               pad_right};
    ffi::Error error =
        Forward(g, x.typed_data() + start * xs[1] * xs[2] * xs[3],
                w.typed_data(), b.typed_data(), scratch.data());
    if (error.failure()) return error;
    ReluMaxPool(scratch.data(), m, oh, ow, oc, y->typed_data() + start * pooled,
                code->typed_data() + start * pooled);
  }
  return ffi::Error::Success();
}

// The block on uint8 images divided by `divisor` first; DirectConvHandles'
// cases only (the caller converts the others itself).
ffi::Error ConvBiasReluPoolForwardU8Impl(
    ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> b,
    ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> code,
    int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
    int64_t pad_left, int64_t pad_right, float divisor) {
  auto xs = Shape4(x), ws = Shape4(w);
  if (!DirectConvHandles(xs, ws, stride_h, stride_w))
    return ffi::Error::InvalidArgument(
        "uint8 blocks need at most 4 input channels, output channels in 8s and "
        "stride 1");
  const int64_t oh = (xs[1] + pad_top + pad_bottom - ws[0]) + 1;
  const int64_t ow = (xs[2] + pad_left + pad_right - ws[1]) + 1;
  DirectConvBiasReluPoolU8(x.typed_data(), divisor, xs[0], xs[1], xs[2], xs[3],
                           w.typed_data(), ws[0], ws[1], ws[3], b.typed_data(), oh,
                           ow, pad_top, pad_left, y->typed_data(),
                           code->typed_data());
  return ffi::Error::Success();
}

// The four positions' gradients of one window, for eight channels.
inline void PoolWindowGradient(I8 code, F8 g, F8& d0, F8& d1, F8& d2, F8& d3) {
  const I8 b0 = code & 1, b1 = code >> 1 & 1, b2 = code >> 2 & 1, b3 = code >> 3 & 1;
  const I8 ties = b0 + b1 + b2 + b3;
  const F8 zero = {};
  F8 share = g / __builtin_convertvector(ties > 0 ? ties : ties + 1, F8);
  share = ties > 0 ? share : zero;
  d0 = b0 ? share : zero;
  d1 = b1 ? share : zero;
  d2 = b2 ? share : zero;
  d3 = b3 ? share : zero;
}

__attribute__((target_clones("avx512f", "avx2", "default"))) void
ReluMaxPoolGradient(const int8_t* bits, const float* g, int64_t n, int64_t h,
                    int64_t w, int64_t c, float* out) {
  const int64_t h2 = h / 2, w2 = w / 2;
#pragma omp parallel for
  for (int64_t row = 0; row < n * h2; ++row) {
    const int64_t b = row / h2, i = row % h2;
    float* q0 = out + (b * h + 2 * i) * w * c;
    float* q1 = q0 + w * c;
    for (int64_t j = 0; j < w2; ++j) {
      const int8_t* k = bits + (row * w2 + j) * c;
      const float* gk = g + (row * w2 + j) * c;
      float* a0 = q0 + 2 * j * c;
      float* a1 = q1 + 2 * j * c;
      F8 d0, d1, d2, d3;
      int64_t ch = 0;
      for (; ch + kLanes <= c; ch += kLanes) {
        I8 code;
        for (int64_t l = 0; l < kLanes; ++l) code[l] = static_cast<uint8_t>(k[ch + l]);
        PoolWindowGradient(code, Load(gk + ch), d0, d1, d2, d3);
        Store(a0 + ch, d0);
        Store(a0 + c + ch, d1);
        Store(a1 + ch, d2);
        Store(a1 + c + ch, d3);
      }
      for (; ch < c; ++ch) {  // The last c % 8 channels, one lane used.
        PoolWindowGradient(I8{static_cast<uint8_t>(k[ch])}, F8{gk[ch]}, d0, d1, d2, d3);
        a0[ch] = d0[0];
        a0[c + ch] = d1[0];
        a1[ch] = d2[0];
        a1[c + ch] = d3[0];
      }
    }
    // An odd last column is outside every window.
    if (w % 2) {
      std::fill(q0 + (w - 1) * c, q0 + w * c, 0.0f);
      std::fill(q1 + (w - 1) * c, q1 + w * c, 0.0f);
    }
  }
  if (h % 2)  // An odd last row, likewise.
    for (int64_t b = 0; b < n; ++b)
      std::fill(out + ((b * h + h - 1) * w) * c, out + (b * h + h) * w * c, 0.0f);
}

// The kernel and bias gradients of ConvBiasReluPoolForwardU8's block with a
// 3x3 kernel, from the pool's codes and the pooled gradient g, without the
// convolution's gradient ever reaching memory: each row pair's gradient is
// formed in L1 (as ReluMaxPoolGradient would write it) and multiplied into the
// kernel gradient at once, held in registers. Each thread sums its row pairs
// (a static partition: the same sums on every run) into double-precision
// totals, added in thread order at the end.
template <int C>
__attribute__((always_inline)) inline void DirectBackwardRowPair(
    int64_t r, const uint8_t* x, float divisor, int64_t h, int64_t w,
    const int8_t* bits, const float* g, int64_t oh, int64_t ow, int64_t oc,
    int64_t pad_top, int64_t pad_left, float* dy, float* converted, double* dk,
    double* db) {
  constexpr int K = 3;
  const int64_t h2 = oh / 2, w2 = ow / 2;
  const uint8_t* image = x + (r / h2) * h * w * C;
  const int64_t row0 = std::max<int64_t>(0, 2 * (r % h2) - pad_top);
  const int64_t end = std::min<int64_t>(h, 2 * (r % h2) + 1 - pad_top + K);
  for (int64_t e = 0; e < (end - row0) * w * C; ++e)
    converted[e] = static_cast<float>(image[row0 * w * C + e]) / divisor;
  // The two conv rows' gradients (an odd last column gets none).
  std::fill(dy, dy + 2 * ow * oc, 0.0f);
  for (int64_t j = 0; j < w2; ++j)
    for (int64_t ch = 0; ch < oc; ch += kLanes) {
      I8 code;
      for (int64_t l = 0; l < kLanes; ++l)
        code[l] = static_cast<uint8_t>(bits[(r * w2 + j) * oc + ch + l]);
      F8 d0, d1, d2, d3;
      PoolWindowGradient(code, Load(g + (r * w2 + j) * oc + ch), d0, d1, d2, d3);
      Store(dy + (2 * j) * oc + ch, d0);
      Store(dy + (2 * j + 1) * oc + ch, d1);
      Store(dy + (ow + 2 * j) * oc + ch, d2);
      Store(dy + (ow + 2 * j + 1) * oc + ch, d3);
    }
  for (int64_t o = 0; o < oc; o += kLanes) {
    F8 acc[K * K * C] = {};
    F8 bias = {};
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t i = 2 * (r % h2) + half;
      const float* drow = dy + half * ow * oc + o;
      for (int64_t ox = 0; ox < ow; ++ox) {
        const F8 d = Load(drow + ox * oc);
        bias += d;
        for (int dyk = 0; dyk < K; ++dyk) {
          const int64_t iy = i - pad_top + dyk;
          if (iy < 0 || iy >= h) continue;
          const float* row = converted + (iy - row0) * w * C;
          for (int dxk = 0; dxk < K; ++dxk) {
            const int64_t ix = ox - pad_left + dxk;
            if (ix < 0 || ix >= w) continue;
            for (int c = 0; c < C; ++c) acc[(dyk * K + dxk) * C + c] += row[ix * C + c] * d;
          }
        }
      }
    }
    for (int t = 0; t < K * K * C; ++t)
      for (int64_t l = 0; l < kLanes; ++l) dk[t * oc + o + l] += acc[t][l];
    for (int64_t l = 0; l < kLanes; ++l) db[o + l] += bias[l];
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"))) void
DirectBlockBackward(const uint8_t* x, float divisor, int64_t n, int64_t h, int64_t w,
                    int64_t c, const int8_t* bits, const float* g, int64_t oh,
                    int64_t ow, int64_t oc, int64_t pad_top, int64_t pad_left,
                    float* dk, float* db) {
  const int64_t weights = 9 * c * oc;
  std::vector<double> totals;
#pragma omp parallel
  {
#pragma omp single
    totals.assign(omp_get_num_threads() * (weights + oc), 0.0);
    double* mine = totals.data() + omp_get_thread_num() * (weights + oc);
    std::vector<float> dy(2 * ow * oc), converted(4 * w * c);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n * (oh / 2); ++r) {
#define SIMPSONS_PAIR(C)                                                      \
  DirectBackwardRowPair<C>(r, x, divisor, h, w, bits, g, oh, ow, oc, pad_top, \
                           pad_left, dy.data(), converted.data(), mine,       \
                           mine + weights)
      if (c == 1) SIMPSONS_PAIR(1);
      else if (c == 2) SIMPSONS_PAIR(2);
      else if (c == 3) SIMPSONS_PAIR(3);
      else SIMPSONS_PAIR(4);
#undef SIMPSONS_PAIR
    }
  }
  const int64_t threads = totals.size() / (weights + oc);
  for (int64_t e = 0; e < weights + oc; ++e) {
    double sum = 0.0;
    for (int64_t t = 0; t < threads; ++t) sum += totals[t * (weights + oc) + e];
    (e < weights ? dk[e] : db[e - weights]) = static_cast<float>(sum);
  }
}

// The gradients of ConvBiasReluPoolForwardU8 (3x3 kernels): dk (HWIO), db.
ffi::Error ConvBiasReluPoolBackwardU8Impl(
    ffi::Buffer<ffi::U8> x, ffi::Buffer<ffi::S8> code, ffi::Buffer<ffi::F32> g,
    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> db,
    int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
    int64_t pad_left, int64_t pad_right, float divisor) {
  auto xs = Shape4(x), ks = Shape4(*dk);
  if (!DirectConvHandles(xs, ks, stride_h, stride_w) || ks[0] != 3 || ks[1] != 3)
    return ffi::Error::InvalidArgument(
        "the uint8 block's backward takes 3x3 kernels, at most 4 input "
        "channels, output channels in 8s and stride 1");
  const int64_t oh = xs[1] + pad_top + pad_bottom - 2;
  const int64_t ow = xs[2] + pad_left + pad_right - 2;
  DirectBlockBackward(x.typed_data(), divisor, xs[0], xs[1], xs[2], xs[3],
                      code.typed_data(), g.typed_data(), oh, ow, ks[3], pad_top,
                      pad_left, dk->typed_data(), db->typed_data());
  return ffi::Error::Success();
}

// ReLU + 2x2 max pool alone (the ResNet's stem, after its BatchNorm).
ffi::Error ReluMaxPoolForwardImpl(ffi::Buffer<ffi::F32> x,
                                  ffi::ResultBuffer<ffi::F32> y,
                                  ffi::ResultBuffer<ffi::S8> code) {
  auto s = Shape4(x);
  ReluMaxPool(x.typed_data(), s[0], s[1], s[2], s[3], y->typed_data(),
              code->typed_data());
  return ffi::Error::Success();
}

ffi::Error ReluMaxPoolBackwardImpl(ffi::Buffer<ffi::S8> code,
                                   ffi::Buffer<ffi::F32> dy,
                                   ffi::ResultBuffer<ffi::F32> dx) {
  auto s = Shape4(*dx);
  ReluMaxPoolGradient(code.typed_data(), dy.typed_data(), s[0], s[1], s[2], s[3],
                      dx->typed_data());
  return ffi::Error::Success();
}

// The convolutions take two float32 buffers, return one, and read the
// geometry.
template <typename Binding>
auto WithGeometry(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("stride_h")
      .template Attr<int64_t>("stride_w")
      .template Attr<int64_t>("pad_top")
      .template Attr<int64_t>("pad_bottom")
      .template Attr<int64_t>("pad_left")
      .template Attr<int64_t>("pad_right");
}

auto TwoInOneOut() {
  return WithGeometry(ffi::Ffi::Bind()
                          .Arg<ffi::Buffer<ffi::F32>>()
                          .Arg<ffi::Buffer<ffi::F32>>()
                          .Ret<ffi::Buffer<ffi::F32>>());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, ForwardImpl, TwoInOneOut());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardDataImpl,
                              TwoInOneOut());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeightsImpl,
                              TwoInOneOut());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBiasReluPoolForward,
                              ConvBiasReluPoolForwardImpl,
                              WithGeometry(ffi::Ffi::Bind()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::S8>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBiasReluPoolForwardU8,
                              ConvBiasReluPoolForwardU8Impl,
                              WithGeometry(ffi::Ffi::Bind()
                                               .Arg<ffi::Buffer<ffi::U8>>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::S8>>())
                                  .Attr<float>("divisor"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBiasReluPoolBackwardU8,
                              ConvBiasReluPoolBackwardU8Impl,
                              WithGeometry(ffi::Ffi::Bind()
                                               .Arg<ffi::Buffer<ffi::U8>>()
                                               .Arg<ffi::Buffer<ffi::S8>>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::F32>>())
                                  .Attr<float>("divisor"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeightsBias,
                              BackwardWeightsBiasImpl,
                              WithGeometry(ffi::Ffi::Bind()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Arg<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::F32>>()
                                               .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(ReluMaxPoolForward, ReluMaxPoolForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ReluMaxPoolBackward, ReluMaxPoolBackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
