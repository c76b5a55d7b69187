// A grouped matmul for XLA:CPU as an FFI custom call (built and loaded by cpu_gmm.py).
//
//   out[r] = x[r] @ w[e]   for the rows r of group e: rows [start_e, start_e + sizes[e]),
//   start_e = sizes[0] + ... + sizes[e-1]; rows past the last group are zero.
//
// Each group reads its expert's weights in place: no copy of the weights and no padded rows,
// which is what XLA's own formulations pay for a few copies per expert (decoding). Rows go
// kFewRows at a time through FewRows, which streams the weights once per pass with the rows'
// sums in registers; the work is shared out over XLA's intra-op thread pool in items of up to
// kRowsPerItem rows and kColumnsPerItem columns of one group.
//
// Legend: M rows, K input width, N output width, E groups (experts).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Rows per pass over the weights (the register tiles below hold this many rows' sums).
static constexpr int64_t kFewRows = 8;
// Rows and columns per work item (multiples of kFewRows and of every register tile's width), so
// that a large group (one expert taking most copies) or a wide one is shared out too.
static constexpr int64_t kRowsPerItem = 4 * kFewRows;
static constexpr int64_t kColumnsPerItem = 512;

// 16 floats; loaded and stored through pointers (unaligned, may alias float): GCC keeps such
// values in registers, where std::memcpy into them made it spill every sum at every step (4x
// slower).
typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));

// R rows of x [R, K] times w [K, N] into out [R, N], for columns [c0, c0 + 16 V): every weight
// row is read once and multiplied into all R rows, whose sums stay in registers.
template <int R, int V>
static inline void FewRowsTile(const float* x, const float* w, float* out, int64_t k, int64_t n,
                               int64_t c0) {
  v16 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = v16{};
  for (int64_t j = 0; j < k; ++j) {
    v16 wv[V];
    for (int v = 0; v < V; ++v) wv[v] = *reinterpret_cast<const v16*>(w + j * n + c0 + 16 * v);
    for (int r = 0; r < R; ++r) {
      const float a = x[r * k + j];
      for (int v = 0; v < V; ++v) acc[r][v] += a * wv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) *reinterpret_cast<v16*>(out + r * n + c0 + 16 * v) = acc[r][v];
}

// R <= kFewRows rows times w_e [K, N], columns [c0, c1): the weights stream through once, with
// no packing (as a GEMM would do). Columns past the last whole register tile are summed one by
// one.
template <int R>
static void FewRows(const float* x, const float* w, float* out, int64_t k, int64_t n, int64_t c0,
                    int64_t c1) {
  constexpr int V = R <= 2 ? 4 : 2;
  int64_t c = c0;
  for (; c + 16 * V <= c1; c += 16 * V) FewRowsTile<R, V>(x, w, out, k, n, c);
  for (; c < c1; ++c) {
    for (int r = 0; r < R; ++r) {
      float sum = 0.0f;
      for (int64_t j = 0; j < k; ++j) sum += x[r * k + j] * w[j * n + c];
      out[r * n + c] = sum;
    }
  }
}

static void FewRowsAny(int64_t rows, const float* x, const float* w, float* out, int64_t k,
                       int64_t n, int64_t c0, int64_t c1) {
  switch (rows) {
    case 1: return FewRows<1>(x, w, out, k, n, c0, c1);
    case 2: return FewRows<2>(x, w, out, k, n, c0, c1);
    case 3: return FewRows<3>(x, w, out, k, n, c0, c1);
    case 4: return FewRows<4>(x, w, out, k, n, c0, c1);
    case 5: return FewRows<5>(x, w, out, k, n, c0, c1);
    case 6: return FewRows<6>(x, w, out, k, n, c0, c1);
    case 7: return FewRows<7>(x, w, out, k, n, c0, c1);
    default: return FewRows<8>(x, w, out, k, n, c0, c1);
  }
}

// One work item: rows [0, rows) of x against w_e, columns [c0, c1), kFewRows rows per pass.
static void RunItem(const float* x, const float* w, float* out, int64_t rows, int64_t k,
                    int64_t n, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < rows; r += kFewRows) {
    FewRowsAny(std::min(kFewRows, rows - r), x + r * k, w, out + r * n, k, n, c0, c1);
  }
}

// The work items of one call, shared by the threads that take them one at a time; the caller
// waits until every item taken has finished (a helper that starts late finds none left).
struct Work {
  struct Item {
    int64_t expert, row, rows, c0, c1;
  };
  std::vector<Item> items;
  const float *x, *w;
  float* out;
  int64_t k, n;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> left{0};
  std::mutex mu;
  std::condition_variable done;

  void Drain() {
    for (int64_t i; (i = next.fetch_add(1)) < static_cast<int64_t>(items.size());) {
      const Item& it = items[i];
      RunItem(x + it.row * k, w + it.expert * k * n, out + it.row * n, it.rows, k, n, it.c0,
              it.c1);
      if (left.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(mu);
        done.notify_all();
      }
    }
  }
};

static ffi::Error GroupedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> sizes,
                                ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sizes.dimensions().size() != 1 || od.size() != 2 ||
      xd[1] != wd[1] || sizes.dimensions()[0] != wd[0] || od[0] != xd[0] || od[1] != wd[2]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cpu_gmm: expected x [M, K], w [E, K, N], sizes [E], out [M, N]");
  }
  const int64_t m_all = xd[0], k = wd[1], n = wd[2], e_all = wd[0];
  auto work = std::make_shared<Work>();
  work->x = x.typed_data();
  work->w = w.typed_data();
  work->out = out->typed_data();
  work->k = k;
  work->n = n;
  const int32_t* gs = sizes.typed_data();
  int64_t row = 0;
  for (int64_t e = 0; e < e_all && row < m_all; ++e) {
    int64_t rows = gs[e] < 0 ? 0 : gs[e];
    if (rows > m_all - row) rows = m_all - row;
    for (int64_t r = 0; r < rows; r += kRowsPerItem) {
      for (int64_t c0 = 0; c0 < n; c0 += kColumnsPerItem) {
        work->items.push_back(
            {e, row + r, std::min(kRowsPerItem, rows - r), c0, std::min(n, c0 + kColumnsPerItem)});
      }
    }
    row += rows;
  }
  if (row < m_all) std::memset(work->out + row * n, 0, sizeof(float) * (m_all - row) * n);
  work->left = static_cast<int64_t>(work->items.size());
  const int64_t helpers =
      std::min<int64_t>(pool.num_threads(), static_cast<int64_t>(work->items.size()) - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  std::unique_lock<std::mutex> lock(work->mu);
  work->done.wait(lock, [&] { return work->left.load() == 0; });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjGroupedMatmul, GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w [E, K, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // sizes [E]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [M, N]
