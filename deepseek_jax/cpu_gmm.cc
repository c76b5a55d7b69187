// A grouped matmul for XLA:CPU as an FFI custom call (built and loaded by cpu_gmm.py).
//
//   out[r] = x[r] @ w[e]   for the rows r of group e: rows [start_e, start_e + sizes[e]),
//   start_e = sizes[0] + ... + sizes[e-1]; rows past the last group are zero.
//
// Each group is one BLAS sgemm reading its expert's weights in place: no copy of the weights
// and no padded rows, which is what XLA's own formulations pay for a few copies per expert
// (decoding). The sgemm is SciPy's (scipy.linalg.cython_blas, Fortran ABI with 32-bit ints),
// handed over once by dsj_set_sgemm.
//
// Legend: M rows, K input width, N output width, E groups (experts).

#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

typedef void (*sgemm_t)(const char* transa, const char* transb, const int* m, const int* n,
                        const int* k, const float* alpha, const float* a, const int* lda,
                        const float* b, const int* ldb, const float* beta, float* c,
                        const int* ldc);

static sgemm_t g_sgemm = nullptr;

extern "C" void dsj_set_sgemm(void* fn) { g_sgemm = reinterpret_cast<sgemm_t>(fn); }

static ffi::Error GroupedMatmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> out) {
  if (g_sgemm == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "cpu_gmm: no sgemm was set");
  }
  auto xd = x.dimensions(), wd = w.dimensions(), od = out->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sizes.dimensions().size() != 1 || od.size() != 2 ||
      xd[1] != wd[1] || sizes.dimensions()[0] != wd[0] || od[0] != xd[0] || od[1] != wd[2]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "cpu_gmm: expected x [M, K], w [E, K, N], sizes [E], out [M, N]");
  }
  const int64_t m_all = xd[0], k = wd[1], n = wd[2], e_all = wd[0];
  if (k > INT32_MAX || n > INT32_MAX || m_all > INT32_MAX) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "cpu_gmm: dimensions exceed int32");
  }
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  const int32_t* gs = sizes.typed_data();
  float* op = out->typed_data();
  const int ki = static_cast<int>(k), ni = static_cast<int>(n);
  const float one = 1.0f, zero = 0.0f;
  int64_t row = 0;
  for (int64_t e = 0; e < e_all && row < m_all; ++e) {
    int64_t rows = gs[e] < 0 ? 0 : gs[e];
    if (rows > m_all - row) rows = m_all - row;
    if (rows == 0) continue;
    const int mi = static_cast<int>(rows);
    // Column-major view of row-major arrays: out^T [N, rows] = w_e^T [N, K] @ x^T [K, rows].
    g_sgemm("N", "N", &ni, &mi, &ki, &one, wp + e * k * n, &ni, xp + row * k, &ki, &zero,
            op + row * n, &ni);
    row += rows;
  }
  if (row < m_all) std::memset(op + row * n, 0, sizeof(float) * (m_all - row) * n);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsjGroupedMatmul, GroupedMatmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w [E, K, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // sizes [E]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out [M, N]
