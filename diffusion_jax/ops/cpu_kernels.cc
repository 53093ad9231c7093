// XLA:CPU custom calls (XLA FFI) for the networks' convolutions and GroupNorm
// (UNet) and their dense layers, attention, adaptive LayerNorm, GELU and
// gated residuals (DiT).
// Each section below states the formula it implements.
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

#ifdef __AVX512F__
#include <immintrin.h>
#endif
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

// FNV-1a over the int64 entries of a primitive cache's key (array or vector).
struct KeyHash {
  template <typename Key>
  size_t operator()(const Key& k) const {
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


// ---------------------------------------------------------------------------
// Strided (batched) matrix products as oneDNN matmul primitives; a transposed
// operand is only a choice of strides, not a copy. Primitives are cached per
// (dims, strides) of the three operands; they run with a user scratchpad (a per-thread buffer), so
// XLA may execute custom calls on several threads at once.

struct Operand {
  Dims dims, strides;
};

using MatmulKey = std::vector<int64_t>;

struct MatmulPrim {
  memory::desc a_md, b_md, bias_md, c_md, scratch_md;
  dnnl::matmul prim;
};

std::shared_ptr<const MatmulPrim> GetMatmul(const Operand& a, const Operand& b, const Operand& c,
                                            bool has_bias) {
  MatmulKey key{has_bias};
  for (const Operand* o : {&a, &b, &c}) {
    key.push_back(static_cast<int64_t>(o->dims.size()));
    key.insert(key.end(), o->dims.begin(), o->dims.end());
    key.insert(key.end(), o->strides.begin(), o->strides.end());
  }
  static std::mutex mu;
  static std::unordered_map<MatmulKey, std::shared_ptr<const MatmulPrim>, KeyHash> cache;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  auto p = std::make_shared<MatmulPrim>();
  p->a_md = memory::desc(a.dims, kF32, a.strides);
  p->b_md = memory::desc(b.dims, kF32, b.strides);
  p->c_md = memory::desc(c.dims, kF32, c.strides);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc pd;
  if (has_bias) {
    Dims bd(c.dims.size(), 1), bs(c.dims.size(), 0);
    bd.back() = c.dims.back();
    bs.back() = 1;
    for (int i = static_cast<int>(bs.size()) - 2; i >= 0; --i) bs[i] = bd.back();
    p->bias_md = memory::desc(bd, kF32, bs);
    pd = dnnl::matmul::primitive_desc(Engine(), p->a_md, p->b_md, p->bias_md, p->c_md, attr);
  } else {
    pd = dnnl::matmul::primitive_desc(Engine(), p->a_md, p->b_md, p->c_md, attr);
  }
  p->scratch_md = pd.scratchpad_desc();
  p->prim = dnnl::matmul(pd);
  std::lock_guard<std::mutex> lock(mu);
  return cache.emplace(std::move(key), std::move(p)).first->second;
}

// A per-thread scratchpad for user-scratchpad primitives.
void* Scratch(size_t bytes) {
  thread_local std::vector<char> buf;
  if (buf.size() < bytes) buf.resize(bytes);
  return buf.data();
}

// c = a b (+ bias), operands given as raw pointers with their layouts.
void RunMatmul(const Operand& a, const float* ap, const Operand& b, const float* bp,
               const Operand& c, float* cp, const float* bias = nullptr) {
  auto p = GetMatmul(a, b, c, bias != nullptr);
  auto& eng = Engine();
  dnnl::stream s(eng);
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, memory(p->a_md, eng, const_cast<float*>(ap))},
      {DNNL_ARG_WEIGHTS, memory(p->b_md, eng, const_cast<float*>(bp))},
      {DNNL_ARG_DST, memory(p->c_md, eng, cp)},
      {DNNL_ARG_SCRATCHPAD, memory(p->scratch_md, eng, Scratch(p->scratch_md.get_size()))}};
  if (bias) args.emplace(DNNL_ARG_BIAS, memory(p->bias_md, eng, const_cast<float*>(bias)));
  p->prim.execute(s, args);
  s.wait();
}

// Row-major [rows, cols], or its transpose when `t` (the buffer is [cols, rows]).
Operand Matrix(int64_t rows, int64_t cols, bool t) {
  return t ? Operand{{rows, cols}, {1, rows}} : Operand{{rows, cols}, {cols, 1}};
}

// Forward pass of a dense layer, y = x w + bias for x [M, K], w [K, N].
ffi::Error DenseForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                        ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[0] || yd[0] != xd[0] ||
      yd[1] != wd[1] || bias.element_count() != wd[1])
    return Check(false, "dj_dense_forward: expected x [M, K], w [K, N], bias [N]");
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  return Guard([&] {
    RunMatmul(Matrix(m, k, false), x.typed_data(), Matrix(k, n, false), w.typed_data(),
              Matrix(m, n, false), y->typed_data(), bias.typed_data());
  });
}

// Backward pass of y = x w + bias for x [M, K], w [K, N]:
//   dx = dy w^T, dw = x^T dy, dbias = sum_rows dy (column sums in float per
//   thread over contiguous row blocks, added across threads in thread order).
ffi::Error DenseBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                         ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> db) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = dy.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2 || xd[1] != wd[0] || yd[0] != xd[0] ||
      yd[1] != wd[1])
    return Check(false, "dj_dense_backward: expected x [M, K], w [K, N], dy [M, N]");
  const int64_t m = xd[0], k = xd[1], n = wd[1];
  return Guard([&] {
    RunMatmul(Matrix(m, n, false), dy.typed_data(), Matrix(n, k, true), w.typed_data(),
              Matrix(m, k, false), dx->typed_data());
    RunMatmul(Matrix(k, m, true), x.typed_data(), Matrix(m, n, false), dy.typed_data(),
              Matrix(k, n, false), dw->typed_data());
    const float* g = dy.typed_data();
    float* out = db->typed_data();
    std::fill(out, out + n, 0.f);
#pragma omp parallel
    {
      std::vector<float> acc(n, 0.f);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < m; ++i) {
        const float* row = g + i * n;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) acc[j] += row[j];
      }
#pragma omp for ordered schedule(static, 1)
      for (int t = 0; t < omp_get_num_threads(); ++t) {
#pragma omp ordered
        for (int64_t j = 0; j < n; ++j) out[j] += acc[j];
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Multi-head self-attention, q, k, v [B, L, H, D] (packed, see below), scale s:
//   forward   S = s Q K^T, P = softmax_rows(S), O = P V; also lse = logsumexp_rows(S) [B, H, L]
//   backward  P = exp(S - lse), dV = P^T dO, dP = dO V^T,
//             dS = P (dP - rowsum(dO O)), dQ = s dS K, dK = s dS^T Q
// one image at a time per thread, so its [H, L, L] score buffers stay in that
// core's cache (the [B, H, L, L] tensor is never written out). The products
// are strided batched oneDNN matmuls over the image's heads, run on the
// calling thread; the softmax rows use RowMax / ExpRow below.

// Row kernels of the softmax. With AVX-512, exp is evaluated 16 lanes at a
// time as exp(x) = 2^n exp(r), n = round(x / ln2), r = x - n ln2 (Cody-Waite
// split of ln2, |r| <= ln2/2), exp(r) by its degree-7 Taylor polynomial
// (truncation error < 6e-9 relative) and 2^n applied by vscalefps, which
// also underflows to 0 correctly. Without AVX-512 the loops call std::exp.
#ifdef __AVX512F__
inline __m512 Exp16(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 Tail(int64_t n, int64_t j) {
  return n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
}
#endif

float RowMax(const float* x, int64_t n) {
#ifdef __AVX512F__
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16)
    m = _mm512_mask_max_ps(m, Tail(n, j), m, _mm512_maskz_loadu_ps(Tail(n, j), x + j));
  return _mm512_reduce_max_ps(m);
#else
  float m = x[0];
  for (int64_t j = 1; j < n; ++j) m = std::max(m, x[j]);
  return m;
#endif
}

// x[j] = exp(a x[j] + b) in place; returns the sum of the results.
float ExpRow(float* x, int64_t n, float a, float b) {
#ifdef __AVX512F__
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = Tail(n, j);
    const __m512 e = Exp16(_mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(k, x + j), vb));
    _mm512_mask_storeu_ps(x + j, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += (x[j] = std::exp(a * x[j] + b));
  return sum;
#endif
}

// q, k, v come packed as qkv [B, L, 3, H, D] (one projection's output; each
// image's heads are copied into head-major buffers); o is [B, L, H, D] and
// dqkv has qkv's layout.
struct AttentionLayout {
  int64_t b, l, h, d;
  int64_t Row() const { return 3 * h * d; }        // token stride in qkv / dqkv
  int64_t Image() const { return l * Row(); }      // image stride in qkv / dqkv
  int64_t OutImage() const { return l * h * d; }   // image stride in o / do
  // One image's operands: [H, L, D] head-major copies (and their per-head
  // transposes) and the [H, L, L] score blocks.
  Operand Heads() const { return {{h, l, d}, {l * d, d, 1}}; }
  Operand HeadsT() const { return {{h, d, l}, {l * d, 1, d}}; }
  Operand Scores() const { return {{h, l, l}, {l * l, l, 1}}; }
  // The score blocks read transposed: oneDNN packs the operand itself, which
  // beat an explicit tiled transpose into a second buffer (94 -> 73 ms for the
  // DiT's backward pass, batch 128 x 196 tokens x 4 heads, 2026-11-26).
  Operand ScoresT() const { return {{h, l, l}, {l * l, 1, l}}; }
};

ffi::Error AttentionLayoutOf(ffi::Span<const int64_t> d, int64_t heads, AttentionLayout* t) {
  if (d.size() != 3 || heads < 1 || d[2] % (3 * heads))
    return Check(false, "dj_attention: expected qkv [B, L, 3 * heads * head_dim]");
  *t = {d[0], d[1], heads, d[2] / (3 * heads)};
  return ffi::Error::Success();
}

// Per-thread work buffers of the attention kernels, reused across calls.
float* Buffer(int which, size_t floats) {
  thread_local std::vector<float> bufs[8];
  if (bufs[which].size() < floats) bufs[which].resize(floats);
  return bufs[which].data();
}

// dst[j, p, :] = src[p * row + j * d + :] for heads j < h, tokens p < l (and back).
void GatherHeads(const float* src, int64_t row, int64_t l, int64_t h, int64_t d, float* dst) {
  for (int64_t p = 0; p < l; ++p)
    for (int64_t j = 0; j < h; ++j) {
      const float* a = src + p * row + j * d;
      float* b = dst + (j * l + p) * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) b[c] = a[c];
    }
}
void ScatterHeads(const float* src, int64_t row, int64_t l, int64_t h, int64_t d, float* dst) {
  for (int64_t p = 0; p < l; ++p)
    for (int64_t j = 0; j < h; ++j) {
      const float* a = src + (j * l + p) * d;
      float* b = dst + p * row + j * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) b[c] = a[c];
    }
}

// Runs body(image) for every image, the images split over the OpenMP threads;
// inside, oneDNN runs single-threaded on this thread's cached buffers. The
// first exception is kept and rethrown after the loop.
template <typename F>
void ForEachImage(int64_t images, F&& body) {
  std::exception_ptr error;
  std::mutex mu;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < images; ++i) {
    try {
      body(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

ffi::Error AttentionForward(ffi::Buffer<ffi::F32> qkv, ffi::ResultBuffer<ffi::F32> o,
                            ffi::ResultBuffer<ffi::F32> lse, int64_t heads, float scale) {
  AttentionLayout t;
  if (auto err = AttentionLayoutOf(qkv.dimensions(), heads, &t); err.failure()) return err;
  const int64_t l = t.l, h = t.h, d = t.d, hd = h * d, row = t.Row(), hld = h * l * d;
  return Guard([&] {
    ForEachImage(t.b, [&](int64_t i) {
      float *qc = Buffer(0, 3 * hld), *kc = qc + hld, *vc = kc + hld;
      float* sbuf = Buffer(1, h * l * l);
      const float* src = qkv.typed_data() + i * t.Image();
      for (int m = 0; m < 3; ++m) GatherHeads(src + m * hd, row, l, h, d, qc + m * hld);
      RunMatmul(t.Heads(), qc, t.HeadsT(), kc, t.Scores(), sbuf);
      float* lp = lse->typed_data() + i * h * l;
      for (int64_t r = 0; r < h * l; ++r) {
        float* sr = sbuf + r * l;
        const float mx = RowMax(sr, l);
        const float sum = ExpRow(sr, l, scale, -mx * scale);
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j < l; ++j) sr[j] *= inv;
        lp[r] = mx * scale + std::log(sum);
      }
      float* oc = Buffer(2, hld);
      RunMatmul(t.Scores(), sbuf, t.Heads(), vc, t.Heads(), oc);
      ScatterHeads(oc, hd, l, h, d, o->typed_data() + i * t.OutImage());
    });
  });
}

ffi::Error AttentionBackward(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> o,
                             ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                             ffi::ResultBuffer<ffi::F32> dqkv, int64_t heads, float scale) {
  AttentionLayout t;
  if (auto err = AttentionLayoutOf(qkv.dimensions(), heads, &t); err.failure()) return err;
  const int64_t l = t.l, h = t.h, d = t.d, hd = h * d, row = t.Row(), hld = h * l * d;
  return Guard([&] {
    ForEachImage(t.b, [&](int64_t i) {
      // Per image, head-major copies: q, k, v, dO; the gradients dq, dk, dv.
      float *qc = Buffer(0, 3 * hld), *kc = qc + hld, *vc = kc + hld;
      float* doc = Buffer(2, hld);
      float *dqc = Buffer(3, 3 * hld), *dkc = dqc + hld, *dvc = dkc + hld;
      float* pbuf = Buffer(1, h * l * l);
      float* dsbuf = Buffer(4, h * l * l);
      const float* src = qkv.typed_data() + i * t.Image();
      for (int m = 0; m < 3; ++m) GatherHeads(src + m * hd, row, l, h, d, qc + m * hld);
      const float* dop = dout.typed_data() + i * t.OutImage();
      const float* op = o.typed_data() + i * t.OutImage();
      GatherHeads(dop, hd, l, h, d, doc);
      RunMatmul(t.Heads(), qc, t.HeadsT(), kc, t.Scores(), pbuf);
      const float* lp = lse.typed_data() + i * h * l;
      for (int64_t r = 0; r < h * l; ++r) ExpRow(pbuf + r * l, l, scale, -lp[r]);
      RunMatmul(t.ScoresT(), pbuf, t.Heads(), doc, t.Heads(), dvc);
      RunMatmul(t.Heads(), doc, t.HeadsT(), vc, t.Scores(), dsbuf);
      for (int64_t r = 0; r < h * l; ++r) {
        // r = (head j, query p); O's row is a [D] slice of [L, H, D].
        const int64_t j = r / l, p = r % l;
        const float* dor = doc + r * d;
        const float* orow = op + (p * h + j) * d;
        float di = 0.f;
#pragma omp simd reduction(+ : di)
        for (int64_t c = 0; c < d; ++c) di += dor[c] * orow[c];
        const float* pr = pbuf + r * l;
        float* dr = dsbuf + r * l;
#pragma omp simd
        for (int64_t c = 0; c < l; ++c) dr[c] = scale * pr[c] * (dr[c] - di);
      }
      RunMatmul(t.Scores(), dsbuf, t.Heads(), kc, t.Heads(), dqc);
      RunMatmul(t.ScoresT(), dsbuf, t.Heads(), qc, t.Heads(), dkc);
      float* dst = dqkv->typed_data() + i * t.Image();
      for (int m = 0; m < 3; ++m) ScatterHeads(dqc + m * hld, row, l, h, d, dst + m * hd);
    });
  });
}

// ---------------------------------------------------------------------------
// Adaptive LayerNorm (DiT's adaLN, parameter-free LayerNorm then a per-image
// modulation) over x [B, L, D] with shift, scale [B, D]:
//   forward   y = xh (1 + scale_b) + shift_b,  xh = (x - mu) r, r = 1/sqrt(var + eps)
//             per token (two passes over the token's D values, in float);
//             also returns mu and r [B, L]
//   backward  g = dy (1 + scale_b): dx = r (g - mean_D(g) - xh mean_D(g xh)),
//             dshift_b = sum_L dy, dscale_b = sum_L dy xh
// Threads split the images, so each owns its rows of dshift and dscale.

ffi::Error AdaLNForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> shift,
                        ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y,
                        ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                        float eps) {
  auto d = x.dimensions();
  if (d.size() != 3) return Check(false, "dj_adaln_forward: expected x [B, L, D]");
  const int64_t nb = d[0], l = d[1], c = d[2];
  const float *xp = x.typed_data(), *sh = shift.typed_data(), *sc = scale.typed_data();
  float *yp = y->typed_data(), *mp = mean->typed_data(), *rp = rstd->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t q = 0; q < nb * l; ++q) {
    const int64_t b = q / l;
    const float* xr = xp + q * c;
    float s1 = 0.f;
#pragma omp simd reduction(+ : s1)
    for (int64_t j = 0; j < c; ++j) s1 += xr[j];
    const float mu = s1 / c;
    float s2 = 0.f;
#pragma omp simd reduction(+ : s2)
    for (int64_t j = 0; j < c; ++j) s2 += (xr[j] - mu) * (xr[j] - mu);
    const float r = 1.0f / std::sqrt(s2 / c + eps);
    mp[q] = mu;
    rp[q] = r;
    const float *shb = sh + b * c, *scb = sc + b * c;
    float* yr = yp + q * c;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) yr[j] = (xr[j] - mu) * r * (1.0f + scb[j]) + shb[j];
  }
  return ffi::Error::Success();
}

ffi::Error AdaLNBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                         ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dx,
                         ffi::ResultBuffer<ffi::F32> dshift, ffi::ResultBuffer<ffi::F32> dscale) {
  auto d = x.dimensions();
  if (d.size() != 3) return Check(false, "dj_adaln_backward: expected x [B, L, D]");
  const int64_t nb = d[0], l = d[1], c = d[2];
  const float *xp = x.typed_data(), *sc = scale.typed_data(), *mp = mean.typed_data(),
              *rp = rstd.typed_data(), *gp = dy.typed_data();
  float *dxp = dx->typed_data(), *dsh = dshift->typed_data(), *dsc = dscale->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    float* dshb = dsh + b * c;
    float* dscb = dsc + b * c;
    const float* scb = sc + b * c;
    std::fill(dshb, dshb + c, 0.f);
    std::fill(dscb, dscb + c, 0.f);
    for (int64_t t = 0; t < l; ++t) {
      const int64_t q = b * l + t;
      const float *xr = xp + q * c, *gr = gp + q * c;
      const float mu = mp[q], r = rp[q];
      float mg = 0.f, mgx = 0.f;
#pragma omp simd reduction(+ : mg, mgx)
      for (int64_t j = 0; j < c; ++j) {
        const float xh = (xr[j] - mu) * r;
        const float g = gr[j] * (1.0f + scb[j]);
        mg += g;
        mgx += g * xh;
        dshb[j] += gr[j];
        dscb[j] += gr[j] * xh;
      }
      mg /= c;
      mgx /= c;
      float* out = dxp + q * c;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        const float xh = (xr[j] - mu) * r;
        out[j] = r * (gr[j] * (1.0f + scb[j]) - mg - xh * mgx);
      }
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// Gated residual of DiT's adaLN-Zero blocks, y = x + gate[b] * h over
// x, h [B, L, D], gate [B, D]. Forward is left to XLA (one fused pass);
// backward, besides dx = dy:
//   dh[b, t] = gate[b] * dy[b, t],   dgate[b] = sum_t dy[b, t] * h[b, t]
// in one pass over dy and h, threads owning whole images (no shared sums).
ffi::Error GatedResidualBackward(ffi::Buffer<ffi::F32> gate, ffi::Buffer<ffi::F32> h,
                                 ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dh,
                                 ffi::ResultBuffer<ffi::F32> dgate) {
  auto d = h.dimensions(), gd = gate.dimensions();
  if (d.size() != 3 || gd.size() != 2 || gd[0] != d[0] || gd[1] != d[2])
    return Check(false, "dj_gated_residual_backward: expected gate [B, D], h [B, L, D]");
  const int64_t nb = d[0], l = d[1], c = d[2];
  const float *gp = gate.typed_data(), *hp = h.typed_data(), *yp = dy.typed_data();
  float *dhp = dh->typed_data(), *dgp = dgate->typed_data();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const float* g = gp + b * c;
    float* acc = dgp + b * c;
    std::fill(acc, acc + c, 0.f);
    for (int64_t t = 0; t < l; ++t) {
      const int64_t q = (b * l + t) * c;
      const float *hr = hp + q, *yr = yp + q;
      float* out = dhp + q;
#pragma omp simd
      for (int64_t j = 0; j < c; ++j) {
        out[j] = g[j] * yr[j];
        acc[j] += yr[j] * hr[j];
      }
    }
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// GELU, tanh approximation (Hendrycks & Gimpel 2016), written with the
// identity 1 + tanh(u) = 2 sigmoid(2u):
//   y  = x s,  s = 1 / (1 + exp(-z)),  z = 2c (x + a x^3),  c = sqrt(2/pi), a = 0.044715
//   dx = dy (s + x s (1 - s) 2c (1 + 3 a x^2))
constexpr float kGeluC2 = 1.5957691216057308f;  // 2 sqrt(2/pi)
constexpr float kGeluA = 0.044715f;

#ifdef __AVX512F__
// s = sigmoid(z) for 16 lanes of x.
inline __m512 GeluSigmoid16(__m512 x) {
  const __m512 x2 = _mm512_mul_ps(x, x);
  const __m512 z = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(kGeluC2), x),
                                 _mm512_fmadd_ps(_mm512_set1_ps(kGeluA), x2, _mm512_set1_ps(1.f)));
  const __m512 e = Exp16(_mm512_sub_ps(_mm512_setzero_ps(), z));
  return _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_add_ps(_mm512_set1_ps(1.f), e));
}
#endif

ffi::Error GeluForward(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t n = x.element_count();
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  constexpr int64_t kBlock = 4096;
#pragma omp parallel for schedule(static)
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
#ifdef __AVX512F__
    for (int64_t j = b0; j < b1; j += 16) {
      const __mmask16 k = Tail(b1, j);
      const __m512 v = _mm512_maskz_loadu_ps(k, xp + j);
      _mm512_mask_storeu_ps(yp + j, k, _mm512_mul_ps(v, GeluSigmoid16(v)));
    }
#else
    for (int64_t j = b0; j < b1; ++j) {
      const float v = xp[j], z = kGeluC2 * v * (1.f + kGeluA * v * v);
      yp[j] = v / (1.f + std::exp(-z));
    }
#endif
  }
  return ffi::Error::Success();
}

ffi::Error GeluBackward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dx) {
  const int64_t n = x.element_count();
  const float *xp = x.typed_data(), *gp = dy.typed_data();
  float* out = dx->typed_data();
  constexpr int64_t kBlock = 4096;
#pragma omp parallel for schedule(static)
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
#ifdef __AVX512F__
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t j = b0; j < b1; j += 16) {
      const __mmask16 k = Tail(b1, j);
      const __m512 v = _mm512_maskz_loadu_ps(k, xp + j);
      const __m512 sg = GeluSigmoid16(v);
      const __m512 dz = _mm512_mul_ps(
          _mm512_set1_ps(kGeluC2),
          _mm512_fmadd_ps(_mm512_set1_ps(3 * kGeluA), _mm512_mul_ps(v, v), one));
      // s + x s (1 - s) dz
      const __m512 d = _mm512_fmadd_ps(
          _mm512_mul_ps(_mm512_mul_ps(v, sg), _mm512_sub_ps(one, sg)), dz, sg);
      _mm512_mask_storeu_ps(out + j, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, gp + j), d));
    }
#else
    for (int64_t j = b0; j < b1; ++j) {
      const float v = xp[j], z = kGeluC2 * v * (1.f + kGeluA * v * v);
      const float sg = 1.f / (1.f + std::exp(-z));
      out[j] = gp[j] * (sg + v * sg * (1.f - sg) * kGeluC2 * (1.f + 3 * kGeluA * v * v));
    }
#endif
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjDenseForward, DenseForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjDenseBackward, DenseBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjAdaLNForward, AdaLNForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjAdaLNBackward, AdaLNBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjGeluForward, GeluForward,
                              ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjGeluBackward, GeluBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DjGatedResidualBackward, GatedResidualBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
