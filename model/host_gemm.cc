// Single-precision GEMM as an XLA:CPU FFI handler, for model/host_blas.py.
//
// C = op(A) op(B), row-major, op = transpose when trans_a / trans_b is set; rank-3 operands
// carry a shared leading batch dim. The work is split into one part per thread of XLA's own
// intra-op pool (batch entries, else row or column blocks of C) and each part calls a
// sequential cblas_sgemm, so the BLAS never starts threads that compete with XLA's.

#include <algorithm>
#include <cstdint>
#include <functional>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                       int, float, float*, int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
Sgemm sgemm = nullptr;

ffi::Future Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                 ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  const int rank = ad.size();
  const int64_t batch = rank == 3 ? ad[0] : 1;
  const int64_t ar = ad[rank - 2], ac = ad[rank - 1], br = bd[rank - 2], bc = bd[rank - 1];
  const int64_t m = trans_a ? ac : ar, k = trans_a ? ar : ac, n = trans_b ? br : bc;
  const float* A = a.typed_data();
  const float* B = b.typed_data();
  float* C = c->typed_data();
  const int ta = trans_a ? kTrans : kNoTrans, tb = trans_b ? kTrans : kNoTrans;
  int64_t parts = std::max<int64_t>(1, pool.num_threads());
  std::function<void(int64_t)> run;
  if (batch > 1) {
    const int64_t per = (batch + parts - 1) / parts;
    parts = (batch + per - 1) / per;
    run = [=](int64_t part) {
      for (int64_t i = part * per; i < std::min(batch, (part + 1) * per); ++i)
        sgemm(kRowMajor, ta, tb, m, n, k, 1.0f, A + i * ar * ac, ac, B + i * br * bc, bc, 0.0f,
              C + i * m * n, n);
    };
  } else {
    // Split the longer side of C into blocks of a multiple of 16 rows or columns.
    const bool split_rows = m >= n;
    const int64_t extent = split_rows ? m : n;
    const int64_t block = ((extent + parts - 1) / parts + 15) / 16 * 16;
    parts = std::max<int64_t>(1, (extent + block - 1) / block);
    run = [=](int64_t part) {
      const int64_t lo = part * block, len = std::min(block, extent - lo);
      if (split_rows)
        sgemm(kRowMajor, ta, tb, len, n, k, 1.0f, trans_a ? A + lo : A + lo * ac, ac, B, bc,
              0.0f, C + lo * n, n);
      else
        sgemm(kRowMajor, ta, tb, m, len, k, 1.0f, A, ac, trans_b ? B + lo * bc : B + lo, bc,
              0.0f, C + lo, n);
    };
  }
  ffi::CountDownPromise done(parts);
  ffi::Future future(done);
  for (int64_t part = 1; part < parts; ++part)
    pool.Schedule([=]() mutable {
      run(part);
      done.CountDown();
    });
  run(0);
  done.CountDown();
  return future;
}

}  // namespace

extern "C" void seedling_set_sgemm(void* cblas_sgemm) {
  sgemm = reinterpret_cast<Sgemm>(cblas_sgemm);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SeedlingGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
