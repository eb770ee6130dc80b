// Library-level entry points: version, status strings, per-thread last-error text.
#include <stdarg.h>
#include <stdio.h>

#include <atomic>

#include "common.cuh"

namespace {
constexpr int kErrorLen = 1024;
thread_local char g_last_error[kErrorLen] = "";
std::atomic<int> g_gemm_path{SQ_PATH_AUTO};
}  // namespace

namespace sq {
void set_last_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_last_error, kErrorLen, fmt, ap);
  va_end(ap);
}

GemmTarget gemm_target() {
  GemmTarget t;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return t;
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  t.cc = major * 10 + minor;
  const int want = g_gemm_path.load(std::memory_order_relaxed);
  if (t.cc == 90 && want != SQ_PATH_SM80) {
    t.path = GemmPath::kSm90;
  } else if (major >= 8 && want != SQ_PATH_SM90) {
    t.path = GemmPath::kSm80;  // a part the library was not built for fails its launch with SQ_ERR_ARCH
  }
  return t;
}

sq_status no_gemm_path(const char* op, GemmTarget t) {
  if (t.cc == 0) {
    set_last_error("%s: no current CUDA device", op);
  } else {
    set_last_error("%s: no GEMM for sm_%d (sm_90a kernels need sm_90, the CUTLASS 2 kernels sm_80+; gemm path %d)",
                   op, t.cc, g_gemm_path.load());
  }
  return SQ_ERR_ARCH;
}

sq_status check_fp8_cc(const char* op, GemmTarget t, sq_dtype ab) {
  if (ab != SQ_FP8E4M3 || t.cc >= 89) return SQ_OK;
  set_last_error("%s: fp8 e4m3 GEMMs need sm_89 or newer, this device is sm_%d", op, t.cc);
  return SQ_ERR_UNSUPPORTED;
}

}  // namespace sq

extern "C" {

int sq_api_version(void) { return SQ_API_VERSION; }

const char* sq_status_string(sq_status s) {
  switch (s) {
    case SQ_OK:
      return "SQ_OK";
    case SQ_ERR_INVALID:
      return "SQ_ERR_INVALID (bad argument)";
    case SQ_ERR_UNSUPPORTED:
      return "SQ_ERR_UNSUPPORTED (no kernel for this case)";
    case SQ_ERR_CUDA:
      return "SQ_ERR_CUDA (a CUDA call or launch failed)";
    case SQ_ERR_ARCH:
      return "SQ_ERR_ARCH (the device's architecture is not compiled in)";
  }
  return "unknown sq_status";
}

const char* sq_last_error(void) { return g_last_error; }

sq_gemm_path sq_set_gemm_path(sq_gemm_path path) {
  if (path != SQ_PATH_AUTO && path != SQ_PATH_SM90 && path != SQ_PATH_SM80) {
    return static_cast<sq_gemm_path>(g_gemm_path.load());
  }
  return static_cast<sq_gemm_path>(g_gemm_path.exchange(path));
}

}  // extern "C"
