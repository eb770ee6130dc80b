// Library-level entry points: version, status strings, per-thread last-error text.
#include <stdarg.h>
#include <stdio.h>

#include "common.cuh"

namespace {
constexpr int kErrorLen = 1024;
thread_local char g_last_error[kErrorLen] = "";
}  // namespace

namespace sq {
void set_last_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_last_error, kErrorLen, fmt, ap);
  va_end(ap);
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

}  // extern "C"
