// Grouped matmuls for XLA:CPU as FFI custom calls (built and loaded by cpu_gmm.py).
//
//   DsjGroupedMatmul:   out[r] = x[r] @ w[e]          for the rows r of group e: rows
//                       [start_e, start_e + sizes[e]), start_e = sizes[0] + ... + sizes[e-1];
//                       rows past the last group are zero.
//   DsjGroupedMatmulWT: out[r] = x[r] @ w[e]^T        the input gradient, w read in place.
//   DsjGroupedMatmulT:  out[e] = x_e^T @ dy_e         the weight gradient: x_e, dy_e the rows of
//                       group e; an empty group's out[e] is zero.
//
// Each group reads its expert's weights in place and computes exactly its rows: no copy of the
// weights and no padded rows, which is what XLA's own formulations pay for (slices of a stacked
// array are copied before a dot; batched dots over capacity slots compute the empty slots). Up to
// kFewRows rows of a group (decoding) take one pass over the weights as they lie, with the rows'
// sums in registers; more rows go kPanelRows at a time over panels of kPanel columns, copied
// contiguous first (RunItem). The work is shared out over XLA's intra-op thread pool in items of
// up to kRowsPerItem rows and kColumnsPerItem columns.
//
// Legend: M rows, K input width, N output width, E groups (experts).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Up to this many rows take one pass over the right-hand side as it lies in memory.
static constexpr int64_t kFewRows = 8;
// Rows and columns per work item (multiples of every register tile's width), so that a large
// group (one expert taking most copies) or a wide one is shared out too.
static constexpr int64_t kRowsPerItem = 8 * kFewRows;
static constexpr int64_t kColumnsPerItem = 512;

// The widest vector of floats this build's instruction set has (-march=native), and how many
// such registers it has: the register tiles below are sized so that their sums, the loaded
// right-hand-side vectors and a broadcast all stay in registers. (Tiles of 16-float vectors on an
// AVX2 machine, 16 registers of 8 floats, spilled at every step: 7 GFLOP/s against 108 for XLA's
// dot.)
#if defined(__AVX512F__)
static constexpr int kLanes = 16, kRegisters = 32;
#elif defined(__AVX__)
static constexpr int kLanes = 8, kRegisters = 16;
#elif defined(__aarch64__)
static constexpr int kLanes = 4, kRegisters = 32;
#else
static constexpr int kLanes = 4, kRegisters = 16;
#endif

// kLanes floats; loaded and stored through pointers (unaligned, may alias float): GCC keeps such
// values in registers, where std::memcpy into them made it spill every sum at every step (4x
// slower).
typedef float vf __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));

// One product's operands: out [rows, ·] = a [rows, inner] @ b [inner, ·], columns [c0, c1); out
// row-major with row stride ldo, a[r, j] at a + r * lda + j * lda_inner, b[j, c] at
// b + j * ldb + c * ldb_col (transposed operands are read in place: lda 1, or ldb_col != 1).
struct Product {
  const float* a;
  int64_t lda, lda_inner;
  const float* b;
  int64_t ldb, ldb_col;
  float* out;
  int64_t ldo;
  int64_t rows, inner, c0, c1;
};

// R rows of a times b into out, one register tile of kLanes * V columns (b and out point at its
// first column; b's rows ldb apart): every row of b is read once and multiplied into all R rows,
// whose sums stay in registers.
template <int R, int V>
static inline void FewRowsTile(const Product& p, const float* a, const float* b, int64_t ldb,
                               float* out) {
  vf acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = vf{};
  for (int64_t j = 0; j < p.inner; ++j) {
    vf bv[V];
    for (int v = 0; v < V; ++v) bv[v] = *reinterpret_cast<const vf*>(b + j * ldb + kLanes * v);
    for (int r = 0; r < R; ++r) {
      const float s = a[r * p.lda + j * p.lda_inner];
      for (int v = 0; v < V; ++v) acc[r][v] += s * bv[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) *reinterpret_cast<vf*>(out + r * p.ldo + kLanes * v) = acc[r][v];
}

// rows rows (from a, into out), columns [c, p.c1) one by one: what is left past the register
// tiles.
static void ColumnsOneByOne(const Product& p, int64_t rows, const float* a, float* out,
                            int64_t c) {
  for (; c < p.c1; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      float sum = 0.0f;
      for (int64_t j = 0; j < p.inner; ++j) {
        sum += a[r * p.lda + j * p.lda_inner] * p.b[j * p.ldb + c * p.ldb_col];
      }
      out[r * p.ldo + c] = sum;
    }
  }
}

// f(std::integral_constant<int, R>) for R = rows, 1 <= rows <= kFewRows: the register tiles'
// row count is a template argument.
template <class F>
static void WithRowCount(int64_t rows, F f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// Vectors per register tile of R rows in one pass over b as it lies: 4 for one or two rows (the
// most loads in flight); else 2 where the sums, loads and a broadcast fit the registers; else 1.
template <int R>
static constexpr int FewRowsVectors() {
  return R <= 2 ? 4 : (2 * R + 2 + 1 <= kRegisters ? 2 : 1);
}

// Panel width (a register tile of 4 vectors, 2 with 16 registers) and rows per pass over a panel:
// with AVX-512, 24 sums in registers, 4 loads and 6 broadcasts per 24 multiply-adds.
static constexpr int kPanelVectors = kRegisters >= 32 ? 4 : 2;
static constexpr int64_t kPanel = kPanelVectors * kLanes;
static constexpr int64_t kPanelRows = 6;

// One work item. Up to kFewRows rows (decoding): one pass, b read in place. More, or b transposed:
// each panel of kPanel columns of b is first copied into a contiguous buffer, then every pass of
// kPanelRows rows streams it. Read in place, b's rows are ldb apart (a multiple of 4 KiB for wide
// weights): a panel's rows then fall into a few L1 sets and miss at every pass (the forward of a
// mid-size MoE layer, 1024 x 512 experts: 219 ms in place, 142 ms packed).
static void RunItem(const Product& p) {
  if (p.rows <= kFewRows && p.ldb_col == 1) {
    WithRowCount(p.rows, [&](auto rows) {
      constexpr int R = decltype(rows)::value, V = FewRowsVectors<R>();
      int64_t c = p.c0;
      for (; c + kLanes * V <= p.c1; c += kLanes * V) {
        FewRowsTile<R, V>(p, p.a, p.b + c, p.ldb, p.out + c);
      }
      ColumnsOneByOne(p, R, p.a, p.out, c);
    });
    return;
  }
  thread_local std::vector<float> panel;
  panel.resize(p.inner * kPanel);
  int64_t c = p.c0;
  for (; c + kPanel <= p.c1; c += kPanel) {
    float* out = panel.data();
    if (p.ldb_col == 1) {
      for (int64_t j = 0; j < p.inner; ++j) {
        std::memcpy(out + j * kPanel, p.b + j * p.ldb + c, sizeof(float) * kPanel);
      }
    } else {  // b^T: kPanel rows of it (columns of b), each read along j
      const float* cols = p.b + c * p.ldb_col;
      for (int64_t j = 0; j < p.inner; ++j) {
        for (int64_t i = 0; i < kPanel; ++i) out[j * kPanel + i] = cols[i * p.ldb_col + j * p.ldb];
      }
    }
    for (int64_t r = 0; r < p.rows; r += kPanelRows) {
      WithRowCount(std::min(kPanelRows, p.rows - r), [&](auto rows) {
        FewRowsTile<decltype(rows)::value, kPanelVectors>(p, p.a + r * p.lda, panel.data(),
                                                          kPanel, p.out + r * p.ldo + c);
      });
    }
  }
  ColumnsOneByOne(p, p.rows, p.a, p.out, c);
}

// Appends the items of out [rows, n] = a [rows, ·] @ b: up to kRowsPerItem rows and
// kColumnsPerItem columns each.
static void AddItems(std::vector<Product>& items, const Product& p) {
  // b transposed: every panel is a strided copy, as costly as a pass: items of up to 8x the rows
  const int64_t rows_per_item = p.ldb_col == 1 ? kRowsPerItem : 8 * kRowsPerItem;
  for (int64_t r = 0; r < p.rows; r += rows_per_item) {
    for (int64_t c0 = p.c0; c0 < p.c1; c0 += kColumnsPerItem) {
      Product it = p;
      it.a += r * p.lda;
      it.out += r * p.ldo;
      it.rows = std::min(rows_per_item, p.rows - r);
      it.c0 = c0;
      it.c1 = std::min(p.c1, c0 + kColumnsPerItem);
      items.push_back(it);
    }
  }
}

// The work items of one call, shared by the threads that take them one at a time; the caller
// waits until every item taken has finished (a helper that starts late finds none left).
struct Work {
  std::vector<Product> items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> left{0};
  std::mutex mu;
  std::condition_variable done;

  void Drain() {
    for (int64_t i; (i = next.fetch_add(1)) < static_cast<int64_t>(items.size());) {
      RunItem(items[i]);
      if (left.fetch_sub(1) == 1) {
        std::lock_guard<std::mutex> lock(mu);
        done.notify_all();
      }
    }
  }
};

static void RunAll(ffi::ThreadPool& pool, std::vector<Product> items) {
  auto work = std::make_shared<Work>();
  work->items = std::move(items);
  work->left = static_cast<int64_t>(work->items.size());
  const int64_t helpers =
      std::min<int64_t>(pool.num_threads(), static_cast<int64_t>(work->items.size()) - 1);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Drain(); });
  work->Drain();
  std::unique_lock<std::mutex> lock(work->mu);
  work->done.wait(lock, [&] { return work->left.load() == 0; });
}

// Group e's rows [start, start + rows), clipped to the m rows there are.
static int64_t GroupRows(const int32_t* sizes, int64_t e, int64_t start, int64_t m) {
  return std::max<int64_t>(0, std::min<int64_t>(sizes[e], m - start));
}

// out[r] = x[r] @ w[e] (w_transposed: x[r] @ w[e]^T) over the groups' rows; the rest zero.
template <bool w_transposed>
static ffi::Error GroupedRows(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::S32> sizes,
                              ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  const int64_t in = w_transposed ? 2 : 1, on = w_transposed ? 1 : 2;  // w's K and N axes
  if (xd.size() != 2 || wd.size() != 3 || sizes.dimensions().size() != 1 || od.size() != 2 ||
      xd[1] != wd[in] || sizes.dimensions()[0] != wd[0] || od[0] != xd[0] || od[1] != wd[on]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      w_transposed ? "cpu_gmm: expected dy [M, N], w [E, K, N], sizes [E], out [M, K]"
                                   : "cpu_gmm: expected x [M, K], w [E, K, N], sizes [E], out [M, N]");
  }
  const int64_t m = xd[0], k = xd[1], n = od[1], w_size = wd[1] * wd[2];
  const int32_t* gs = sizes.typed_data();
  std::vector<Product> items;
  int64_t row = 0;
  for (int64_t e = 0; e < wd[0] && row < m; ++e) {
    const int64_t rows = GroupRows(gs, e, row, m);
    AddItems(items, {x.typed_data() + row * k, k, 1, w.typed_data() + e * w_size,
                     w_transposed ? 1 : n, w_transposed ? k : 1, out->typed_data() + row * n, n,
                     rows, k, 0, n});
    row += rows;
  }
  if (row < m) std::memset(out->typed_data() + row * n, 0, sizeof(float) * (m - row) * n);
  RunAll(pool, std::move(items));
  return ffi::Error::Success();
}

static ffi::Error GroupedMatmulT(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::S32> sizes,
                                 ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), dd = dy.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || dd.size() != 2 || sizes.dimensions().size() != 1 || od.size() != 3 ||
      xd[0] != dd[0] || sizes.dimensions()[0] != od[0] || od[1] != xd[1] || od[2] != dd[1]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cpu_gmm: expected x [M, K], dy [M, N], sizes [E], out [E, K, N]");
  }
  const int64_t m = xd[0], k = xd[1], n = dd[1];
  const int32_t* gs = sizes.typed_data();
  std::vector<Product> items;
  int64_t row = 0;
  for (int64_t e = 0; e < od[0]; ++e) {
    const int64_t rows = GroupRows(gs, e, row, m);  // the inner length: an empty group sums 0
    AddItems(items, {x.typed_data() + row * k, 1, k, dy.typed_data() + row * n, n, 1,
                     out->typed_data() + e * k * n, n, k, rows, 0, n});
    row += rows;
  }
  RunAll(pool, std::move(items));
  return ffi::Error::Success();
}

// Every call takes two float32 operands and the group sizes and gives one float32 result:
//   DsjGroupedMatmul   x [M, K], w [E, K, N], sizes [E] -> out [M, N]
//   DsjGroupedMatmulWT dy [M, N], w [E, K, N], sizes [E] -> out [M, K]
//   DsjGroupedMatmulT  x [M, K], dy [M, N], sizes [E] -> out [E, K, N]
static auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

// The register tiles' vector width (floats) and register count this build chose (for reports and
// tests: a build without -march=native falls back to the narrowest).
extern "C" int DsjVectorLanes() { return kLanes; }
extern "C" int DsjVectorRegisters() { return kRegisters; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjGroupedMatmul, GroupedRows<false>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjGroupedMatmulWT, GroupedRows<true>, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjGroupedMatmulT, GroupedMatmulT, Binding());
