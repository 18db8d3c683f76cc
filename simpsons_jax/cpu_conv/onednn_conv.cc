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
//   ReluMaxPoolBackwardBf16(code, dy) -> d(conv)  (the same, rounded to bfloat16)

#include <algorithm>
#include <array>
#include <atomic>
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
  // The operands' type (x, w, dy): f32, or bf16 with float32 results and
  // float32 accumulation.
  dt in = dt::f32;

  std::string Key(char kind) const {
    std::string key(1, kind);
    key += in == dt::bf16 ? "b" : "f";
    for (const auto* a : {&x, &w, &y})
      for (int64_t d : *a) key += "," + std::to_string(d);
    for (int64_t v : {stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right})
      key += "," + std::to_string(v);
    return key;
  }
  // An activation (NHWC) of type `type`: the operands' (`in`) by default.
  dnnl::memory::desc Activation(const std::array<int64_t, 4>& s,
                                dt type = dt::undef) const {
    return {{s[0], s[3], s[1], s[2]}, type == dt::undef ? in : type, tag::nhwc};
  }
  // Results (y, dx) are float32 whatever the operands' type.
  dnnl::memory::desc Result(const std::array<int64_t, 4>& s) const {
    return Activation(s, dt::f32);
  }
  dnnl::memory::desc Kernel(tag t, dt type = dt::undef) const {
    return {{w[3], w[2], w[0], w[1]}, type == dt::undef ? in : type, t};
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
            BiasDesc(g),       g.Result(g.y),
            g.Strides(),       g.PadLow(),
            g.PadHigh(),       Attributes()};
  return {Engine(),          dnnl::prop_kind::forward_training,
          dnnl::algorithm::convolution_direct,
          g.Activation(g.x), g.Kernel(tag::any),
          g.Result(g.y),     g.Strides(),
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
                      void* hwio, dnnl::stream& stream) {
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

ffi::Error Forward(const Geometry& g, void* x, void* w, float* b, float* y) {
  return Guarded([&] {
    auto entry = Cached(g.Key(b ? 'F' : 'f'), [&] {
      auto pd = ForwardDesc(g, b != nullptr);
      return Entry{dnnl::convolution_forward(pd), pd.weights_desc(),
                   pd.scratchpad_desc()};
    });
    dnnl::stream stream(Engine());
    dnnl::memory src(g.Activation(g.x), Engine(), x);
    dnnl::memory dst(g.Result(g.y), Engine(), y);
    dnnl::memory kernel = KernelIn(entry->kernel_desc, g, w, stream);
    std::unordered_map<int, dnnl::memory> args = {
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, kernel}, {DNNL_ARG_DST, dst}};
    if (b) args.emplace(DNNL_ARG_BIAS, dnnl::memory(BiasDesc(g), Engine(), b));
    args.emplace(DNNL_ARG_SCRATCHPAD, Scratchpad(*entry));
    entry->primitive.execute(stream, args);
    stream.wait();
  });
}

// oneDNN's type for the operands of XLA type T (float32 or bfloat16).
template <ffi::DataType T>
constexpr dt OperandType() {
  static_assert(T == ffi::F32 || T == ffi::BF16);
  return T == ffi::BF16 ? dt::bf16 : dt::f32;
}

template <ffi::DataType T>
ffi::Error BackwardDataImpl(ffi::Buffer<T> dy, ffi::Buffer<T> w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t stride_h,
                            int64_t stride_w, int64_t pad_top,
                            int64_t pad_bottom, int64_t pad_left,
                            int64_t pad_right) {
  Geometry g{Shape4(*dx), Shape4(w),  Shape4(dy), stride_h, stride_w, pad_top,
             pad_bottom,  pad_left,   pad_right, OperandType<T>()};
  return Guarded([&] {
    auto entry = Cached(g.Key('d'), [&] {
      dnnl::convolution_backward_data::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, g.Result(g.x),
          g.Kernel(tag::any), g.Activation(g.y), g.Strides(), g.PadLow(),
          g.PadHigh(), ForwardDesc(g), Attributes());
      return Entry{dnnl::convolution_backward_data(pd), pd.weights_desc(),
                   pd.scratchpad_desc()};
    });
    dnnl::stream stream(Engine());
    dnnl::memory diff_dst(g.Activation(g.y), Engine(), dy.untyped_data());
    dnnl::memory diff_src(g.Result(g.x), Engine(), dx->typed_data());
    dnnl::memory kernel =
        KernelIn(entry->kernel_desc, g, w.untyped_data(), stream);
    entry->primitive.execute(stream, {{DNNL_ARG_SCRATCHPAD, Scratchpad(*entry)},
                                      {DNNL_ARG_DIFF_DST, diff_dst},
                                      {DNNL_ARG_WEIGHTS, kernel},
                                      {DNNL_ARG_DIFF_SRC, diff_src}});
    stream.wait();
  });
}

// oneDNN 3.2's 1x1 backward-weights convolutions, jit_1x1:avx2 and
// jit_1x1:avx512_core (jit_avx2_1x1_convolution_bwd_weights_t and
// jit_avx512_common_1x1_convolution_bwd_weights_t), copy the source of a
// strided 1x1 convolution into per-thread space first ("rtus"). For an NHWC
// source they book is * ic floats a thread but place the copy's chunks at
// sp * ic_block (plus ic_b * is * ic_block in the AVX2 one), ic_block being 8
// or 16 channels: with fewer input channels than that, or a remainder, the
// threads' copies overlap and the last one runs past the booking. On AVX2 the
// kernel gradient comes out wrong with two threads or more (by up to 100%;
// the forward and input gradient are right); on AVX-512 the heap past the
// scratchpad is overwritten (a crash later). It is still so in oneDNN's main
// branch. The bfloat16 one on AVX512_BF16, jit_bf16_1x1:avx512_core_bf16
// (jit_avx512_core_bf16_1x1_convolution_bwd_weights_t), copies the same way:
// a strided 1x1 convolution of 12 channels overwrote the heap (found by the
// shape-space test). Those shapes take oneDNN's next implementation.
bool KnownFaulty(const dnnl::convolution_backward_weights::primitive_desc& pd,
                 const Geometry& g) {
  const bool strided_1x1 =
      g.w[0] == 1 && g.w[1] == 1 && (g.stride_h > 1 || g.stride_w > 1);
  const std::string impl = pd.impl_info_str();
  return strided_1x1 && g.x[3] % 16 != 0 &&
         (impl.rfind("jit_1x1:", 0) == 0 || impl.rfind("jit_bf16_1x1:", 0) == 0);
}

ffi::Error BackwardWeights(const Geometry& g, void* x, void* dy, float* dw,
                           float* db) {
  return Guarded([&] {
    auto entry = Cached(g.Key(db ? 'W' : 'w'), [&] {
      auto fwd = ForwardDesc(g, db != nullptr);
      auto pd = db ? dnnl::convolution_backward_weights::primitive_desc(
                         Engine(), dnnl::algorithm::convolution_direct,
                         g.Activation(g.x), g.Kernel(tag::any, dt::f32),
                         BiasDesc(g), g.Activation(g.y), g.Strides(), g.PadLow(),
                         g.PadHigh(), fwd, Attributes())
                   : dnnl::convolution_backward_weights::primitive_desc(
                         Engine(), dnnl::algorithm::convolution_direct,
                         g.Activation(g.x), g.Kernel(tag::any, dt::f32),
                         g.Activation(g.y), g.Strides(), g.PadLow(),
                         g.PadHigh(), fwd, Attributes());
      while (KnownFaulty(pd, g))
        if (!pd.next_impl())
          throw dnnl::error(dnnl_unimplemented,
                            "no other backward-weights implementation");
      return Entry{dnnl::convolution_backward_weights(pd),
                   pd.diff_weights_desc(), pd.scratchpad_desc()};
    });
    dnnl::stream stream(Engine());
    dnnl::memory src(g.Activation(g.x), Engine(), x);
    dnnl::memory diff_dst(g.Activation(g.y), Engine(), dy);
    dnnl::memory user(g.Kernel(tag::hwio, dt::f32), Engine(), dw);
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

template <ffi::DataType T>
ffi::Error BackwardWeightsImpl(ffi::Buffer<T> x, ffi::Buffer<T> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h,
                               int64_t stride_w, int64_t pad_top,
                               int64_t pad_bottom, int64_t pad_left,
                               int64_t pad_right) {
  Geometry g{Shape4(x),  Shape4(*dw), Shape4(dy), stride_h, stride_w, pad_top,
             pad_bottom, pad_left,    pad_right, OperandType<T>()};
  return BackwardWeights(g, x.untyped_data(), dy.untyped_data(),
                         dw->typed_data(), nullptr);
}

template <ffi::DataType T>
ffi::Error BackwardWeightsBiasImpl(
    ffi::Buffer<T> x, ffi::Buffer<T> dy, ffi::ResultBuffer<ffi::F32> dw,
    ffi::ResultBuffer<ffi::F32> db, int64_t stride_h, int64_t stride_w,
    int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  Geometry g{Shape4(x),  Shape4(*dw), Shape4(dy), stride_h, stride_w, pad_top,
             pad_bottom, pad_left,    pad_right, OperandType<T>()};
  return BackwardWeights(g, x.untyped_data(), dy.untyped_data(),
                         dw->typed_data(), db->typed_data());
}

constexpr int64_t kLanes = 8;

// Whether the direct convolution (direct_kernels.inc) runs a convolution.
bool DirectConvHandles(const std::array<int64_t, 4>& xs,
                       const std::array<int64_t, 4>& ws, int64_t stride_h,
                       int64_t stride_w) {
  return xs[3] >= 1 && xs[3] <= 4 && ws[3] % kLanes == 0 && stride_h == 1 &&
         stride_w == 1;
}

// The kernels of direct_kernels.inc and planar_kernels.inc, compiled once for
// each instruction set.
namespace x86_64_v4 {
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
constexpr int64_t kWide = 16;  // Floats in a vector register.
#include "direct_kernels.inc"
#include "planar_kernels.inc"
#pragma GCC pop_options
}  // namespace x86_64_v4

namespace x86_64_v3 {
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
constexpr int64_t kWide = 8;
#include "direct_kernels.inc"
#include "planar_kernels.inc"
#pragma GCC pop_options
}  // namespace x86_64_v3

namespace baseline {
constexpr int64_t kWide = 4;
#include "direct_kernels.inc"
#include "planar_kernels.inc"
}  // namespace baseline

// 2: x86-64-v4, 1: x86-64-v3, 0: the baseline.
int BestVariant() {
  static const int best = __builtin_cpu_supports("x86-64-v4")   ? 2
                          : __builtin_cpu_supports("x86-64-v3") ? 1
                                                                : 0;
  return best;
}

std::atomic<int> variant_cap{2};

int Variant() { return std::min(BestVariant(), variant_cap.load()); }

// Calls the direct or planar kernels' function F in the variant in use.
#define SIMPSONS_KERNEL(F, ...)                        \
  do {                                                 \
    switch (Variant()) {                               \
      case 2: x86_64_v4::F(__VA_ARGS__); break;        \
      case 1: x86_64_v3::F(__VA_ARGS__); break;        \
      default: baseline::F(__VA_ARGS__);               \
    }                                                  \
  } while (0)
template <ffi::DataType T>
ffi::Error ForwardImpl(ffi::Buffer<T> x, ffi::Buffer<T> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride_h,
                       int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                       int64_t pad_left, int64_t pad_right) {
  Geometry g{Shape4(x),  Shape4(w), Shape4(*y), stride_h, stride_w, pad_top,
             pad_bottom, pad_left,  pad_right, OperandType<T>()};
  if constexpr (T == ffi::F32) {
    if (DirectConvHandles(g.x, g.w, stride_h, stride_w)) {
      SIMPSONS_KERNEL(DirectConv, x.typed_data(), g.x[0], g.x[1], g.x[2], g.x[3], w.typed_data(),
                 g.w[0], g.w[1], g.w[3], g.y[1], g.y[2], pad_top, pad_left,
                 y->typed_data());
      return ffi::Error::Success();
    }
  }
  return Forward(g, x.untyped_data(), w.untyped_data(), nullptr,
                 y->typed_data());
}

// Convolution + bias, ReLU and pool, a few images at a time: each chunk's
// convolution output stays in cache between oneDNN writing it and the pool
// reading it, instead of a round trip through memory for the whole batch.
constexpr int64_t kChunkFloats = 1 << 20;  // 4 MB of convolution output.

template <ffi::DataType T>
ffi::Error ConvBiasReluPoolForwardImpl(
    ffi::Buffer<T> x, ffi::Buffer<T> w, ffi::Buffer<ffi::F32> b,
    ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> code,
    int64_t stride_h, int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
    int64_t pad_left, int64_t pad_right) {
  auto xs = Shape4(x), ws = Shape4(w);
  const int64_t n = xs[0];
  const int64_t oh = (xs[1] + pad_top + pad_bottom - ws[0]) / stride_h + 1;
  const int64_t ow = (xs[2] + pad_left + pad_right - ws[1]) / stride_w + 1;
  const int64_t oc = ws[3], per_image = oh * ow * oc;
  if constexpr (T == ffi::F32) {
    if (DirectConvHandles(xs, ws, stride_h, stride_w)) {
      SIMPSONS_KERNEL(DirectConvBiasReluPool, x.typed_data(), 1.0f, n, xs[1], xs[2], xs[3], w.typed_data(),
                             ws[0], ws[1], oc, b.typed_data(), oh, ow, pad_top,
                             pad_left, y->typed_data(), code->typed_data());
      return ffi::Error::Success();
    }
  }
  const int64_t pooled = (oh / 2) * (ow / 2) * oc;
  const int64_t rows = std::max<int64_t>(1, std::min(n, kChunkFloats / per_image));
  std::vector<float> scratch(rows * per_image);
  for (int64_t start = 0; start < n; start += rows) {
    const int64_t m = std::min(rows, n - start);
    Geometry g{{m, xs[1], xs[2], xs[3]}, ws,       {m, oh, ow, oc}, stride_h,
               stride_w,                 pad_top, pad_bottom,      pad_left,
               pad_right,                OperandType<T>()};
    ffi::Error error =
        Forward(g, x.typed_data() + start * xs[1] * xs[2] * xs[3],
                w.untyped_data(), b.typed_data(), scratch.data());
    if (error.failure()) return error;
    SIMPSONS_KERNEL(ReluMaxPool, scratch.data(), m, oh, ow, oc, y->typed_data() + start * pooled,
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
  if (ws[0] == 3 && ws[1] == 3)  // Its codes are the ones the backward reads.
    SIMPSONS_KERNEL(PlanarBlock, x.typed_data(), divisor, xs[0], xs[1], xs[2], xs[3],
                    w.typed_data(), ws[3], b.typed_data(), oh, ow, pad_top, pad_left,
                    y->typed_data(), code->typed_data());
  else
    SIMPSONS_KERNEL(DirectConvBiasReluPoolU8, x.typed_data(), divisor, xs[0], xs[1],
                    xs[2], xs[3], w.typed_data(), ws[0], ws[1], ws[3], b.typed_data(),
                    oh, ow, pad_top, pad_left, y->typed_data(), code->typed_data());
  return ffi::Error::Success();
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
  SIMPSONS_KERNEL(PlanarBlockBackward, x.typed_data(), divisor, xs[0], xs[1], xs[2], xs[3],
                      code.typed_data(), g.typed_data(), oh, ow, ks[3], pad_top,
                      pad_left, dk->typed_data(), db->typed_data());
  return ffi::Error::Success();
}

// ReLU + 2x2 max pool alone (the ResNet's stem, after its BatchNorm).
ffi::Error ReluMaxPoolForwardImpl(ffi::Buffer<ffi::F32> x,
                                  ffi::ResultBuffer<ffi::F32> y,
                                  ffi::ResultBuffer<ffi::S8> code) {
  auto s = Shape4(x);
  SIMPSONS_KERNEL(ReluMaxPool, x.typed_data(), s[0], s[1], s[2], s[3], y->typed_data(),
              code->typed_data());
  return ffi::Error::Success();
}

// Its gradient, as float32 or (T = BF16) rounded to bfloat16 as written.
template <ffi::DataType T>
ffi::Error ReluMaxPoolBackwardImpl(ffi::Buffer<ffi::S8> code,
                                   ffi::Buffer<ffi::F32> dy,
                                   ffi::ResultBuffer<T> dx) {
  auto s = Shape4(*dx);
  SIMPSONS_KERNEL(ReluMaxPoolGradient, code.typed_data(), dy.typed_data(), s[0], s[1], s[2], s[3],
                      dx->typed_data());
  return ffi::Error::Success();
}

// A matrix product c = op(a) op(b), op transposing where asked, for the dense
// layers: a is (M, K), or (K, M) with transpose_a; b is (K, N), or (N, K) with
// transpose_b; c is (M, N), float32 whatever the operands' type (bfloat16
// operands accumulate in float32). The transposes are read in place (strides).
template <ffi::DataType T>
ffi::Error MatmulImpl(ffi::Buffer<T> a, ffi::Buffer<T> b,
                      ffi::ResultBuffer<ffi::F32> c, bool transpose_a,
                      bool transpose_b) {
  auto as = a.dimensions(), cs = c->dimensions();
  if (as.size() != 2 || cs.size() != 2)
    return ffi::Error::InvalidArgument("the matrix product takes 2-D arrays");
  const int64_t m = cs[0], n = cs[1], k = transpose_a ? as[0] : as[1];
  const dt type = OperandType<T>();
  const auto a_tag = transpose_a ? tag::ba : tag::ab;
  const auto b_tag = transpose_b ? tag::ba : tag::ab;
  std::string key = std::string("m") + (type == dt::bf16 ? "b" : "f") + "," +
                    std::to_string(m) + "," + std::to_string(k) + "," +
                    std::to_string(n) + "," + std::to_string(transpose_a) +
                    std::to_string(transpose_b);
  return Guarded([&] {
    dnnl::memory::desc a_desc({m, k}, type, a_tag), b_desc({k, n}, type, b_tag),
        c_desc({m, n}, dt::f32, tag::ab);
    auto entry = Cached(key, [&] {
      dnnl::matmul::primitive_desc pd(Engine(), a_desc, b_desc, c_desc,
                                      Attributes());
      return Entry{dnnl::matmul(pd), pd.weights_desc(), pd.scratchpad_desc()};
    });
    dnnl::stream stream(Engine());
    entry->primitive.execute(
        stream,
        {{DNNL_ARG_SRC, dnnl::memory(a_desc, Engine(), a.untyped_data())},
         {DNNL_ARG_WEIGHTS, dnnl::memory(b_desc, Engine(), b.untyped_data())},
         {DNNL_ARG_DST, dnnl::memory(c_desc, Engine(), c->typed_data())},
         {DNNL_ARG_SCRATCHPAD, Scratchpad(*entry)}});
    stream.wait();
  });
}

template <ffi::DataType T>
auto MatmulBinding() {
  return ffi::Ffi::Bind()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Attr<bool>("transpose_a")
      .template Attr<bool>("transpose_b");
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

template <ffi::DataType T>
auto TwoInOneOut() {
  return WithGeometry(ffi::Ffi::Bind()
                          .template Arg<ffi::Buffer<T>>()
                          .template Arg<ffi::Buffer<T>>()
                          .template Ret<ffi::Buffer<ffi::F32>>());
}

template <ffi::DataType T>
auto BlockForward() {
  return WithGeometry(ffi::Ffi::Bind()
                          .template Arg<ffi::Buffer<T>>()
                          .template Arg<ffi::Buffer<T>>()
                          .template Arg<ffi::Buffer<ffi::F32>>()
                          .template Ret<ffi::Buffer<ffi::F32>>()
                          .template Ret<ffi::Buffer<ffi::S8>>());
}

template <ffi::DataType T>
auto TwoInTwoOut() {
  return WithGeometry(ffi::Ffi::Bind()
                          .template Arg<ffi::Buffer<T>>()
                          .template Arg<ffi::Buffer<T>>()
                          .template Ret<ffi::Buffer<ffi::F32>>()
                          .template Ret<ffi::Buffer<ffi::F32>>());
}

}  // namespace

// The direct kernels' variant in use: 2 (x86-64-v4), 1 (x86-64-v3) or 0 (the
// baseline). A cap of 0-2 makes it the best the CPU runs at or below the cap;
// a negative cap only asks.
extern "C" int SimpsonsUseKernelVariant(int cap) {
  if (cap >= 0) variant_cap = cap;
  return Variant();
}

// Float32 operands, and their bfloat16 twins (float32 results: `Bf16`).
#define SIMPSONS_HANDLERS(SUFFIX, T)                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward##SUFFIX, ForwardImpl<T>,    \
                                TwoInOneOut<T>());                            \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData##SUFFIX,               \
                                BackwardDataImpl<T>, TwoInOneOut<T>());       \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights##SUFFIX,            \
                                BackwardWeightsImpl<T>, TwoInOneOut<T>());    \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeightsBias##SUFFIX,        \
                                BackwardWeightsBiasImpl<T>, TwoInTwoOut<T>()); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(ConvBiasReluPoolForward##SUFFIX,              \
                                ConvBiasReluPoolForwardImpl<T>,               \
                                BlockForward<T>());                           \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnMatmul##SUFFIX, MatmulImpl<T>,          \
                                MatmulBinding<T>());

SIMPSONS_HANDLERS(, ffi::F32)
SIMPSONS_HANDLERS(Bf16, ffi::BF16)

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
XLA_FFI_DEFINE_HANDLER_SYMBOL(ReluMaxPoolForward, ReluMaxPoolForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());
template <ffi::DataType T>
auto PoolBackward() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::S8>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<T>>();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(ReluMaxPoolBackward,
                              ReluMaxPoolBackwardImpl<ffi::F32>,
                              PoolBackward<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ReluMaxPoolBackwardBf16,
                              ReluMaxPoolBackwardImpl<ffi::BF16>,
                              PoolBackward<ffi::BF16>());
