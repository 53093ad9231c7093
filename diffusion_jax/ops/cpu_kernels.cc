// XLA:CPU custom calls (XLA FFI) for the UNet's convolutions and GroupNorm.
//
// Built on first use by diffusion_jax/ops/native.py (g++, oneDNN from the
// "cpu" extra, the XLA FFI headers shipped in jaxlib). Layouts match
// diffusion_jax.ops: activations NHWC, kernels HWIO, float32 only.
//
// Convolution: the three passes of y = conv(x, w) as oneDNN primitives,
//   forward          y[n,i,j,o]  = sum_{a,b,c} x_pad[n, s*i+a, s*j+b, c] w[a,b,c,o]
//   backward data    dx = conv^T(dy, w)
//   backward weights dw[a,b,c,o] = sum_{n,i,j} x_pad[n, s*i+a, s*j+b, c] dy[n,i,j,o]
// Activations stay NHWC (oneDNN's brgemm kernels run on it directly); the
// small kernel tensor is reordered to and from oneDNN's blocked layout.
// Primitives are built once per shape and kept in a process-wide cache.
//
// GroupNorm (Wu & He 2018), per (n, g) over H*W*(C/G) values:
//   forward   y = (x - mu) r scale + bias, r = 1/sqrt(var + eps); also
//             returns mu and r ([N, G]) for the backward pass
//   backward  with gs = dy*scale, xh = (x - mu) r, M = H*W*C/G:
//             dx = r (gs - mean_g(gs) - xh mean_g(gs xh)),
//             dscale = sum_{n,h,w} dy xh, dbias = sum_{n,h,w} dy.
// Per-(n, c) sums are taken in float over blocks of 64 pixels and added up
// across blocks in double (in the order threads finish, so a double's last
// bits may differ between runs), then folded into groups.

#include <omp.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Dims = memory::dims;
using Tag = memory::format_tag;
constexpr auto kF32 = memory::data_type::f32;

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Shape of one convolution: N, H, W, C, O, KH, KW, Ho, Wo, sh, sw, pt, pl, pb, pr.
using ConvKey = std::array<int64_t, 15>;

struct KeyHash {
  size_t operator()(const ConvKey& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

struct ConvPrims {
  memory::desc x_md, y_md, w_user_md;
  dnnl::convolution_forward::primitive_desc fwd_pd;
  dnnl::convolution_backward_data::primitive_desc bwd_data_pd;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights_pd;
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;
  // Reorders between the user's HWIO kernel and each primitive's layout
  // (empty when the primitive takes HWIO as is).
  bool fwd_reorder, bwd_data_reorder, bwd_weights_reorder;
  dnnl::reorder fwd_w_in, bwd_data_w_in, bwd_weights_w_out;
};

std::shared_ptr<const ConvPrims> GetConv(const ConvKey& k) {
  static std::mutex mu;
  static std::unordered_map<ConvKey, std::shared_ptr<const ConvPrims>, KeyHash> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(k);
    if (it != cache.end()) return it->second;
  }
  auto& eng = Engine();
  const auto [n, h, w, c, o, kh, kw, ho, wo, sh, sw, pt, pl, pb, pr] = k;
  auto p = std::make_shared<ConvPrims>();
  p->x_md = memory::desc({n, c, h, w}, kF32, Tag::nhwc);
  p->y_md = memory::desc({n, o, ho, wo}, kF32, Tag::nhwc);
  p->w_user_md = memory::desc({o, c, kh, kw}, kF32, Tag::hwio);
  const memory::desc w_any({o, c, kh, kw}, kF32, Tag::any);
  const Dims strides{sh, sw}, pad_l{pt, pl}, pad_r{pb, pr};
  p->fwd_pd = dnnl::convolution_forward::primitive_desc(
      eng, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      p->x_md, w_any, p->y_md, strides, pad_l, pad_r);
  p->bwd_data_pd = dnnl::convolution_backward_data::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, p->x_md, w_any, p->y_md, strides, pad_l, pad_r,
      p->fwd_pd);
  p->bwd_weights_pd = dnnl::convolution_backward_weights::primitive_desc(
      eng, dnnl::algorithm::convolution_direct, p->x_md, w_any, p->y_md, strides, pad_l, pad_r,
      p->fwd_pd);
  p->fwd = dnnl::convolution_forward(p->fwd_pd);
  p->bwd_data = dnnl::convolution_backward_data(p->bwd_data_pd);
  p->bwd_weights = dnnl::convolution_backward_weights(p->bwd_weights_pd);
  p->fwd_reorder = p->fwd_pd.weights_desc() != p->w_user_md;
  p->bwd_data_reorder = p->bwd_data_pd.weights_desc() != p->w_user_md;
  p->bwd_weights_reorder = p->bwd_weights_pd.diff_weights_desc() != p->w_user_md;
  if (p->fwd_reorder)
    p->fwd_w_in = dnnl::reorder(dnnl::reorder::primitive_desc(eng, p->w_user_md, eng,
                                                              p->fwd_pd.weights_desc()));
  if (p->bwd_data_reorder)
    p->bwd_data_w_in = dnnl::reorder(dnnl::reorder::primitive_desc(
        eng, p->w_user_md, eng, p->bwd_data_pd.weights_desc()));
  if (p->bwd_weights_reorder)
    p->bwd_weights_w_out = dnnl::reorder(dnnl::reorder::primitive_desc(
        eng, p->bwd_weights_pd.diff_weights_desc(), eng, p->w_user_md));
  std::lock_guard<std::mutex> lock(mu);
  return cache.emplace(k, std::move(p)).first->second;
}

ConvKey MakeKey(ffi::Span<const int64_t> x_dims, ffi::Span<const int64_t> w_dims,
                ffi::Span<const int64_t> y_dims, int64_t sh, int64_t sw, int64_t pt,
                int64_t pl, int64_t pb, int64_t pr) {
  return {x_dims[0], x_dims[1], x_dims[2], x_dims[3], w_dims[3], w_dims[0], w_dims[1],
          y_dims[1], y_dims[2], sh, sw, pt, pl, pb, pr};
}

ffi::Error Check(bool ok, const char* what) {
  return ok ? ffi::Error::Success() : ffi::Error(ffi::ErrorCode::kInvalidArgument, what);
}

template <typename F>
ffi::Error Guard(F&& body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
}

// The user's HWIO kernel as a primitive wants it: as is, or reordered into a temporary.
memory KernelIn(const ConvPrims& p, const memory::desc& want, bool reorder,
                const dnnl::reorder& to_want, ffi::Buffer<ffi::F32>& w, dnnl::stream& s) {
  memory user(p.w_user_md, Engine(), w.typed_data());
  if (!reorder) return user;
  memory out(want, Engine());
  to_want.execute(s, user, out);
  return out;
}

ffi::Error ConvForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                       int64_t pl, int64_t pb, int64_t pr) {
  if (x.dimensions().size() != 4 || w.dimensions().size() != 4 || y->dimensions().size() != 4)
    return Check(false, "dj_conv2d_forward: expected rank-4 NHWC / HWIO buffers");
  return Guard([&] {
    auto p = GetConv(MakeKey(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pl,
                             pb, pr));
    auto& eng = Engine();
    dnnl::stream s(eng);
    memory xm(p->x_md, eng, x.typed_data());
    memory ym(p->y_md, eng, y->typed_data());
    memory wm = KernelIn(*p, p->fwd_pd.weights_desc(), p->fwd_reorder, p->fwd_w_in, w, s);
    p->fwd.execute(s, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}});
    s.wait();
  });
}

ffi::Error ConvBackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                            ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                            int64_t pl, int64_t pb, int64_t pr) {
  if (dy.dimensions().size() != 4 || w.dimensions().size() != 4 || dx->dimensions().size() != 4)
    return Check(false, "dj_conv2d_backward_data: expected rank-4 NHWC / HWIO buffers");
  return Guard([&] {
    auto p = GetConv(MakeKey(dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pl,
                             pb, pr));
    auto& eng = Engine();
    dnnl::stream s(eng);
    memory dym(p->y_md, eng, dy.typed_data());
    memory dxm(p->x_md, eng, dx->typed_data());
    memory wm = KernelIn(*p, p->bwd_data_pd.weights_desc(), p->bwd_data_reorder,
                         p->bwd_data_w_in, w, s);
    p->bwd_data.execute(s,
                        {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_SRC, dxm}});
    s.wait();
  });
}

ffi::Error ConvBackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                               ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw,
                               int64_t pt, int64_t pl, int64_t pb, int64_t pr) {
  if (x.dimensions().size() != 4 || dy.dimensions().size() != 4 || dw->dimensions().size() != 4)
    return Check(false, "dj_conv2d_backward_weights: expected rank-4 NHWC / HWIO buffers");
  return Guard([&] {
    auto p = GetConv(MakeKey(x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pl,
                             pb, pr));
    auto& eng = Engine();
    dnnl::stream s(eng);
    memory xm(p->x_md, eng, x.typed_data());
    memory dym(p->y_md, eng, dy.typed_data());
    memory wu(p->w_user_md, eng, dw->typed_data());
    memory wm = p->bwd_weights_reorder ? memory(p->bwd_weights_pd.diff_weights_desc(), eng) : wu;
    p->bwd_weights.execute(s,
                           {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_DIFF_WEIGHTS, wm}});
    if (p->bwd_weights_reorder) p->bwd_weights_w_out.execute(s, wm, wu);
    s.wait();
  });
}

// ---------------------------------------------------------------------------
// GroupNorm over NHWC. Work is split over n (and over pixel blocks for the
// per-channel sums); every inner loop runs over contiguous channels.

// sums[n, c] of f(x) over the H*W pixels, in double.
template <typename F>
void ChannelSums(int64_t n, int64_t hw, int64_t c, int nsum, double* out, F&& f) {
  std::memset(out, 0, sizeof(double) * n * c * nsum);
  const int64_t block = 64;
  const int64_t nblocks = (hw + block - 1) / block;
#pragma omp parallel
  {
    std::vector<double> local(static_cast<size_t>(c) * nsum);
    std::vector<float> acc(static_cast<size_t>(c) * nsum);
#pragma omp for schedule(static)
    for (int64_t nb = 0; nb < n * nblocks; ++nb) {
      const int64_t i = nb / nblocks, b = nb % nblocks;
      const int64_t p0 = b * block, p1 = std::min(hw, p0 + block);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = p0; p < p1; ++p) f(i, p, acc.data());
      double* dst = out + i * c * nsum;
#pragma omp critical
      for (int64_t j = 0; j < c * nsum; ++j) dst[j] += acc[j];
    }
  }
}

ffi::Error GroupNormForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                            ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                            int64_t groups, float eps) {
  auto d = x.dimensions();
  if (d.size() != 4) return Check(false, "dj_group_norm_forward: expected NHWC input");
  const int64_t n = d[0], hw = d[1] * d[2], c = d[3], cg = c / groups;
  const float* xp = x.typed_data();
  std::vector<double> sums(n * c * 2);
  // Pass 1: per-(n, c) sum and sum of squares around a per-(n, c) shift (the
  // first pixel), which keeps the variance accurate for large means.
  ChannelSums(n, hw, c, 2, sums.data(), [&](int64_t i, int64_t p, float* acc) {
    const float* row = xp + (i * hw + p) * c;
    const float* ref = xp + i * hw * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const float v = row[j] - ref[j];
      acc[j] += v;
      acc[c + j] += v * v;
    }
  });
  float* mp = mean->typed_data();
  float* rp = rstd->typed_data();
  std::vector<float> a(n * c), b(n * c);
  const float* sc = scale.typed_data();
  const float* bi = bias.typed_data();
  const double m = static_cast<double>(hw) * cg;
  for (int64_t i = 0; i < n; ++i) {
    const float* ref = xp + i * hw * c;
    for (int64_t g = 0; g < groups; ++g) {
      // Combine per-channel shifted moments: sum (x - ref_c) and sum (x - ref_c)^2.
      double s1 = 0;
      for (int64_t j = g * cg; j < (g + 1) * cg; ++j) {
        s1 += sums[(i * c) * 2 + j] + hw * static_cast<double>(ref[j]);
      }
      const double mu = s1 / m;
      double ss = 0;
      for (int64_t j = g * cg; j < (g + 1) * cg; ++j) {
        const double dj = ref[j] - mu;  // x - mu = (x - ref) + (ref - mu)
        const double t1 = sums[(i * c) * 2 + j], t2 = sums[(i * c) * 2 + c + j];
        ss += t2 + 2 * dj * t1 + hw * dj * dj;
      }
      const double var = std::max(ss / m, 0.0);
      const double r = 1.0 / std::sqrt(var + eps);
      mp[i * groups + g] = static_cast<float>(mu);
      rp[i * groups + g] = static_cast<float>(r);
      for (int64_t j = g * cg; j < (g + 1) * cg; ++j) {
        a[i * c + j] = static_cast<float>(r * sc[j]);
        b[i * c + j] = static_cast<float>(bi[j] - mu * r * sc[j]);
      }
    }
  }
  float* yp = y->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < n * hw; ++q) {
    const int64_t i = q / hw;
    const float* xr = xp + q * c;
    float* yr = yp + q * c;
    const float* ar = a.data() + i * c;
    const float* br = b.data() + i * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) yr[j] = xr[j] * ar[j] + br[j];
  }
  return ffi::Error::Success();
}

ffi::Error GroupNormBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                             ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                             ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                             ffi::ResultBuffer<ffi::F32> dscale, ffi::ResultBuffer<ffi::F32> dbias,
                             int64_t groups) {
  auto d = x.dimensions();
  if (d.size() != 4) return Check(false, "dj_group_norm_backward: expected NHWC input");
  const int64_t n = d[0], hw = d[1] * d[2], c = d[3], cg = c / groups;
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  const float* mp = mean.typed_data();
  const float* rp = rstd.typed_data();
  const float* sc = scale.typed_data();
  // Per-(n, c): sum dy and sum dy * (x - mu).
  std::vector<double> sums(n * c * 2);
  ChannelSums(n, hw, c, 2, sums.data(), [&](int64_t i, int64_t p, float* acc) {
    const float* xr = xp + (i * hw + p) * c;
    const float* gr = dyp + (i * hw + p) * c;
    for (int64_t g = 0; g < groups; ++g) {
      const float mu = mp[i * groups + g];
#pragma omp simd
      for (int64_t j = g * cg; j < (g + 1) * cg; ++j) {
        acc[j] += gr[j];
        acc[c + j] += gr[j] * (xr[j] - mu);
      }
    }
  });
  float* dsp = dscale->typed_data();
  float* dbp = dbias->typed_data();
  std::vector<float> ka(n * c), kb(n * c);  // dx = ka[n,c] * dy + kb[n,c] * x + kc folded in kb
  std::vector<float> kc(n * c);
  for (int64_t j = 0; j < c; ++j) {
    double ds = 0, db = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double r = rp[i * groups + j / cg];
      ds += sums[(i * c) * 2 + c + j] * r;
      db += sums[(i * c) * 2 + j];
    }
    dsp[j] = static_cast<float>(ds);
    dbp[j] = static_cast<float>(db);
  }
  const double m = static_cast<double>(hw) * cg;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t g = 0; g < groups; ++g) {
      const double mu = mp[i * groups + g], r = rp[i * groups + g];
      // mean_g(gs) and mean_g(gs * xh) with gs = dy * scale, xh = (x - mu) r.
      double mg = 0, mgx = 0;
      for (int64_t j = g * cg; j < (g + 1) * cg; ++j) {
        mg += sc[j] * sums[(i * c) * 2 + j];
        mgx += sc[j] * sums[(i * c) * 2 + c + j] * r;
      }
      mg /= m;
      mgx /= m;
      // dx = r (scale dy - mg - (x - mu) r mgx) = ka dy + kb x + kc
      for (int64_t j = g * cg; j < (g + 1) * cg; ++j) {
        ka[i * c + j] = static_cast<float>(r * sc[j]);
        kb[i * c + j] = static_cast<float>(-r * r * mgx);
        kc[i * c + j] = static_cast<float>(r * (-mg + mu * r * mgx));
      }
    }
  }
  float* dxp = dx->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < n * hw; ++q) {
    const int64_t i = q / hw;
    const float* xr = xp + q * c;
    const float* gr = dyp + q * c;
    float* out = dxp + q * c;
    const float* a = ka.data() + i * c;
    const float* b = kb.data() + i * c;
    const float* k = kc.data() + i * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) out[j] = a[j] * gr[j] + b[j] * xr[j] + k[j];
  }
  return ffi::Error::Success();
}

}  // namespace

// The three convolution passes share one signature: two float32 operands, one
// result, and the strides and explicit (lo, hi) paddings as attributes.
#define DJ_CONV_BINDING                                                              \
  ffi::Ffi::Bind()                                                                   \
      .Arg<ffi::Buffer<ffi::F32>>()                                                  \
      .Arg<ffi::Buffer<ffi::F32>>()                                                  \
      .Ret<ffi::Buffer<ffi::F32>>()                                                  \
      .Attr<int64_t>("sh").Attr<int64_t>("sw").Attr<int64_t>("pt").Attr<int64_t>("pl") \
      .Attr<int64_t>("pb")                                                           \
      .Attr<int64_t>("pr")

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConv2dForward, ConvForward, DJ_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConv2dBackwardData, ConvBackwardData, DJ_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(DjConv2dBackwardWeights, ConvBackwardWeights, DJ_CONV_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjGroupNormForward, GroupNormForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjGroupNormBackward, GroupNormBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups"));
