// 2-D convolutions for XLA:CPU through oneDNN, called from JAX with jax.ffi.
//
// Layouts are JAX's: activations NHWC, kernels HWIO, float32. Activations are
// handed to oneDNN as they are (no copies); the kernel is reordered to the
// layout oneDNN chooses for the CPU it runs on (AVX2, AVX-512, AMX), and the
// kernel gradient back to HWIO. Primitives are built once per shape and kept.
//
// Three handlers, each taking the stride and the (low, high) padding of both
// spatial axes as attributes:
//   OnednnConvForward(x, w) -> y
//   OnednnConvBackwardData(dy, w) -> dx      (dx's shape from the result)
//   OnednnConvBackwardWeights(x, dy) -> dw   (dw's shape from the result)

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

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

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return {Engine(),
          dnnl::prop_kind::forward_training,
          dnnl::algorithm::convolution_direct,
          g.Activation(g.x),
          g.Kernel(tag::any),
          g.Activation(g.y),
          g.Strides(),
          g.PadLow(),
          g.PadHigh()};
}

// What one convolution needs at run time: the primitive and the kernel's
// layout that it wants.
struct Entry {
  dnnl::primitive primitive;
  dnnl::memory::desc kernel_desc;
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

// The kernel in `want`'s layout: the HWIO buffer itself, or a reordered copy.
dnnl::memory KernelIn(const dnnl::memory::desc& want, const Geometry& g,
                      float* hwio, dnnl::stream& stream) {
  dnnl::memory user(g.Kernel(tag::hwio), Engine(), hwio);
  if (want == user.get_desc()) return user;
  dnnl::memory packed(want, Engine());
  dnnl::reorder(user, packed).execute(stream, user, packed);
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

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t stride_h,
                       int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                       int64_t pad_left, int64_t pad_right) {
  Geometry g{Shape4(x),    Shape4(w),  Shape4(*y), stride_h, stride_w,
             pad_top,      pad_bottom, pad_left,   pad_right};
  return Guarded([&] {
    auto entry = Cached(g.Key('f'), [&] {
      auto pd = ForwardDesc(g);
      return Entry{dnnl::convolution_forward(pd), pd.weights_desc()};
    });
    dnnl::stream stream(Engine());
    dnnl::memory src(g.Activation(g.x), Engine(), x.typed_data());
    dnnl::memory dst(g.Activation(g.y), Engine(), y->typed_data());
    dnnl::memory kernel = KernelIn(entry->kernel_desc, g, w.typed_data(), stream);
    entry->primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                      {DNNL_ARG_WEIGHTS, kernel},
                                      {DNNL_ARG_DST, dst}});
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
          g.PadHigh(), ForwardDesc(g));
      return Entry{dnnl::convolution_backward_data(pd), pd.weights_desc()};
    });
    dnnl::stream stream(Engine());
    dnnl::memory diff_dst(g.Activation(g.y), Engine(), dy.typed_data());
    dnnl::memory diff_src(g.Activation(g.x), Engine(), dx->typed_data());
    dnnl::memory kernel = KernelIn(entry->kernel_desc, g, w.typed_data(), stream);
    entry->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst},
                                      {DNNL_ARG_WEIGHTS, kernel},
                                      {DNNL_ARG_DIFF_SRC, diff_src}});
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
  return Guarded([&] {
    auto entry = Cached(g.Key('w'), [&] {
      dnnl::convolution_backward_weights::primitive_desc pd(
          Engine(), dnnl::algorithm::convolution_direct, g.Activation(g.x),
          g.Kernel(tag::any), g.Activation(g.y), g.Strides(), g.PadLow(),
          g.PadHigh(), ForwardDesc(g));
      return Entry{dnnl::convolution_backward_weights(pd),
                   pd.diff_weights_desc()};
    });
    dnnl::stream stream(Engine());
    dnnl::memory src(g.Activation(g.x), Engine(), x.typed_data());
    dnnl::memory diff_dst(g.Activation(g.y), Engine(), dy.typed_data());
    dnnl::memory user(g.Kernel(tag::hwio), Engine(), dw->typed_data());
    bool direct = entry->kernel_desc == user.get_desc();
    dnnl::memory diff_kernel =
        direct ? user : dnnl::memory(entry->kernel_desc, Engine());
    entry->primitive.execute(stream, {{DNNL_ARG_SRC, src},
                                      {DNNL_ARG_DIFF_DST, diff_dst},
                                      {DNNL_ARG_DIFF_WEIGHTS, diff_kernel}});
    if (!direct) dnnl::reorder(diff_kernel, user).execute(stream, diff_kernel, user);
    stream.wait();
  });
}

// Every handler takes two float32 buffers, returns one, and reads the geometry.
auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, ForwardImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardDataImpl,
                              Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeightsImpl,
                              Binding());
