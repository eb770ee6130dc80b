// gemm_example: a W8A8 linear layer through the segquant_kernels C API, checked against the CPU.
//
//   y = dequant(quantize(x)) @ dequant(Wq)^T + bias
//
// 1. x [M, K] float32 random (fresh every run unless --seed), W [N, K] float32 random;
// 2. W quantized on the host per output channel (scale_w[n] = amax / 127), x's per-tensor scale
//    computed on the host (amax / 127);
// 3. on the GPU: sq_quantize(x -> int8 A, per-tensor scale), then sq_gemm(A, Wq, row_scale = x's
//    scale for every row, col_scale = scale_w, bias) -> y bf16;
// 4. on the CPU: the same quantization (float32 IEEE division, round half to even, clamp) must give
//    the same int8 bytes, and y must match the exact integer GEMM scaled in double precision
//    (relative error ||y - ref|| / ||ref|| <= 5e-3 for a bf16 output: bf16 rounding alone is ~1e-3).
//
// Prints the errors and PASS or FAIL; the exit code is 0 only on PASS. `--path sm80` runs the CUTLASS 2
// GEMMs (sm_80 / sm_89 kernels; also on sm_90), `--path sm90` only the sm_90a ones (default: auto).
//
// Build (after `segquant-fx build-kernels`), from the repository root:
//   nvcc -O2 -std=c++17 -Ikernels_cuda/include kernels_cuda/examples/gemm_example.cpp \
//        -o kernels_cuda/build/gemm_example -Lkernels_cuda/build -lsegquant_kernels -Xlinker -rpath,'$ORIGIN'
// or `segquant-fx build-kernels --example`. Run: kernels_cuda/build/gemm_example [M N K] [--seed S]
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "segquant_kernels.h"

#define CUDA_CHECK(call)                                                                       \
  do {                                                                                         \
    cudaError_t err_ = (call);                                                                 \
    if (err_ != cudaSuccess) {                                                                 \
      std::fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call,               \
                   cudaGetErrorString(err_));                                                  \
      std::printf("FAIL\n");                                                                   \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

#define SQ_CHECK(call)                                                                                 \
  do {                                                                                                 \
    sq_status st_ = (call);                                                                            \
    if (st_ != SQ_OK) {                                                                                \
      std::fprintf(stderr, "%s:%d: %s returned %s (%s)\n", __FILE__, __LINE__, #call,                 \
                   sq_status_string(st_), sq_last_error());                                            \
      std::printf("FAIL\n");                                                                           \
      std::exit(1);                                                                                    \
    }                                                                                                  \
  } while (0)

// Host reference of the contract's int8 quantization: clamp(round_half_even(v / s), -128, 127).
static int8_t quantize_host(float v, float s) {
  volatile float q = v / s;  // one IEEE float32 division (volatile: no contraction/reassociation)
  float r = std::nearbyint(q);  // default rounding mode: round half to even
  r = std::fmin(std::fmax(r, -128.f), 127.f);
  return static_cast<int8_t>(r);
}

static float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static uint16_t float_to_bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

int main(int argc, char** argv) {
  int64_t M = 77, N = 1024, K = 3072;  // M deliberately not a multiple of any tile size
  uint64_t seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  int pos = 0;
  sq_gemm_path path = SQ_PATH_AUTO;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--seed") == 0 && i + 1 < argc) {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else if (std::strcmp(argv[i], "--path") == 0 && i + 1 < argc) {
      const char* p = argv[++i];
      if (std::strcmp(p, "auto") == 0) {
        path = SQ_PATH_AUTO;
      } else if (std::strcmp(p, "sm90") == 0) {
        path = SQ_PATH_SM90;
      } else if (std::strcmp(p, "sm80") == 0) {
        path = SQ_PATH_SM80;
      } else {
        std::fprintf(stderr, "unknown --path %s: use auto, sm90 or sm80\n", p);
        return 2;
      }
    } else if (pos < 3) {
      int64_t v = std::strtoll(argv[i], nullptr, 10);
      (pos == 0 ? M : pos == 1 ? N : K) = v;
      ++pos;
    } else {
      std::fprintf(stderr, "usage: %s [M N K] [--seed S] [--path auto|sm90|sm80]\n", argv[0]);
      return 2;
    }
  }
  if (M < 1 || N < 8 || K < 16 || N % 8 != 0 || K % 16 != 0) {
    std::fprintf(stderr, "need M >= 1, N a multiple of 8, K a multiple of 16 (got M=%lld N=%lld K=%lld)\n",
                 (long long)M, (long long)N, (long long)K);
    return 2;
  }
  sq_set_gemm_path(path);
  std::printf("segquant_kernels API %d; M=%lld N=%lld K=%lld seed=%llu gemm path %d\n", sq_api_version(),
              (long long)M, (long long)N, (long long)K, (unsigned long long)seed, (int)path);

  int dev = 0;
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("device %d: %s (sm_%d%d)\n", dev, prop.name, prop.major, prop.minor);

  // ---- host data: random activations with a few outlier channels, random weights ----
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(M * K), w(N * K), bias_f(N);
  for (int64_t k = 0; k < K; ++k) {
    const float channel_scale = (k % 97 == 0) ? 8.f : 1.f;
    for (int64_t m = 0; m < M; ++m) x[m * K + k] = normal(rng) * channel_scale;
  }
  for (auto& v : w) v = normal(rng) * 0.05f;
  for (auto& v : bias_f) v = normal(rng);

  float x_amax = 0.f;
  for (float v : x) x_amax = std::fmax(x_amax, std::fabs(v));
  const float x_scale = std::fmax(x_amax, 5.9604644775390625e-08f) / 127.f;

  std::vector<int8_t> wq(N * K);
  std::vector<float> w_scale(N);
  for (int64_t n = 0; n < N; ++n) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::fmax(amax, std::fabs(w[n * K + k]));
    w_scale[n] = std::fmax(amax, 5.9604644775390625e-08f) / 127.f;
    for (int64_t k = 0; k < K; ++k) wq[n * K + k] = quantize_host(w[n * K + k], w_scale[n]);
  }
  std::vector<float> row_scale(M, x_scale);
  std::vector<uint16_t> bias(N);
  for (int64_t n = 0; n < N; ++n) bias[n] = float_to_bf16(bias_f[n]);

  // ---- device buffers ----
  float *d_x = nullptr, *d_xscale = nullptr, *d_rs = nullptr, *d_cs = nullptr;
  int8_t *d_a = nullptr, *d_b = nullptr;
  uint16_t *d_y = nullptr, *d_bias = nullptr;
  void* d_ws = nullptr;
  CUDA_CHECK(cudaMalloc(&d_x, sizeof(float) * M * K));
  CUDA_CHECK(cudaMalloc(&d_xscale, sizeof(float)));
  CUDA_CHECK(cudaMalloc(&d_rs, sizeof(float) * M));
  CUDA_CHECK(cudaMalloc(&d_cs, sizeof(float) * N));
  CUDA_CHECK(cudaMalloc(&d_a, M * K));
  CUDA_CHECK(cudaMalloc(&d_b, N * K));
  CUDA_CHECK(cudaMalloc(&d_y, sizeof(uint16_t) * M * N));
  CUDA_CHECK(cudaMalloc(&d_bias, sizeof(uint16_t) * N));
  CUDA_CHECK(cudaMemcpy(d_x, x.data(), sizeof(float) * M * K, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_xscale, &x_scale, sizeof(float), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_rs, row_scale.data(), sizeof(float) * M, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_cs, w_scale.data(), sizeof(float) * N, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_b, wq.data(), N * K, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(d_bias, bias.data(), sizeof(uint16_t) * N, cudaMemcpyHostToDevice));
  // Poison the outputs: 0x7F bytes are int8 127 / bf16 NaN-ish patterns that must be overwritten.
  CUDA_CHECK(cudaMemset(d_a, 0x7F, M * K));
  CUDA_CHECK(cudaMemset(d_y, 0xFF, sizeof(uint16_t) * M * N));  // bf16 0xFFFF is NaN

  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreate(&stream));

  // ---- sq_quantize: x float32 -> int8, per-tensor scale (strides 0), one segment ----
  sq_segments segs{};
  segs.n = 1;
  segs.offsets[0] = 0;
  segs.offsets[1] = static_cast<int32_t>(K);
  sq_scale xs{d_xscale, 0, 0};
  SQ_CHECK(sq_quantize(d_x, SQ_FP32, d_a, SQ_INT8, M, K, xs, segs, nullptr, stream));

  // ---- sq_gemm: y = row_scale[m] * col_scale[n] * (A @ B^T) + bias[n], bf16 out ----
  const size_t ws_size = sq_gemm_workspace_size(SQ_INT8, SQ_BF16, M, N, K);
  if (ws_size > 0) CUDA_CHECK(cudaMalloc(&d_ws, ws_size));
  SQ_CHECK(sq_gemm(d_a, d_b, SQ_INT8, d_y, SQ_BF16, M, N, K, d_rs, d_cs, d_bias, d_ws, ws_size, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
  CUDA_CHECK(cudaGetLastError());

  std::vector<int8_t> a(M * K);
  std::vector<uint16_t> y(M * N);
  CUDA_CHECK(cudaMemcpy(a.data(), d_a, M * K, cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(y.data(), d_y, sizeof(uint16_t) * M * N, cudaMemcpyDeviceToHost));

  // ---- CPU reference ----
  int64_t q_mismatch = 0;
  std::vector<int8_t> a_ref(M * K);
  for (int64_t i = 0; i < M * K; ++i) {
    a_ref[i] = quantize_host(x[i], x_scale);
    q_mismatch += (a_ref[i] != a[i]);
  }
  double err2 = 0.0, ref2 = 0.0;
  int64_t non_finite = 0;
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* ar = &a_ref[m * K];
    for (int64_t n = 0; n < N; ++n) {
      const int8_t* br = &wq[n * K];
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<int32_t>(ar[k]) * static_cast<int32_t>(br[k]);
      const double ref = static_cast<double>(acc) * x_scale * w_scale[n] + bf16_to_float(bias[n]);
      const double got = bf16_to_float(y[m * N + n]);
      if (!std::isfinite(got)) ++non_finite;
      err2 += (got - ref) * (got - ref);
      ref2 += ref * ref;
    }
  }
  const double rel = std::sqrt(err2 / (ref2 > 0 ? ref2 : 1.0));
  std::printf("quantize: %lld of %lld int8 values differ from the CPU reference\n", (long long)q_mismatch,
              (long long)(M * K));
  std::printf("gemm: relative error %.3e vs the exact integer GEMM (bf16 output), %lld non-finite outputs\n", rel,
              (long long)non_finite);

  CUDA_CHECK(cudaStreamDestroy(stream));
  cudaFree(d_x);
  cudaFree(d_xscale);
  cudaFree(d_rs);
  cudaFree(d_cs);
  cudaFree(d_a);
  cudaFree(d_b);
  cudaFree(d_y);
  cudaFree(d_bias);
  if (d_ws) cudaFree(d_ws);

  const bool pass = q_mismatch == 0 && non_finite == 0 && rel <= 5e-3;
  std::printf("%s\n", pass ? "PASS" : "FAIL");
  return pass ? 0 : 1;
}
