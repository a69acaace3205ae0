// Fused MEC pooled lookup on CPU: reads codes[id, l] inside the pooling loop, so the L-fold
// code ids of the remap path never exist in memory.
//
// Both passes go feature by feature over chunks of samples (one feature's codebooks, ids and
// offsets stay hot in cache) and run a kernel specialised at compile time for the feature's code
// type, L and D / L: a bag's pooled row is summed in vector registers and stored once, bypassing
// the caches (forward), and a bag's output gradient is loaded into registers once and added to
// the L codebook rows of each id (backward). Code, codebook and gradient rows are prefetched.
// Other shapes take a generic loop. Forward is parallel over samples; backward over groups of
// features that share inner tables (no two tasks write one gradient, no per-thread buffers).
//
// Plan (per outer feature f, in outer order; lookup features j in lookup order):
//   feat_start[F+1]: f's lookup features are [feat_start[f], feat_start[f+1])
//   feat_code[F]:    index into `codes` (-1: full table, ids read the table directly)
//   feat_mean[F]:    1 if MEAN pooled
//   lk_table/lk_dim/lk_col[J]: inner table, dim and first output column of lookup feature j
//   lk_feat[J]:      outer feature of lookup feature j
//   table_ptr[T+1] / table_lk: the lookup features reading each inner table (CSR)
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// Each kernel is compiled for AVX-512 (x86-64-v4), AVX2 + FMA (v3) and the baseline; the loader
// picks the best the CPU has, so one build runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MEC_CLONES
#endif

namespace {

// 8 or 4 floats in a register (GCC/clang vector extension); memory is read and written through
// load / store, which allow any 4-byte alignment.
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

template <int S>
using Vec = std::conditional_t<S % 8 == 0, v8, v4>;

template <typename V>
__attribute__((always_inline)) inline V load(const float* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
__attribute__((always_inline)) inline void store(float* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// A store that bypasses the caches (no read of the line first), for 16-byte aligned output.
template <typename V>
__attribute__((always_inline)) inline void stream(float* p, V v) {
#if defined(__x86_64__)
  for (size_t h = 0; h < sizeof(V) / 16; ++h) {
    __m128 x;
    __builtin_memcpy(&x, reinterpret_cast<const char*>(&v) + 16 * h, 16);
    _mm_stream_ps(p + 4 * h, x);
  }
#else
  store(p, v);
#endif
}

constexpr int kPrefetch = 32;      // ids ahead whose code row (or full-table row) is prefetched
constexpr int kPrefetchNear = 12;  // ids ahead whose codebook rows are prefetched
constexpr int kPrefetchRows = 8;   // samples ahead whose output gradient is prefetched
// Samples per pass over the features: their output rows (a page or more each) stay within the
// TLB's reach, and each feature's codebooks serve hundreds of bags per visit.
constexpr int64_t kChunk = 512;

struct Full {};  // the "code type" of a full table: the id is the row

// One outer feature, resolved for this call.
struct Feature {
  int64_t f = 0;
  int kind = -1;  // -1 full table, -2 int8 row-wise (serving), else the code dtype: 0 uint8,
                  // 1 int16, 2 int32, 3 int64
  const void* codes = nullptr;  // its codes [N, L] (int8 row-wise: its first row)
  int64_t code_cols = 1;        // L of the codes (int8 row-wise: bytes per row)
  int64_t j0 = 0, j1 = 0; // its lookup features
  int64_t sub = 0;        // floats per lookup feature when equal and adjacent in the output, else 0
  int64_t col = 0;        // first output column
  int64_t cols = 0;       // output columns
  bool mean = false;
};

struct Bags {
  const int64_t* id;
  const int64_t* off;  // [F * B + 1]
  const float* sw;     // per-id weights or nullptr
  int64_t batch;
};

int code_kind(const torch::Tensor& c) {
  switch (c.scalar_type()) {
    case at::kByte: return 0;
    case at::kShort: return 1;
    case at::kInt: return 2;
    case at::kLong: return 3;
    default: TORCH_CHECK(false, "codes must be uint8, int16, int32 or int64, got ", c.scalar_type());
  }
}

inline int64_t read_code(const void* codes, int kind, int64_t at) {
  switch (kind) {
    case 0: return static_cast<const uint8_t*>(codes)[at];
    case 1: return static_cast<const int16_t*>(codes)[at];
    case 2: return static_cast<const int32_t*>(codes)[at];
    default: return static_cast<const int64_t*>(codes)[at];
  }
}

std::vector<Feature> features(const std::vector<torch::Tensor>& codes,
                              const std::vector<int64_t>& feat_start,
                              const std::vector<int64_t>& feat_code,
                              const std::vector<int64_t>& feat_mean,
                              const std::vector<int64_t>& lk_dim,
                              const std::vector<int64_t>& lk_col) {
  std::vector<Feature> out(feat_code.size());
  for (size_t f = 0; f < out.size(); ++f) {
    Feature& ft = out[f];
    ft.f = static_cast<int64_t>(f);
    ft.j0 = feat_start[f];
    ft.j1 = feat_start[f + 1];
    ft.mean = feat_mean[f] != 0;
    ft.col = lk_col[ft.j0];
    ft.cols = lk_col[ft.j1 - 1] + lk_dim[ft.j1 - 1] - ft.col;
    ft.sub = lk_dim[ft.j0];
    for (int64_t j = ft.j0; j < ft.j1; ++j) {
      if (lk_dim[j] != ft.sub || lk_col[j] != ft.col + (j - ft.j0) * ft.sub) ft.sub = 0;
    }
    if (feat_code[f] >= 0) {
      const auto& c = codes[feat_code[f]];
      TORCH_CHECK(c.dim() == 2 && c.is_contiguous() && c.device().is_cpu() &&
                      c.size(1) == ft.j1 - ft.j0,
                  "codes must be contiguous CPU [N, L] with L = the feature's subspaces");
      ft.kind = code_kind(c);
      ft.codes = c.data_ptr();
      ft.code_cols = c.size(1);
    }
  }
  return out;
}

template <typename Code>
__attribute__((always_inline)) inline int64_t code_at(const Code* codes, int64_t row, int64_t l,
                                                      int64_t L) {
  if constexpr (std::is_same_v<Code, Full>) {
    return row;
  } else {
    return static_cast<int64_t>(codes[row * L + l]);
  }
}

// Prefetches what id i + kPrefetch reads first (its code row, or its row of a full table), and
// for a compressed table the codebook rows of id i + kPrefetchNear (whose codes are then here).
template <typename Code, int L, int S>
__attribute__((always_inline)) inline void prefetch_ahead(const Code* codes,
                                                          const float* const* tables,
                                                          const int64_t* id, int64_t i,
                                                          int64_t last) {
  if constexpr (std::is_same_v<Code, Full>) {
    if (i + kPrefetch < last) {
      for (int k = 0; k < S; k += 16) __builtin_prefetch(tables[0] + id[i + kPrefetch] * S + k);
    }
  } else {
    if (i + kPrefetch < last) __builtin_prefetch(codes + id[i + kPrefetch] * L);
    if (i + kPrefetchNear < last) {
      const int64_t row = id[i + kPrefetchNear];
      for (int l = 0; l < L; ++l) {
        const float* r = tables[l] + static_cast<int64_t>(codes[row * L + l]) * S;
        for (int k = 0; k < S; k += 16) __builtin_prefetch(r + k);
      }
    }
  }
}

// Pooled rows of samples [b0, b1) of one feature: L lookup features of S floats each.
template <typename Code, int L, int S>
MEC_CLONES void pool_fast(const Feature& ft, const float* const* tables, const Bags& bags,
                          int64_t b0, int64_t b1, float* out, int64_t stride) {
  using V = Vec<S>;
  constexpr int W = sizeof(V) / sizeof(float);
  constexpr int N = S / W;
  const Code* codes = static_cast<const Code*>(ft.codes);
  const float* tab[L];
  for (int l = 0; l < L; ++l) tab[l] = tables[l];
  const int64_t* off = bags.off + ft.f * bags.batch;
  const int64_t* id = bags.id;
  const int64_t last = off[bags.batch];
  const bool aligned = reinterpret_cast<uintptr_t>(out) % 16 == 0 && stride % 4 == 0 && ft.col % 4 == 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = off[b], e = off[b + 1];
    V acc[L * N] = {};
    for (int64_t i = s; i < e; ++i) {
      prefetch_ahead<Code, L, S>(codes, tab, id, i, last);
      const int64_t row = id[i];
      const float w = bags.sw ? bags.sw[i] : 1.f;
      for (int l = 0; l < L; ++l) {
        const float* r = tab[l] + code_at(codes, row, l, L) * S;
        for (int n = 0; n < N; ++n) acc[l * N + n] += w * load<V>(r + n * W);
      }
    }
    if (ft.mean && e > s) {
      const float scale = 1.f / static_cast<float>(e - s);
      for (int x = 0; x < L * N; ++x) acc[x] *= scale;
    }
    float* o = out + b * stride + ft.col;
    if (aligned) {
      for (int x = 0; x < L * N; ++x) stream(o + x * W, acc[x]);
    } else {
      for (int x = 0; x < L * N; ++x) store(o + x * W, acc[x]);
    }
  }
}

// Adds the output gradient of every bag of one feature to the rows its ids read.
template <typename Code, int L, int S>
MEC_CLONES void scatter_fast(const Feature& ft, float* const* grads, const Bags& bags,
                             int64_t b0, int64_t b1, const float* g, int64_t g_stride) {
  using V = Vec<S>;
  constexpr int W = sizeof(V) / sizeof(float);
  constexpr int N = S / W;
  const Code* codes = static_cast<const Code*>(ft.codes);
  float* grad[L];
  for (int l = 0; l < L; ++l) grad[l] = grads[l];
  const int64_t* off = bags.off + ft.f * bags.batch;
  const int64_t* id = bags.id;
  const int64_t last = off[bags.batch];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = off[b], e = off[b + 1];
    if (s == e) continue;
    const float scale = ft.mean ? 1.f / static_cast<float>(e - s) : 1.f;
    const float* g_row = g + b * g_stride + ft.col;
    // Rows of the output gradient lie a page or more apart: no hardware prefetcher follows them.
    if (b + kPrefetchRows < b1) {
      for (int k = 0; k < L * S; k += 16) __builtin_prefetch(g_row + kPrefetchRows * g_stride + k);
    }
    V gv[L * N];
    for (int x = 0; x < L * N; ++x) gv[x] = scale * load<V>(g_row + x * W);
    for (int64_t i = s; i < e; ++i) {
      prefetch_ahead<Code, L, S>(codes, grad, id, i, last);
      const int64_t row = id[i];
      const float w = bags.sw ? bags.sw[i] : 1.f;
      for (int l = 0; l < L; ++l) {
        float* r = grad[l] + code_at(codes, row, l, L) * S;
        for (int n = 0; n < N; ++n) store(r + n * W, load<V>(r + n * W) + w * gv[l * N + n]);
      }
    }
  }
}

// Any shape: lookup features of any dims and columns, any code dtype.
void pool_generic(const Feature& ft, const float* const* tables, const int64_t* dims,
                  const int64_t* cols, const Bags& bags, int64_t b0, int64_t b1, float* out,
                  int64_t stride) {
  const int64_t* off = bags.off + ft.f * bags.batch;
  for (int64_t b = b0; b < b1; ++b) {
    float* o = out + b * stride;
    std::fill(o + ft.col, o + ft.col + ft.cols, 0.f);
    const int64_t s = off[b], e = off[b + 1];
    for (int64_t i = s; i < e; ++i) {
      const float w = bags.sw ? bags.sw[i] : 1.f;
      for (int64_t l = 0; l < ft.j1 - ft.j0; ++l) {
        const int64_t row = ft.kind < 0 ? bags.id[i]
                                        : read_code(ft.codes, ft.kind, bags.id[i] * ft.code_cols + l);
        const float* r = tables[l] + row * dims[l];
        float* dst = o + cols[l];
        for (int64_t k = 0; k < dims[l]; ++k) dst[k] += w * r[k];
      }
    }
    if (ft.mean && e > s) {
      const float scale = 1.f / static_cast<float>(e - s);
      for (int64_t k = ft.col; k < ft.col + ft.cols; ++k) o[k] *= scale;
    }
  }
}

void scatter_generic(const Feature& ft, float* const* grads, const int64_t* dims,
                     const int64_t* cols, const Bags& bags, int64_t b0, int64_t b1,
                     const float* g, int64_t g_stride) {
  const int64_t* off = bags.off + ft.f * bags.batch;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t s = off[b], e = off[b + 1];
    if (s == e) continue;
    const float scale = ft.mean ? 1.f / static_cast<float>(e - s) : 1.f;
    const float* g_row = g + b * g_stride;
    for (int64_t i = s; i < e; ++i) {
      const float w = bags.sw ? bags.sw[i] * scale : scale;
      for (int64_t l = 0; l < ft.j1 - ft.j0; ++l) {
        const int64_t row = ft.kind < 0 ? bags.id[i]
                                        : read_code(ft.codes, ft.kind, bags.id[i] * ft.code_cols + l);
        float* r = grads[l] + row * dims[l];
        const float* src = g_row + cols[l];
        for (int64_t k = 0; k < dims[l]; ++k) r[k] += w * src[k];
      }
    }
  }
}

using PoolFn = void (*)(const Feature&, const float* const*, const Bags&, int64_t, int64_t,
                        float*, int64_t);
using ScatterFn = void (*)(const Feature&, float* const*, const Bags&, int64_t, int64_t,
                           const float*, int64_t);

struct Kernels {
  PoolFn pool = nullptr;
  ScatterFn scatter = nullptr;
};

template <typename Code, int L, int S>
Kernels kernels() {
  return {&pool_fast<Code, L, S>, &scatter_fast<Code, L, S>};
}

template <typename Code>
Kernels compressed_kernels(int64_t L, int64_t S) {
  // The shapes of D / L in {4, ..., 64} with L * (D / L) <= 128 floats (registers).
#define MEC_CASE(l, s) \
  if (L == l && S == s) return kernels<Code, l, s>();
  MEC_CASE(2, 4) MEC_CASE(2, 8) MEC_CASE(2, 16) MEC_CASE(2, 32) MEC_CASE(2, 64)
  MEC_CASE(4, 4) MEC_CASE(4, 8) MEC_CASE(4, 16) MEC_CASE(4, 32)
  MEC_CASE(8, 4) MEC_CASE(8, 8) MEC_CASE(8, 16)
  MEC_CASE(16, 4) MEC_CASE(16, 8)
#undef MEC_CASE
  return {};
}

// The specialised kernels of a feature, or nulls for the generic loops.
Kernels select(const Feature& ft) {
  if (ft.sub == 0) return {};
  if (ft.kind < 0) {
    switch (ft.sub) {
      case 4: return kernels<Full, 1, 4>();
      case 8: return kernels<Full, 1, 8>();
      case 16: return kernels<Full, 1, 16>();
      case 32: return kernels<Full, 1, 32>();
      case 64: return kernels<Full, 1, 64>();
      case 128: return kernels<Full, 1, 128>();
      default: return {};
    }
  }
  if (ft.kind == 0) return compressed_kernels<uint8_t>(ft.j1 - ft.j0, ft.sub);
  if (ft.kind == 1) return compressed_kernels<int16_t>(ft.j1 - ft.j0, ft.sub);
  return {};
}

void check_inputs(const torch::Tensor& ids, const torch::Tensor& offsets,
                  const c10::optional<torch::Tensor>& psw, int64_t num_bags) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "ids: contiguous CPU int64");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() &&
                  offsets.numel() == num_bags + 1,
              "offsets: contiguous int64 of F * B + 1");
  if (psw.has_value()) {
    TORCH_CHECK(psw->scalar_type() == at::kFloat && psw->is_contiguous() &&
                    psw->numel() == ids.numel(),
                "per-sample weights: contiguous float32, one per id");
  }
}

std::vector<torch::Tensor> contiguous(const std::vector<torch::Tensor>& tensors) {
  std::vector<torch::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

// Per lookup feature j: the data of its inner table.
template <typename T>
std::vector<T*> per_lookup(const std::vector<torch::Tensor>& tensors,
                           const std::vector<int64_t>& lk_table) {
  for (const auto& w : tensors) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.device().is_cpu() &&
                    w.dim() == 2,
                "weights: contiguous CPU float32 [rows, dim]");
  }
  std::vector<T*> out;
  for (const int64_t t : lk_table) out.push_back(tensors[t].data_ptr<float>());
  return out;
}

// Bags of one feature over int8 row-wise rows (D bytes, float32 scale and bias): dequantized and
// summed (times the per-id weights), then divided by the bag length for a mean feature.
MEC_CLONES void pool_packed(const Feature& ft, const Bags& bags, int64_t b0, int64_t b1,
                            float* out, int64_t stride) {
  const int64_t* off = bags.off + ft.f * bags.batch;
  const uint8_t* rows = static_cast<const uint8_t*>(ft.codes);
  const int64_t width = ft.cols, row_bytes = ft.code_cols;
  for (int64_t b = b0; b < b1; ++b) {
    float* o = out + b * stride + ft.col;
    std::fill(o, o + width, 0.f);
    const int64_t s = off[b], e = off[b + 1];
    for (int64_t i = s; i < e; ++i) {
      const uint8_t* r = rows + bags.id[i] * row_bytes;
      float step, bias;
      std::memcpy(&step, r + width, sizeof(float));
      std::memcpy(&bias, r + width + sizeof(float), sizeof(float));
      if (bags.sw) {
        step *= bags.sw[i];
        bias *= bags.sw[i];
      }
      for (int64_t k = 0; k < width; ++k) o[k] += r[k] * step + bias;
    }
    if (ft.mean && e > s) {
      const float scale = 1.f / static_cast<float>(e - s);
      for (int64_t k = 0; k < width; ++k) o[k] *= scale;
    }
  }
}

// Pools every feature of a batch into out [batch, total_dim], chunk by chunk of samples (the
// training forward and serve_pooled): each output element is written once, by its feature.
void pool_features(const std::vector<Feature>& feats, const std::vector<Kernels>& kern,
                   const float* const* tables, const int64_t* dims, const int64_t* cols,
                   const Bags& bags, int64_t total_dim, float* out) {
  at::parallel_for(0, bags.batch, 256, [&](int64_t begin, int64_t end) {
    for (int64_t b0 = begin; b0 < end; b0 += kChunk) {
      const int64_t b1 = std::min(end, b0 + kChunk);
      for (const auto& ft : feats) {
        const float* const* tab = tables + ft.j0;
        if (ft.kind == -2) {
          pool_packed(ft, bags, b0, b1, out, total_dim);
        } else if (kern[ft.f].pool) {
          kern[ft.f].pool(ft, tab, bags, b0, b1, out, total_dim);
        } else {
          pool_generic(ft, tab, dims + ft.j0, cols + ft.j0, bags, b0, b1, out, total_dim);
        }
      }
    }
#if defined(__x86_64__)
    _mm_sfence();
#endif
  });
}

torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& offsets,
                      const c10::optional<torch::Tensor>& psw,
                      const std::vector<torch::Tensor>& weights_in,
                      const std::vector<torch::Tensor>& codes_in, int64_t batch, int64_t total_dim,
                      const std::vector<int64_t>& feat_start, const std::vector<int64_t>& feat_code,
                      const std::vector<int64_t>& feat_mean, const std::vector<int64_t>& lk_table,
                      const std::vector<int64_t>& lk_dim, const std::vector<int64_t>& lk_col) {
  const int64_t F = static_cast<int64_t>(feat_code.size());
  check_inputs(ids, offsets, psw, F * batch);
  const auto weights = contiguous(weights_in);
  const auto codes = contiguous(codes_in);
  const auto feats = features(codes, feat_start, feat_code, feat_mean, lk_dim, lk_col);
  std::vector<Kernels> kern;
  for (const auto& ft : feats) kern.push_back(select(ft));
  const auto tables = per_lookup<const float>(weights, lk_table);
  const Bags bags{ids.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                  psw.has_value() ? psw->data_ptr<float>() : nullptr, batch};
  // Every output element is written once, by the kernel of its feature.
  auto out = torch::empty({batch, total_dim}, ids.options().dtype(at::kFloat));
  pool_features(feats, kern, tables.data(), lk_dim.data(), lk_col.data(), bags, total_dim,
                out.data_ptr<float>());
  return out;
}

// Features that share an inner table, as groups (union-find over the tables' readers).
std::vector<std::vector<int64_t>> table_groups(int64_t F, const std::vector<int64_t>& lk_feat,
                                               const std::vector<int64_t>& table_ptr,
                                               const std::vector<int64_t>& table_lk) {
  std::vector<int64_t> parent(F);
  std::iota(parent.begin(), parent.end(), 0);
  auto root = [&](int64_t x) {
    while (parent[x] != x) x = parent[x] = parent[parent[x]];
    return x;
  };
  for (size_t t = 0; t + 1 < table_ptr.size(); ++t) {
    for (int64_t x = table_ptr[t] + 1; x < table_ptr[t + 1]; ++x) {
      parent[root(lk_feat[table_lk[x]])] = root(lk_feat[table_lk[table_ptr[t]]]);
    }
  }
  std::vector<std::vector<int64_t>> groups;
  std::vector<int64_t> index(F, -1);
  for (int64_t f = 0; f < F; ++f) {
    const int64_t r = root(f);
    if (index[r] < 0) {
      index[r] = static_cast<int64_t>(groups.size());
      groups.emplace_back();
    }
    groups[index[r]].push_back(f);
  }
  return groups;
}

std::vector<torch::Tensor> backward(
    const torch::Tensor& grad_out_in, const torch::Tensor& ids, const torch::Tensor& offsets,
    const c10::optional<torch::Tensor>& psw, const std::vector<torch::Tensor>& weights_in,
    const std::vector<torch::Tensor>& codes_in, int64_t batch,
    const std::vector<int64_t>& feat_start,
    const std::vector<int64_t>& feat_code, const std::vector<int64_t>& feat_mean,
    const std::vector<int64_t>& lk_table, const std::vector<int64_t>& lk_dim,
    const std::vector<int64_t>& lk_col, const std::vector<int64_t>& lk_feat,
    const std::vector<int64_t>& table_ptr, const std::vector<int64_t>& table_lk, bool psw_grad) {
  const int64_t F = static_cast<int64_t>(feat_code.size());
  check_inputs(ids, offsets, psw, F * batch);
  // Read grad_out in place where its rows are contiguous; a row-broadcast gradient (e.g. of
  // out.sum()) is read as one row with row stride 0 instead of being materialised.
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == batch, "grad_out: [B, total dim]");
  auto grad_out = grad_out_in.to(at::kFloat);
  int64_t g_stride = grad_out.stride(0);
  if (batch > 1 && g_stride == 0) {
    grad_out = grad_out.select(0, 0).contiguous();
  } else if (grad_out.stride(1) != 1) {
    grad_out = grad_out.contiguous();
    g_stride = grad_out.size(1);
  }
  const float* g = grad_out.data_ptr<float>();
  const auto codes = contiguous(codes_in);
  const auto feats = features(codes, feat_start, feat_code, feat_mean, lk_dim, lk_col);
  // The weights' values are read only for the per-sample weights' gradient.
  const auto weights = psw_grad && psw.has_value() ? contiguous(weights_in) : weights_in;
  std::vector<torch::Tensor> grads;
  for (const auto& w : weights) grads.push_back(torch::zeros(w.sizes(), w.options()));
  const auto grad_ptrs = per_lookup<float>(grads, lk_table);
  const auto tables = psw_grad && psw.has_value() ? per_lookup<const float>(weights, lk_table)
                                                  : std::vector<const float*>();
  const Bags bags{ids.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
                  psw.has_value() ? psw->data_ptr<float>() : nullptr, batch};
  // Groups go to threads largest first (cost: ids x columns), each to the least loaded thread.
  std::vector<Kernels> kern;
  for (const auto& ft : feats) kern.push_back(select(ft));
  const auto groups = table_groups(F, lk_feat, table_ptr, table_lk);
  const int64_t* off = bags.off;
  auto cost = [&](const std::vector<int64_t>& group) {
    int64_t c = 0;
    for (const int64_t f : group) c += (off[(f + 1) * batch] - off[f * batch] + batch) * feats[f].cols;
    return c;
  };
  std::vector<size_t> order(groups.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return cost(groups[a]) > cost(groups[b]); });
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                static_cast<int64_t>(groups.size())));
  std::vector<std::vector<int64_t>> part_features(parts);
  std::vector<int64_t> load(parts, 0);
  for (const size_t x : order) {
    const auto p = std::min_element(load.begin(), load.end()) - load.begin();
    load[p] += cost(groups[x]);
    part_features[p].insert(part_features[p].end(), groups[x].begin(), groups[x].end());
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t b0 = 0; b0 < batch; b0 += kChunk) {
        const int64_t b1 = std::min(batch, b0 + kChunk);
        for (const int64_t f : part_features[p]) {
          const Feature& ft = feats[f];
          float* const* gr = grad_ptrs.data() + ft.j0;
          if (kern[f].scatter) {
            kern[f].scatter(ft, gr, bags, b0, b1, g, g_stride);
          } else {
            scatter_generic(ft, gr, lk_dim.data() + ft.j0, lk_col.data() + ft.j0, bags, b0, b1, g,
                            g_stride);
          }
        }
      }
    }
  });
  torch::Tensor gsw;
  if (psw_grad && bags.sw) {
    gsw = torch::zeros_like(*psw);
    float* gs = gsw.data_ptr<float>();
    at::parallel_for(0, F * batch, 64, [&](int64_t begin, int64_t end) {
      for (int64_t fb = begin; fb < end; ++fb) {
        const Feature& ft = feats[fb / batch];
        const int64_t s = off[fb], e = off[fb + 1];
        if (s == e) continue;
        const float scale = ft.mean ? 1.f / static_cast<float>(e - s) : 1.f;
        const float* g_row = g + (fb % batch) * g_stride;
        for (int64_t i = s; i < e; ++i) {
          float acc = 0.f;
          for (int64_t j = ft.j0; j < ft.j1; ++j) {
            const int64_t l = j - ft.j0;
            const int64_t row = ft.kind < 0
                                    ? bags.id[i]
                                    : read_code(ft.codes, ft.kind, bags.id[i] * ft.code_cols + l);
            const float* r = tables[j] + row * lk_dim[j];
            for (int64_t k = 0; k < lk_dim[j]; ++k) acc += g_row[lk_col[j] + k] * r[k];
          }
          gs[i] = acc * scale;
        }
      }
    });
  }
  grads.push_back(gsw);
  return grads;
}

template <typename T>
int64_t first_out_of_range_of(const T* v, const int64_t* length_per_key, const int64_t* sizes,
                              int64_t F) {
  int64_t start = 0;
  for (int64_t f = 0; f < F; ++f) {
    const int64_t n = length_per_key[f];
    const uint64_t size = static_cast<uint64_t>(sizes[f]);
    bool bad = false;  // one branch-free pass per feature; the position only when needed
    for (int64_t k = 0; k < n; ++k) bad |= static_cast<uint64_t>(static_cast<int64_t>(v[start + k])) >= size;
    if (bad) {
      for (int64_t k = 0; k < n; ++k) {
        if (static_cast<uint64_t>(static_cast<int64_t>(v[start + k])) >= size) return start + k;
      }
    }
    start += n;
  }
  return -1;
}

int64_t first_out_of_range_in(const torch::Tensor& values, const int64_t* length_per_key,
                              const int64_t* sizes, int64_t F) {
  const auto v = values.scalar_type() == at::kInt ? values.contiguous()
                                                  : values.to(at::kLong).contiguous();
  if (v.scalar_type() == at::kInt) {
    return first_out_of_range_of(v.data_ptr<int32_t>(), length_per_key, sizes, F);
  }
  return first_out_of_range_of(v.data_ptr<int64_t>(), length_per_key, sizes, F);
}

// Position of the first id outside [0, size of its feature), or -1: one pass over the ids of
// each feature (``length_per_key`` ids each).
int64_t first_out_of_range(const torch::Tensor& values, const std::vector<int64_t>& length_per_key,
                           const std::vector<int64_t>& sizes) {
  TORCH_CHECK(values.device().is_cpu() && values.dim() == 1, "ids: 1-D CPU tensor");
  TORCH_CHECK(length_per_key.size() == sizes.size(), "one size per feature");
  TORCH_CHECK(std::accumulate(length_per_key.begin(), length_per_key.end(), int64_t{0}) ==
                  values.numel(),
              "length_per_key must sum to the number of ids");
  return first_out_of_range_in(values, length_per_key.data(), sizes.data(), sizes.size());
}

// Whether a serving batch is valid, in one pass (torch.ops.mec_lookup.ids_in_range): integer
// ids, bag lengths [F * B] (feature-major, B >= 1) non-negative and summing to the number of ids,
// every id of feature f in [0, sizes[f]). False sends the caller to its exact (slower) checks.
bool ids_in_range(const torch::Tensor& values, const torch::Tensor& lengths,
                  const torch::Tensor& sizes) {
  TORCH_CHECK(values.dim() == 1 && lengths.dim() == 1 && sizes.dim() == 1,
              "ids_in_range: 1-D values, lengths and sizes");
  const int64_t F = sizes.numel(), n = lengths.numel();
  if (!at::isIntegralType(values.scalar_type(), /*includeBool=*/false) || F == 0 || n == 0 ||
      n % F != 0) {
    return false;
  }
  const auto len = lengths.to(at::kLong).contiguous();
  const auto bounds = sizes.to(at::kLong).contiguous();
  const int64_t* l = len.data_ptr<int64_t>();
  const int64_t B = n / F;
  std::vector<int64_t> per_feature(F, 0);
  for (int64_t f = 0; f < F; ++f) {
    for (int64_t b = 0; b < B; ++b) {
      if (l[f * B + b] < 0) return false;
      per_feature[f] += l[f * B + b];
    }
  }
  if (std::accumulate(per_feature.begin(), per_feature.end(), int64_t{0}) != values.numel()) {
    return false;
  }
  return first_out_of_range_in(values, per_feature.data(), bounds.data_ptr<int64_t>(), F) == -1;
}

// Serving, one id per bag (mec_torchrec/export/fused.py, the stacked artifact layout): for sample
// b and feature f with id v = values[f * B + b], slot l of the output row is the weight row
// plan[f][l] + codes[plan[f][L] + v][l] for a compressed feature, plan[f][l] + v * L for a full
// one (plan[f][L + 1] says which); times per_id[f * B + b] when given. The ids were checked.
// Two passes: the code rows (random reads of a large table) are gathered first, in id order with
// prefetching, into weight-row indices; then each sample's output row is written once.
// The int8 row-wise tables of a serving request (serve_one_hot's packed / packed_plan): rows of
// `width` bytes then a float32 scale and bias; plan [F, 2] = (first row, whether f reads them).
struct Packed {
  const uint8_t* rows = nullptr;
  const int64_t* plan = nullptr;
  int64_t row_bytes = 0;
};

// Second pass of serve_one_hot: sample b's output row is its F * L weight rows (d floats each,
// a compile-time D when nonzero), times the per-id weight when given; a feature that reads the
// int8 tables gets its dequantized row (q * scale + bias, times the weight) instead.
template <int D, bool kPacked>
void serve_rows(const int64_t* rows, const float* weight, const float* per_id, int64_t F,
                int64_t B, int64_t L, int64_t d, float* out, const int64_t* ids,
                const Packed& packed) {
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* dst = out + b * F * L * d;
      for (int64_t f = 0; f < F; ++f) {
        const int64_t* r = rows + (f * B + b) * L;
        const float scale = per_id ? per_id[f * B + b] : 1.f;
        if (kPacked && packed.plan[2 * f + 1]) {
          const int64_t width = L * d;
          const uint8_t* src = packed.rows + (packed.plan[2 * f] + ids[f * B + b]) * packed.row_bytes;
          float step, bias;
          std::memcpy(&step, src + width, sizeof(float));
          std::memcpy(&bias, src + width + sizeof(float), sizeof(float));
          for (int64_t k = 0; k < width; ++k) dst[k] = (src[k] * step + bias) * scale;
          dst += width;
          continue;
        }
        for (int64_t l = 0; l < L; ++l, dst += d) {
          const float* src = weight + r[l] * d;
          if (D > 0) {
            __builtin_memcpy(dst, src, D * sizeof(float));
          } else if (per_id) {
            for (int64_t k = 0; k < d; ++k) dst[k] = src[k] * scale;
          } else {
            std::copy(src, src + d, dst);
          }
        }
      }
    }
  });
}

// serve_rows with fixed-size row copies for the usual sub-vector widths (and the int8 branch
// compiled in only where int8 tables are served).
template <bool kPacked>
void serve_rows_of(const int64_t* rows, const float* weight, const float* per_id, int64_t F,
                   int64_t B, int64_t L, int64_t d, float* out, const int64_t* ids,
                   const Packed& packed) {
  switch (per_id ? 0 : d) {
    case 8:
      serve_rows<8, kPacked>(rows, weight, per_id, F, B, L, d, out, ids, packed);
      break;
    case 16:
      serve_rows<16, kPacked>(rows, weight, per_id, F, B, L, d, out, ids, packed);
      break;
    case 32:
      serve_rows<32, kPacked>(rows, weight, per_id, F, B, L, d, out, ids, packed);
      break;
    default:
      serve_rows<0, kPacked>(rows, weight, per_id, F, B, L, d, out, ids, packed);
  }
}

template <typename C>
void serve_one_hot_of(const int64_t* ids, const C* codes, const float* weight, const int64_t* plan,
                      const float* per_id, int64_t F, int64_t B, int64_t L, int64_t d, float* out,
                      const Packed& packed) {
  constexpr int64_t kAhead = 48;
  std::vector<int64_t> rows(F * B * L);
  at::parallel_for(0, F, 1, [&](int64_t f0, int64_t f1) {
    for (int64_t f = f0; f < f1; ++f) {
      if (packed.rows && packed.plan[2 * f + 1]) continue;  // int8 rows: read in the second pass
      const int64_t* p = plan + f * (L + 2);
      const int64_t* v = ids + f * B;
      int64_t* r = rows.data() + f * B * L;
      if (p[L + 1] == 0) {  // full table: row v * L + l of its chunks
        for (int64_t b = 0; b < B; ++b, r += L) {
          for (int64_t l = 0; l < L; ++l) r[l] = p[l] + v[b] * L;
        }
        continue;
      }
      const C* base = codes + p[L] * L;
      for (int64_t b = 0; b < B; ++b, r += L) {
        if (b + kAhead < B) __builtin_prefetch(base + v[b + kAhead] * L);
        const C* code = base + v[b] * L;
        for (int64_t l = 0; l < L; ++l) r[l] = p[l] + static_cast<int64_t>(code[l]);
      }
    }
  });
  if (packed.rows) {
    serve_rows_of<true>(rows.data(), weight, per_id, F, B, L, d, out, ids, packed);
  } else {
    serve_rows_of<false>(rows.data(), weight, per_id, F, B, L, d, out, ids, packed);
  }
}

torch::Tensor serve_one_hot(const torch::Tensor& values, const torch::Tensor& codes,
                            const torch::Tensor& weight, const torch::Tensor& feature_plan,
                            int64_t stride, const c10::optional<torch::Tensor>& per_id,
                            const c10::optional<torch::Tensor>& packed,
                            const c10::optional<torch::Tensor>& packed_plan) {
  TORCH_CHECK(values.device().is_cpu() && codes.device().is_cpu() && weight.device().is_cpu(),
              "serve_one_hot: CPU tensors");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 2, "weight: float [R, d]");
  const int64_t F = feature_plan.size(0), L = feature_plan.size(1) - 2, d = weight.size(1);
  TORCH_CHECK(codes.dim() == 2 && codes.size(1) == L, "codes: [rows, L]");
  TORCH_CHECK(values.numel() == F * stride, "one id per (feature, sample)");
  TORCH_CHECK(packed.has_value() == packed_plan.has_value(), "packed and packed_plan go together");
  const auto ids = values.to(at::kLong).contiguous();
  const auto plan = feature_plan.to(at::kLong).contiguous();
  const auto c = codes.contiguous();
  const auto w = weight.contiguous();
  torch::Tensor psw, rows8, plan8;
  if (per_id) psw = per_id->to(at::kFloat).contiguous();
  Packed p8;
  if (packed) {
    TORCH_CHECK(packed->device().is_cpu() && packed->scalar_type() == at::kByte &&
                    packed->dim() == 2 && packed->size(1) == L * d + 2 * int64_t(sizeof(float)),
                "packed: uint8 [rows, D + 8] (int8 row-wise), D = ", L * d);
    TORCH_CHECK(packed_plan->dim() == 2 && packed_plan->size(0) == F && packed_plan->size(1) == 2,
                "packed_plan: [F, 2]");
    rows8 = packed->contiguous();
    plan8 = packed_plan->to(at::kLong).contiguous();
    p8 = Packed{rows8.data_ptr<uint8_t>(), plan8.data_ptr<int64_t>(), rows8.size(1)};
  }
  auto out = torch::empty({stride, F * L * d}, weight.options());
  const float* pw = per_id ? psw.data_ptr<float>() : nullptr;
  switch (c.scalar_type()) {
    case at::kByte:
      serve_one_hot_of(ids.data_ptr<int64_t>(), c.data_ptr<uint8_t>(), w.data_ptr<float>(),
                       plan.data_ptr<int64_t>(), pw, F, stride, L, d, out.data_ptr<float>(), p8);
      break;
    case at::kShort:
      serve_one_hot_of(ids.data_ptr<int64_t>(), c.data_ptr<int16_t>(), w.data_ptr<float>(),
                       plan.data_ptr<int64_t>(), pw, F, stride, L, d, out.data_ptr<float>(), p8);
      break;
    case at::kInt:
      serve_one_hot_of(ids.data_ptr<int64_t>(), c.data_ptr<int32_t>(), w.data_ptr<float>(),
                       plan.data_ptr<int64_t>(), pw, F, stride, L, d, out.data_ptr<float>(), p8);
      break;
    default:
      TORCH_CHECK(false, "codes: uint8, int16 or int32, got ", c.scalar_type());
  }
  return out;
}

// The serving module's pooled lookup of any request (torch.ops.mec_lookup.serve_pooled): the
// training forward's pooling loops, with every table read from the serving module's stacked
// buffers. Per feature f, feature_plan [F, L + 2] holds the first row in `weight` [R, d] of each
// slot (compressed: codebook l starts at plan[f][l]; full: the table's [N, D] rows start at
// plan[f][0], a row being L consecutive d-rows), its first row in `codes` [rows, L] and whether
// it is compressed. ids are checked by the caller.
torch::Tensor serve_pooled(const torch::Tensor& values, const torch::Tensor& offsets,
                           const c10::optional<torch::Tensor>& per_id, const torch::Tensor& weight,
                           const torch::Tensor& codes, const torch::Tensor& feature_plan,
                           const torch::Tensor& feature_is_mean, int64_t stride,
                           const c10::optional<torch::Tensor>& packed,
                           const c10::optional<torch::Tensor>& packed_plan) {
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                  weight.is_contiguous(),
              "serve_pooled: weight must be contiguous CPU float32 [R, d]");
  TORCH_CHECK(codes.device().is_cpu() && codes.dim() == 2 && codes.is_contiguous(),
              "serve_pooled: codes must be contiguous CPU [rows, L]");
  const int64_t F = feature_plan.size(0), L = feature_plan.size(1) - 2, d = weight.size(1);
  TORCH_CHECK(codes.size(1) == L && feature_is_mean.numel() == F, "serve_pooled: plan shapes");
  const auto ids = values.to(at::kLong).contiguous();
  const auto off = offsets.to(at::kLong).contiguous();
  torch::Tensor psw;
  if (per_id) psw = per_id->to(at::kFloat).contiguous();
  check_inputs(ids, off, per_id ? c10::optional<torch::Tensor>(psw) : c10::nullopt, F * stride);
  const auto plan = feature_plan.to(at::kLong).contiguous();
  const auto mean = feature_is_mean.to(at::kBool).contiguous();
  const int64_t* p = plan.data_ptr<int64_t>();
  const float* w = weight.data_ptr<float>();
  const int kind = code_kind(codes);
  const char* code_base = static_cast<const char*>(codes.data_ptr());
  const int64_t D = L * d;
  TORCH_CHECK(packed.has_value() == packed_plan.has_value(), "packed and packed_plan go together");
  torch::Tensor rows8, plan8;
  if (packed) {
    TORCH_CHECK(packed->device().is_cpu() && packed->scalar_type() == at::kByte &&
                    packed->dim() == 2 && packed->size(1) == D + 2 * int64_t(sizeof(float)),
                "packed: uint8 [rows, D + 8] (int8 row-wise), D = ", D);
    TORCH_CHECK(packed_plan->dim() == 2 && packed_plan->size(0) == F && packed_plan->size(1) == 2,
                "packed_plan: [F, 2]");
    rows8 = packed->contiguous();
    plan8 = packed_plan->to(at::kLong).contiguous();
  }
  std::vector<Feature> feats(F);
  std::vector<const float*> tables;
  std::vector<int64_t> dims, cols;
  for (int64_t f = 0; f < F; ++f) {
    const int64_t* row = p + f * (L + 2);
    Feature& ft = feats[f];
    ft.f = f;
    ft.j0 = static_cast<int64_t>(tables.size());
    ft.col = f * D;
    ft.cols = D;
    ft.mean = mean.data_ptr<bool>()[f];
    if (packed && plan8.data_ptr<int64_t>()[2 * f + 1]) {  // int8 rows: pool_packed
      ft.kind = -2;
      ft.codes = rows8.data_ptr<uint8_t>() + plan8.data_ptr<int64_t>()[2 * f] * rows8.size(1);
      ft.code_cols = rows8.size(1);
    } else if (row[L + 1] != 0) {
      ft.kind = kind;
      ft.codes = code_base + row[L] * L * codes.element_size();
      ft.code_cols = L;
      ft.sub = d;
      for (int64_t l = 0; l < L; ++l) {
        tables.push_back(w + row[l] * d);
        dims.push_back(d);
        cols.push_back(f * D + l * d);
      }
    } else {
      ft.sub = D;
      tables.push_back(w + row[0] * d);
      dims.push_back(D);
      cols.push_back(f * D);
    }
    ft.j1 = static_cast<int64_t>(tables.size());
  }
  std::vector<Kernels> kern;
  for (const auto& ft : feats) kern.push_back(select(ft));
  const Bags bags{ids.data_ptr<int64_t>(), off.data_ptr<int64_t>(),
                  per_id ? psw.data_ptr<float>() : nullptr, stride};
  auto out = torch::empty({stride, F * D}, weight.options());
  pool_features(feats, kern, tables.data(), dims.data(), cols.data(), bags, F * D,
                out.data_ptr<float>());
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused MEC pooled lookup (CPU)");
  m.def("backward", &backward, "gradients of the fused MEC pooled lookup (CPU)");
  m.def("first_out_of_range", &first_out_of_range, "first id outside its feature's table, or -1");
}

// The serving kernels as operators, registered when this library loads, so that TorchScript
// graphs (mec_torchrec/export) call them as they call ATen ops. CPU kernels only.
TORCH_LIBRARY(mec_lookup, m) {
  m.def("serve_one_hot(Tensor values, Tensor codes, Tensor weight, Tensor feature_plan, "
        "int stride, Tensor? per_id, Tensor? packed=None, Tensor? packed_plan=None) -> Tensor");
  m.def("ids_in_range(Tensor values, Tensor lengths, Tensor sizes) -> bool");
  m.def("serve_pooled(Tensor values, Tensor offsets, Tensor? per_id, Tensor weight, Tensor codes, "
        "Tensor feature_plan, Tensor feature_is_mean, int stride, Tensor? packed=None, "
        "Tensor? packed_plan=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(mec_lookup, CPU, m) {
  m.impl("serve_one_hot", &serve_one_hot);
  m.impl("ids_in_range", &ids_in_range);
  m.impl("serve_pooled", &serve_pooled);
}
