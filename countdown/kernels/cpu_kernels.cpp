// CPU decode kernels of countdown (built on first use by countdown/kernels/cpu.py).
//
// Two primitives read each weight row they need exactly once for every token of a decode batch
// (B <= 16), accumulating in fp32; weights are bf16, fp16 or fp32, row-major and contiguous:
//
//   row_dot  : y[b, j] = W[rows[j], :] . x[b, :]            W [N, K] (nn.Linear rows, or gate/up [I, H])
//   row_axpy : y[b, :] = sum_j c[b, j] * W[rows[j], :]      W [R, N] (W_down^T [I, H], input-major W^T [K, N])
//
// `rows` lists the kept rows (ascending); an empty optional means every row. The FFN ops below compose
// them with the keep rule of each method, so a skipped neuron costs no weight bytes at all. A weight
// stored in 8 or 4 bits would be one more `load8` (a row's group scales beside its values).
// AVX2 + FMA (+ F16C) when the compiler targets them (-march=native), a portable scalar loop otherwise.

#include <torch/extension.h>
#include <torch/library.h>
#include <torch/version.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CD_AVX2 1
#else
#define CD_AVX2 0
#endif

namespace {

constexpr int64_t kMaxBatch = 16;

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

#if CD_AVX2
// 8 consecutive weights as fp32
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#if defined(__F16C__)
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#define CD_HALF_SIMD 1
#else
#define CD_HALF_SIMD 0
#endif
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 0x55));
  return _mm_cvtss_f32(s);
}
template <typename T> constexpr bool simd_ok() { return true; }
template <> constexpr bool simd_ok<c10::Half>() { return CD_HALF_SIMD; }
#endif

// Rows per thread chunk: at least kMinChunkBytes of weights, so a small matrix runs on one thread
// (waking a second costs more than it saves, and far more on a loaded machine).
constexpr int64_t kMinChunkBytes = 64 * 1024;
inline int64_t grain_rows(int64_t row_bytes) { return std::max<int64_t>(4, kMinChunkBytes / std::max<int64_t>(row_bytes, 1)); }

// NB tokens (1..4) against one row w [K]; x is [NB, K] fp32 with row stride ldx.
template <int NB, typename T>
inline void dot_row(const T* w, const float* x, int64_t ldx, int64_t K, float* out /*[NB]*/) {
  int64_t k = 0;
#if CD_AVX2
  if constexpr (simd_ok<T>()) {
    constexpr int U = NB == 1 ? 4 : 2;  // independent accumulators per token hide the FMA latency
    __m256 acc[NB][U];
    for (int b = 0; b < NB; ++b)
      for (int u = 0; u < U; ++u) acc[b][u] = _mm256_setzero_ps();
    for (; k + 8 * U <= K; k += 8 * U) {
      for (int u = 0; u < U; ++u) {
        __m256 wv = load8(w + k + 8 * u);
        for (int b = 0; b < NB; ++b)
          acc[b][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * ldx + k + 8 * u), acc[b][u]);
      }
    }
    for (; k + 8 <= K; k += 8) {
      __m256 wv = load8(w + k);
      for (int b = 0; b < NB; ++b) acc[b][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * ldx + k), acc[b][0]);
    }
    for (int b = 0; b < NB; ++b) {
      __m256 s = acc[b][0];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[b][u]);
      out[b] = hsum(s);
    }
  } else
#endif
  {
    for (int b = 0; b < NB; ++b) out[b] = 0.f;
  }
  for (; k < K; ++k) {
    float wk = to_f32(w[k]);
    for (int b = 0; b < NB; ++b) out[b] += wk * x[b * ldx + k];
  }
}

template <typename T>
void row_dot_impl(const T* W, int64_t K, const float* x, int64_t B, const int64_t* rows, int64_t n_rows,
                  float* y /*[B, n_rows]*/) {
  // rows split across threads: each thread streams its own rows once for every token
  at::parallel_for(0, n_rows, grain_rows(K * sizeof(T)), [&](int64_t begin, int64_t end) {
    float tmp[4];
    for (int64_t j = begin; j < end; ++j) {
      const T* w = W + (rows ? rows[j] : j) * K;
      int64_t b = 0;
      for (; b + 4 <= B; b += 4) {
        dot_row<4>(w, x + b * K, K, K, tmp);
        for (int i = 0; i < 4; ++i) y[(b + i) * n_rows + j] = tmp[i];
      }
      switch (B - b) {
        case 3: dot_row<3>(w, x + b * K, K, K, tmp); break;
        case 2: dot_row<2>(w, x + b * K, K, K, tmp); break;
        case 1: dot_row<1>(w, x + b * K, K, K, tmp); break;
        default: break;
      }
      for (int64_t i = 0; i < B - b; ++i) y[(b + i) * n_rows + j] = tmp[i];
    }
  });
}

// acc[0:n] += sum_u c[u] * w_u[0:n] for U rows at once (fewer passes over the accumulator)
template <int U, typename T>
inline void axpy_rows(const T* const* w, const float* c, float* acc, int64_t n) {
  int64_t i = 0;
#if CD_AVX2
  if constexpr (simd_ok<T>()) {
    __m256 cv[U];
    for (int u = 0; u < U; ++u) cv[u] = _mm256_set1_ps(c[u]);
    for (; i + 8 <= n; i += 8) {
      __m256 a = _mm256_loadu_ps(acc + i);
      for (int u = 0; u < U; ++u) a = _mm256_fmadd_ps(cv[u], load8(w[u] + i), a);
      _mm256_storeu_ps(acc + i, a);
    }
  }
#endif
  for (; i < n; ++i) {
    float a = acc[i];
    for (int u = 0; u < U; ++u) a += c[u] * to_f32(w[u][i]);
    acc[i] = a;
  }
}

template <typename T>
void row_axpy_impl(const T* W, int64_t N, const float* c /*[B, n_rows]*/, int64_t B, const int64_t* rows,
                   int64_t n_rows, float* y /*[B, N]*/) {
  // rows split across threads, each summing into its own fp32 partial [B, N]; partials added at the end
  const int64_t grain = grain_rows(N * sizeof(T));
  const int nt = std::max<int>(1, std::min<int64_t>(at::get_num_threads(), (n_rows + grain - 1) / grain));
  std::vector<float> partial(static_cast<size_t>(nt) * B * N, 0.f);
  at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t begin = n_rows * t / nt, end = n_rows * (t + 1) / nt;
      float* acc = partial.data() + t * B * N;
      constexpr int U = 4;
      const T* w[U];
      float cc[U];
      int64_t j = begin;
      for (; j + U <= end; j += U) {
        for (int u = 0; u < U; ++u) w[u] = W + (rows ? rows[j + u] : j + u) * N;
        for (int64_t b = 0; b < B; ++b) {
          bool any = false;
          for (int u = 0; u < U; ++u) { cc[u] = c[b * n_rows + j + u]; any |= cc[u] != 0.f; }
          if (any) axpy_rows<U>(w, cc, acc + b * N, N);
        }
      }
      for (; j < end; ++j) {
        w[0] = W + (rows ? rows[j] : j) * N;
        for (int64_t b = 0; b < B; ++b) {
          cc[0] = c[b * n_rows + j];
          if (cc[0] != 0.f) axpy_rows<1>(w, cc, acc + b * N, N);
        }
      }
    }
  });
  std::memcpy(y, partial.data(), sizeof(float) * B * N);
  for (int t = 1; t < nt; ++t) {
    const float* p = partial.data() + static_cast<int64_t>(t) * B * N;
    for (int64_t i = 0; i < B * N; ++i) y[i] += p[i];
  }
}

// ---- tensor-level helpers ------------------------------------------------------------------------

void check_weight(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), name, " must be a contiguous 2-D tensor (row-major)");
  auto t = w.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, name, " must be fp32, bf16 or fp16");
}

at::Tensor as_rows(const at::Tensor& x, int64_t K) {  // [..., K] -> contiguous fp32 [B, K]
  auto x2 = x.reshape({-1, K}).to(at::kFloat).contiguous();
  TORCH_CHECK(x2.size(0) <= kMaxBatch, "at most ", kMaxBatch, " tokens, got ", x2.size(0));
  return x2;
}

const int64_t* rows_ptr(const c10::optional<at::Tensor>& rows) {
  return rows.has_value() ? rows->data_ptr<int64_t>() : nullptr;
}

// f(T{}) for the weight's element type T (fp32, bf16 or fp16: what check_weight admits)
template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  if (t == at::kFloat) f(float{});
  else if (t == at::kBFloat16) f(c10::BFloat16{});
  else f(c10::Half{});
}

// y [B, n] fp32 = W[rows] . x for x [B, K] fp32
at::Tensor row_dot(const at::Tensor& W, const at::Tensor& x32, const c10::optional<at::Tensor>& rows) {
  const int64_t K = W.size(1), B = x32.size(0);
  const int64_t n = rows.has_value() ? rows->numel() : W.size(0);
  auto y = at::empty({B, n}, x32.options());
  if (n == 0 || B == 0) return y;
  dispatch(W.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    row_dot_impl<scalar_t>(W.data_ptr<scalar_t>(), K, x32.data_ptr<float>(), B, rows_ptr(rows), n,
                           y.data_ptr<float>());
  });
  return y;
}

// y [B, N] fp32 = sum_j c[:, j] W[rows[j]] for c [B, n] fp32
at::Tensor row_axpy(const at::Tensor& W, const at::Tensor& c32, const c10::optional<at::Tensor>& rows) {
  const int64_t N = W.size(1), B = c32.size(0);
  const int64_t n = rows.has_value() ? rows->numel() : W.size(0);
  auto y = at::zeros({B, N}, c32.options());
  if (n == 0 || B == 0) return y;
  dispatch(W.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    row_axpy_impl<scalar_t>(W.data_ptr<scalar_t>(), N, c32.data_ptr<float>(), B, rows_ptr(rows), n,
                            y.data_ptr<float>());
  });
  return y;
}

inline float act_f(float v, int64_t act) {
  switch (act) {
    case 0: return v / (1.f + std::exp(-v));                                        // silu
    case 1: {                                                                       // gelu_tanh
      const float c = 0.7978845608028654f;
      return 0.5f * v * (1.f + std::tanh(c * (v + 0.044715f * v * v * v)));
    }
    case 2: return 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f));           // gelu
    default: return v > 0.f ? v : 0.f;                                             // relu
  }
}

// thresholds: one value or one per entry (fp32, contiguous)
struct Thr {
  const float* p;
  bool per_entry;
  float operator[](int64_t i) const { return per_entry ? p[i] : p[0]; }
};

// thresholds of any float dtype and shape holding 1 or `width` values (a module's buffer as it is: the
// conversion happens here, not in Python per call); `holder` keeps a converted copy alive
Thr thr_of(const at::Tensor& thr, int64_t width, at::Tensor& holder) {
  TORCH_CHECK(thr.device().is_cpu() && at::isFloatingType(thr.scalar_type()), "threshold must be a float CPU tensor");
  TORCH_CHECK(thr.numel() == 1 || thr.numel() == width, "threshold must hold 1 or ", width, " values");
  holder = thr.to(at::kFloat).contiguous();
  return {holder.data_ptr<float>(), holder.numel() != 1};
}

// Ascending indices of the entries kept by at least one token (keep [B, I] as bytes).
at::Tensor union_rows(const std::vector<uint8_t>& keep, int64_t B, int64_t I) {
  std::vector<int64_t> idx;
  idx.reserve(I);
  for (int64_t i = 0; i < I; ++i) {
    bool any = false;
    for (int64_t b = 0; b < B && !any; ++b) any = keep[b * I + i];
    if (any) idx.push_back(i);
  }
  auto out = at::empty({static_cast<int64_t>(idx.size())}, at::kLong);
  if (!idx.empty()) std::memcpy(out.data_ptr<int64_t>(), idx.data(), idx.size() * sizeof(int64_t));
  return out;
}

at::Tensor finish(const at::Tensor& y32, const at::Tensor& x, const at::ScalarType dtype) {
  auto sizes = x.sizes().vec();
  sizes.back() = y32.size(1);
  return y32.to(dtype).reshape(sizes);
}

}  // namespace

// ---- ops (Python signatures mirror countdown.kernels.reference) ---------------------------------

// F.linear without bias: x [..., K], W [N, K] -> [..., N] in x's dtype
at::Tensor linear(const at::Tensor& x, const at::Tensor& W) {
  check_weight(W, "weight");
  auto x32 = as_rows(x, W.size(1));
  return finish(row_dot(W, x32, c10::nullopt), x, x.scalar_type());
}

// F.linear with an input-major weight W_t [K, N] (= W^T): every row of W_t, weighted by x
at::Tensor linear_input_major(const at::Tensor& x, const at::Tensor& W_t) {
  check_weight(W_t, "weight^T");
  auto x32 = as_rows(x, W_t.size(0));
  return finish(row_axpy(W_t, x32, c10::nullopt), x, x.scalar_type());
}

// CATS / M-COUNTDOWN / DejaVu / CHESS: a = w_dense x (all rows); neuron i kept by token b when
// score(a[b, i]) > thr_i; the kept union's rows of w_sparse and w_down_t are read once.
at::Tensor fused_gather_ffn(const at::Tensor& x, const at::Tensor& w_dense, const at::Tensor& w_sparse,
                            const at::Tensor& w_down_t, const at::Tensor& thr, int64_t act, bool dense_is_gate,
                            bool score_act, bool is_signed) {
  check_weight(w_dense, "w_dense"); check_weight(w_sparse, "w_sparse"); check_weight(w_down_t, "w_down_t");
  const int64_t H = w_dense.size(1), I = w_dense.size(0);
  auto x32 = as_rows(x, H);
  const int64_t B = x32.size(0);
  auto a = row_dot(w_dense, x32, c10::nullopt);  // [B, I]
  const float* ap = a.data_ptr<float>();
  at::Tensor thr32;
  Thr th = thr_of(thr, I, thr32);
  std::vector<uint8_t> keep(B * I);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < I; ++i) {
      float v = ap[b * I + i];
      float s = score_act ? act_f(v, act) : v;
      keep[b * I + i] = (is_signed ? s : std::fabs(s)) > th[i];
    }
  auto rows = union_rows(keep, B, I);
  const int64_t n = rows.numel();
  auto bv = row_dot(w_sparse, x32, rows);  // [B, n]
  float* bp = bv.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = r[j];
      float av = ap[b * I + i], sv = bp[b * n + j];
      float t = dense_is_gate ? act_f(av, act) * sv : act_f(sv, act) * av;
      bp[b * n + j] = keep[b * I + i] ? t : 0.f;
    }
  return finish(row_axpy(w_down_t, bv, rows), x, w_down_t.scalar_type());
}

// D-COUNTDOWN ideal / S-COUNTDOWN: t = act(W_gate x) * (W_up x) densely; kept rows |t_i| > thr_i of w_down_t
at::Tensor coefficient_ffn(const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                           const at::Tensor& w_down_t, const at::Tensor& thr, int64_t act) {
  check_weight(w_gate, "w_gate"); check_weight(w_up, "w_up"); check_weight(w_down_t, "w_down_t");
  const int64_t H = w_gate.size(1), I = w_gate.size(0);
  auto x32 = as_rows(x, H);
  const int64_t B = x32.size(0);
  auto g = row_dot(w_gate, x32, c10::nullopt), u = row_dot(w_up, x32, c10::nullopt);
  const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
  at::Tensor thr32;
  Thr th = thr_of(thr, I, thr32);
  std::vector<uint8_t> keep(B * I);
  std::vector<float> t(B * I);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < I; ++i) {
      float v = act_f(gp[b * I + i], act) * up[b * I + i];
      t[b * I + i] = v;
      keep[b * I + i] = std::fabs(v) > th[i];
    }
  auto rows = union_rows(keep, B, I);
  const int64_t n = rows.numel();
  auto c = at::empty({B, n}, x32.options());
  float* cp = c.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < n; ++j) cp[b * n + j] = keep[b * I + r[j]] ? t[b * I + r[j]] : 0.f;
  return finish(row_axpy(w_down_t, c, rows), x, w_down_t.scalar_type());
}

// D-COUNTDOWN practical: keep [B, I] bool given (the predictor's decision); kept rows of all three
at::Tensor masked_ffn(const at::Tensor& x, const at::Tensor& keep_t, const at::Tensor& w_gate,
                      const at::Tensor& w_up, const at::Tensor& w_down_t, int64_t act) {
  check_weight(w_gate, "w_gate"); check_weight(w_up, "w_up"); check_weight(w_down_t, "w_down_t");
  const int64_t H = w_gate.size(1), I = w_gate.size(0);
  auto x32 = as_rows(x, H);
  const int64_t B = x32.size(0);
  auto k8 = keep_t.reshape({B, I}).to(at::kByte).contiguous();
  std::vector<uint8_t> keep(k8.data_ptr<uint8_t>(), k8.data_ptr<uint8_t>() + B * I);
  auto rows = union_rows(keep, B, I);
  const int64_t n = rows.numel();
  auto g = row_dot(w_gate, x32, rows), u = row_dot(w_up, x32, rows);
  float* gp = g.data_ptr<float>();
  const float* up = u.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < n; ++j)
      gp[b * n + j] = keep[b * I + r[j]] ? act_f(gp[b * n + j], act) * up[b * n + j] : 0.f;
  return finish(row_axpy(w_down_t, g, rows), x, w_down_t.scalar_type());
}

// TEAL / WINA: y = sum over input channels j with |x_j| * scale_j > thr of x_j * w_t[j]; w_t [K, N]
at::Tensor input_sparse_linear(const at::Tensor& x, const at::Tensor& w_t, const at::Tensor& thr,
                               const c10::optional<at::Tensor>& channel_scale) {
  check_weight(w_t, "w_t");
  const int64_t K = w_t.size(0);
  auto x32 = as_rows(x, K);
  const int64_t B = x32.size(0);
  at::Tensor thr32;
  Thr th = thr_of(thr, K, thr32);
  const float* sp = nullptr;
  at::Tensor scale;
  if (channel_scale.has_value()) {
    scale = channel_scale->to(at::kFloat).contiguous();
    TORCH_CHECK(scale.numel() == K, "channel_scale must hold ", K, " values");
    sp = scale.data_ptr<float>();
  }
  const float* xp = x32.data_ptr<float>();
  std::vector<uint8_t> keep(B * K);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < K; ++j) {
      float s = std::fabs(xp[b * K + j]);
      keep[b * K + j] = (sp ? s * sp[j] : s) > th[j];
    }
  auto rows = union_rows(keep, B, K);
  const int64_t n = rows.numel();
  auto c = at::empty({B, n}, x32.options());
  float* cp = c.data_ptr<float>();
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < n; ++j) cp[b * n + j] = keep[b * K + r[j]] ? xp[b * K + r[j]] : 0.f;
  return finish(row_axpy(w_t, c, rows), x, x.scalar_type());
}

bool simd() { return CD_AVX2; }

// Registered as torch ops (namespace countdown_cpu, CPU kernels here, fake kernels in Python beside the
// wrappers), so torch.compile traces a decode step through them without a graph break.
TORCH_LIBRARY(countdown_cpu, m) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  m.set_python_module("countdown.kernels.cpu");
#else
  m.impl_abstract_pystub("countdown.kernels.cpu");
#endif
  m.def("linear(Tensor x, Tensor W) -> Tensor");
  m.def("linear_input_major(Tensor x, Tensor W_t) -> Tensor");
  m.def("fused_gather_ffn(Tensor x, Tensor w_dense, Tensor w_sparse, Tensor w_down_t, Tensor thr, int act, "
        "bool dense_is_gate, bool score_act, bool is_signed) -> Tensor");
  m.def("coefficient_ffn(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, Tensor thr, int act) -> Tensor");
  m.def("masked_ffn(Tensor x, Tensor keep, Tensor w_gate, Tensor w_up, Tensor w_down_t, int act) -> Tensor");
  m.def("input_sparse_linear(Tensor x, Tensor w_t, Tensor thr, Tensor? channel_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(countdown_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("linear_input_major", &linear_input_major);
  m.impl("fused_gather_ffn", &fused_gather_ffn);
  m.impl("coefficient_ffn", &coefficient_ffn);
  m.impl("masked_ffn", &masked_ffn);
  m.impl("input_sparse_linear", &input_sparse_linear);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear);
  m.def("linear_input_major", &linear_input_major);
  m.def("fused_gather_ffn", &fused_gather_ffn);
  m.def("coefficient_ffn", &coefficient_ffn);
  m.def("masked_ffn", &masked_ffn);
  m.def("input_sparse_linear", &input_sparse_linear);
  m.def("simd", &simd);
}
