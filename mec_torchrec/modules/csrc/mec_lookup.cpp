// Fused MEC pooled lookup on CPU: reads codes[id, l] inside the pooling loop, so the L-fold
// code ids of the remap path never exist in memory. Forward is parallel over samples (output
// rows); backward accumulates each inner table's gradient in one task (parallel over inner
// tables: no races, no per-thread buffers).
//
// Plan (per outer feature f, in outer order; lookup features j in lookup order):
//   feat_start[F+1]: f's lookup features are [feat_start[f], feat_start[f+1])
//   feat_code[F]:    index into `codes` (-1: full table, ids read the table directly)
//   feat_mean[F]:    1 if MEAN pooled
//   lk_table/lk_dim/lk_col[J]: inner table, dim and first output column of lookup feature j
//   table_ptr[T+1] / table_lk: the lookup features reading each inner table (CSR)
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#define MEC_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MEC_CLONES
#endif

namespace {

struct CodeView {
  const void* ptr = nullptr;
  int64_t L = 0;
  int kind = 0;  // 0 uint8, 1 int16, 2 int32, 3 int64
};

__attribute__((always_inline)) inline int64_t read_code(const CodeView& c, int64_t row, int64_t l) {
  const int64_t at = row * c.L + l;
  switch (c.kind) {
    case 0: return static_cast<const uint8_t*>(c.ptr)[at];
    case 1: return static_cast<const int16_t*>(c.ptr)[at];
    case 2: return static_cast<const int32_t*>(c.ptr)[at];
    default: return static_cast<const int64_t*>(c.ptr)[at];
  }
}

// Start loading the code rows of ids[s:e] (codes are the big, cold array: N x L).
inline void prefetch_codes(const CodeView& c, const int64_t* ids, int64_t s, int64_t e) {
  const int64_t row_bytes = c.L << c.kind;  // element size 1 << kind
  const char* base = static_cast<const char*>(c.ptr);
  for (int64_t i = s; i < e; ++i) __builtin_prefetch(base + ids[i] * row_bytes);
}

std::vector<CodeView> code_views(const std::vector<torch::Tensor>& codes) {
  std::vector<CodeView> out;
  for (const auto& c : codes) {
    TORCH_CHECK(c.dim() == 2 && c.is_contiguous() && c.device().is_cpu(), "codes must be contiguous CPU [N, L]");
    CodeView v;
    v.ptr = c.data_ptr();
    v.L = c.size(1);
    switch (c.scalar_type()) {
      case at::kByte: v.kind = 0; break;
      case at::kShort: v.kind = 1; break;
      case at::kInt: v.kind = 2; break;
      case at::kLong: v.kind = 3; break;
      default: TORCH_CHECK(false, "codes must be uint8, int16, int32 or int64");
    }
    out.push_back(v);
  }
  return out;
}

template <int64_t D>
__attribute__((always_inline)) inline void axpy_fixed(float* __restrict__ out, const float* __restrict__ row, float w) {
  for (int64_t k = 0; k < D; ++k) out[k] += w * row[k];
}

// out[0:dim] += w * row[0:dim]; the usual dims unrolled at compile time.
__attribute__((always_inline)) inline void axpy(float* __restrict__ out, const float* __restrict__ row,
                                                 int64_t dim, float w) {
  switch (dim) {
    case 4: return axpy_fixed<4>(out, row, w);
    case 8: return axpy_fixed<8>(out, row, w);
    case 16: return axpy_fixed<16>(out, row, w);
    case 32: return axpy_fixed<32>(out, row, w);
    case 64: return axpy_fixed<64>(out, row, w);
    case 128: return axpy_fixed<128>(out, row, w);
    default:
      for (int64_t k = 0; k < dim; ++k) out[k] += w * row[k];
  }
}

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t dim) {
  float s = 0.f;
  for (int64_t k = 0; k < dim; ++k) s += a[k] * b[k];
  return s;
}

void check_inputs(const torch::Tensor& ids, const torch::Tensor& offsets,
                  const c10::optional<torch::Tensor>& psw, int64_t num_bags) {
  TORCH_CHECK(ids.device().is_cpu() && ids.scalar_type() == at::kLong && ids.is_contiguous(), "ids: contiguous CPU int64");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.numel() == num_bags + 1,
              "offsets: contiguous int64 of F * B + 1");
  if (psw.has_value()) {
    TORCH_CHECK(psw->scalar_type() == at::kFloat && psw->is_contiguous() && psw->numel() == ids.numel(),
                "per-sample weights: contiguous float32, one per id");
  }
}

std::vector<const float*> weight_ptrs(const std::vector<torch::Tensor>& weights) {
  std::vector<const float*> out;
  for (const auto& w : weights) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.device().is_cpu() && w.dim() == 2,
                "weights: contiguous CPU float32 [rows, dim]");
    out.push_back(w.data_ptr<float>());
  }
  return out;
}

struct Rows {
  const int64_t* id;
  const int64_t* off;
  const float* sw;
  const float* const* W;
  const CodeView* C;
  int64_t batch, total_dim, F;
  const int64_t *feat_start, *feat_code, *feat_mean, *lk_table, *lk_dim, *lk_col;
};

// Output rows [begin, end). On x86-64 compiled for AVX2 and for the baseline, picked at load time.
MEC_CLONES
void forward_rows(const Rows& r, float* o_base, int64_t begin, int64_t end) {
  const int64_t* id = r.id;
  const int64_t* off = r.off;
  const float* sw = r.sw;
  const float* const* W = r.W;
  const CodeView* C = r.C;
  const int64_t batch = r.batch, total_dim = r.total_dim, F = r.F;
  const int64_t *feat_start = r.feat_start, *feat_code = r.feat_code, *feat_mean = r.feat_mean;
  const int64_t *lk_table = r.lk_table, *lk_dim = r.lk_dim, *lk_col = r.lk_col;
  // Blocks of 32 samples (their output rows stay in L2), feature by feature within a block
  // (the ids and offsets of a feature are read sequentially).
  for (int64_t b0 = begin; b0 < end; b0 += 32) {
    const int64_t b1 = std::min(end, b0 + 32);
    std::fill(o_base + b0 * total_dim, o_base + b1 * total_dim, 0.f);
    for (int64_t f = 0; f < F; ++f) {
      if (feat_code[f] >= 0) prefetch_codes(C[feat_code[f]], id, off[f * batch + b0], off[f * batch + b1]);
    }
    for (int64_t f = 0; f < F; ++f) for (int64_t b = b0; b < b1; ++b) {
      float* o = o_base + b * total_dim;
      const int64_t fb = f * batch + b;
      const int64_t s = off[fb], e = off[fb + 1];
      if (s == e) continue;
      const int64_t j0 = feat_start[f], j1 = feat_start[f + 1];
      const int64_t ci = feat_code[f];
      for (int64_t i = s; i < e; ++i) {
        const float w = sw ? sw[i] : 1.f;
        const int64_t row = id[i];
        if (ci < 0) {
          axpy(o + lk_col[j0], W[lk_table[j0]] + row * lk_dim[j0], lk_dim[j0], w);
        } else {
          const CodeView& cv = C[ci];
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t code = read_code(cv, row, j - j0);
            axpy(o + lk_col[j], W[lk_table[j]] + code * lk_dim[j], lk_dim[j], w);
          }
        }
      }
      if (feat_mean[f]) {
        const float scale = 1.f / static_cast<float>(e - s);
        const int64_t c0 = lk_col[j0], c1 = lk_col[j1 - 1] + lk_dim[j1 - 1];
        for (int64_t k = c0; k < c1; ++k) o[k] *= scale;
      }
    }
  }
}

torch::Tensor forward(const torch::Tensor& ids, const torch::Tensor& offsets,
                      const c10::optional<torch::Tensor>& psw, const std::vector<torch::Tensor>& weights,
                      const std::vector<torch::Tensor>& codes, int64_t batch, int64_t total_dim,
                      const std::vector<int64_t>& feat_start, const std::vector<int64_t>& feat_code,
                      const std::vector<int64_t>& feat_mean, const std::vector<int64_t>& lk_table,
                      const std::vector<int64_t>& lk_dim, const std::vector<int64_t>& lk_col) {
  const int64_t F = static_cast<int64_t>(feat_code.size());
  check_inputs(ids, offsets, psw, F * batch);
  // Row-major output, filled one sample (row) at a time: each output row is written once,
  // sequentially, and nothing is zeroed twice.
  auto out = torch::empty({batch, total_dim}, ids.options().dtype(at::kFloat));
  const auto W = weight_ptrs(weights);
  const auto C = code_views(codes);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const float* sw = psw.has_value() ? psw->data_ptr<float>() : nullptr;
  float* o_base = out.data_ptr<float>();
  const Rows rows{id, off, sw, W.data(), C.data(), batch, total_dim, F, feat_start.data(),
                  feat_code.data(), feat_mean.data(), lk_table.data(), lk_dim.data(), lk_col.data()};
  at::parallel_for(0, batch, 32, [&](int64_t begin, int64_t end) { forward_rows(rows, o_base, begin, end); });
  return out;
}

// Gradients of the lookup features ``mine`` (all readers of some inner tables), in blocks of
// 32 samples: grad_out rows stay in cache, each feature's ids and offsets are read in order.
MEC_CLONES
void backward_tables(const Rows& r, const float* g_base, float* const* G, const int64_t* lk_feat,
                     const std::vector<int64_t>& mine) {
  const int64_t* id = r.id;
  const int64_t* off = r.off;
  const float* sw = r.sw;
  const CodeView* C = r.C;
  const int64_t batch = r.batch, total_dim = r.total_dim;
  for (int64_t b0 = 0; b0 < batch; b0 += 32) {
    const int64_t b1 = std::min(batch, b0 + 32);
    for (const int64_t j : mine) {
      const int64_t f = lk_feat[j];
      if (r.feat_code[f] >= 0 && j == r.feat_start[f]) {
        prefetch_codes(C[r.feat_code[f]], id, off[f * batch + b0], off[f * batch + b1]);
      }
    }
    // Runs of consecutive lookup features of one outer feature (its subspaces): each id's
    // offsets, weight and code row are read once for all of them.
    for (size_t x0 = 0; x0 < mine.size();) {
      const int64_t f = lk_feat[mine[x0]];
      size_t x1 = x0 + 1;
      while (x1 < mine.size() && lk_feat[mine[x1]] == f && mine[x1] == mine[x1 - 1] + 1) ++x1;
      const int64_t j0 = mine[x0], nj = static_cast<int64_t>(x1 - x0);
      const int64_t l0 = j0 - r.feat_start[f];
      const int64_t ci = r.feat_code[f];
      const bool mean = r.feat_mean[f] != 0;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = off[f * batch + b], e = off[f * batch + b + 1];
        if (s == e) continue;
        const float scale = mean ? 1.f / static_cast<float>(e - s) : 1.f;
        const float* g_row = g_base + b * total_dim;
        for (int64_t i = s; i < e; ++i) {
          const float w = sw ? sw[i] * scale : scale;
          for (int64_t k = 0; k < nj; ++k) {
            const int64_t j = j0 + k;
            const int64_t row = ci < 0 ? id[i] : read_code(C[ci], id[i], l0 + k);
            axpy(G[r.lk_table[j]] + row * r.lk_dim[j], g_row + r.lk_col[j], r.lk_dim[j], w);
          }
        }
      }
      x0 = x1;
    }
  }
}

std::vector<torch::Tensor> backward(
    const torch::Tensor& grad_out_in, const torch::Tensor& ids, const torch::Tensor& offsets,
    const c10::optional<torch::Tensor>& psw, const std::vector<torch::Tensor>& weights,
    const std::vector<torch::Tensor>& codes, int64_t batch, const std::vector<int64_t>& feat_start,
    const std::vector<int64_t>& feat_code, const std::vector<int64_t>& feat_mean,
    const std::vector<int64_t>& lk_table, const std::vector<int64_t>& lk_dim,
    const std::vector<int64_t>& lk_col, const std::vector<int64_t>& lk_feat,
    const std::vector<int64_t>& table_ptr, const std::vector<int64_t>& table_lk, bool psw_grad) {
  const int64_t F = static_cast<int64_t>(feat_code.size());
  const int64_t T = static_cast<int64_t>(weights.size());
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
  // Rows.total_dim below is the grad_out row stride.
  const int64_t total_dim = g_stride;
  const auto W = weight_ptrs(weights);
  const auto C = code_views(codes);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const float* sw = psw.has_value() ? psw->data_ptr<float>() : nullptr;
  const float* g_base = grad_out.data_ptr<float>();
  std::vector<torch::Tensor> grads;
  std::vector<float*> G;
  for (const auto& w : weights) {
    grads.push_back(torch::zeros_like(w));
    G.push_back(grads.back().data_ptr<float>());
  }
  // Each task owns a contiguous range of inner tables: no two tasks write one gradient.
  const Rows rows{id, off, sw, W.data(), C.data(), batch, total_dim, F, feat_start.data(),
                  feat_code.data(), feat_mean.data(), lk_table.data(), lk_dim.data(), lk_col.data()};
  at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> mine;
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t x = table_ptr[t]; x < table_ptr[t + 1]; ++x) mine.push_back(table_lk[x]);
    }
    std::sort(mine.begin(), mine.end());
    backward_tables(rows, g_base, G.data(), lk_feat.data(), mine);
  });
  torch::Tensor gsw;
  if (psw_grad && sw) {
    gsw = torch::zeros_like(*psw);
    float* gs = gsw.data_ptr<float>();
    at::parallel_for(0, F * batch, 64, [&](int64_t begin, int64_t end) {
      for (int64_t fb = begin; fb < end; ++fb) {
        const int64_t f = fb / batch, b = fb % batch;
        const int64_t s = off[fb], e = off[fb + 1];
        if (s == e) continue;
        const float scale = feat_mean[f] ? 1.f / static_cast<float>(e - s) : 1.f;
        const int64_t j0 = feat_start[f], j1 = feat_start[f + 1];
        const int64_t ci = feat_code[f];
        const float* g = g_base + b * total_dim;
        for (int64_t i = s; i < e; ++i) {
          float acc = 0.f;
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t row = ci < 0 ? id[i] : read_code(C[ci], id[i], j - j0);
            acc += dot(g + lk_col[j], W[lk_table[j]] + row * lk_dim[j], lk_dim[j]);
          }
          gs[i] = acc * scale;
        }
      }
    });
  }
  grads.push_back(gsw);
  return grads;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused MEC pooled lookup (CPU)");
  m.def("backward", &backward, "gradients of the fused MEC pooled lookup (CPU)");
}
