// Block-wise 8-bit state codec on CPU: kernels/quantize.py's quantize_blockwise_ and
// dequantize_blockwise in one pass per block instead of a chain of eager tensor operations.
//
// The maps and the lookup tables come from Python (kernels/quantize.py `_search`), so there is one
// definition of the format; the steps are the same (absmax with NaN propagation, x / max(absmax,
// tiny), the nearest code by the upper-16-bit table plus `steps` comparisons with the midpoints,
// ties to the lower code, no zero code for a positive unsigned value) and give the same bytes,
// tested against the eager functions.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

void check_cpu(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype,
              "quantize_blockwise: ", name, " must be a contiguous CPU tensor of ", dtype);
}

void quantize_blockwise_8bit(const at::Tensor& x, at::Tensor codes, at::Tensor absmax, const at::Tensor& table,
                             const at::Tensor& midpoints, int64_t steps, bool is_signed, int64_t block_size) {
  check_cpu(x, at::kFloat, "x");
  check_cpu(codes, at::kByte, "codes");
  check_cpu(absmax, at::kFloat, "absmax");
  check_cpu(table, at::kInt, "table");
  check_cpu(midpoints, at::kFloat, "midpoints");
  const int64_t numel = x.numel(), blocks = (numel + block_size - 1) / block_size;
  TORCH_CHECK(codes.numel() == numel && absmax.numel() == blocks && table.numel() == 65536 && block_size > 0,
              "quantize_blockwise: sizes of codes, absmax or table do not match x");
  const float* in = x.data_ptr<float>();
  uint8_t* out = codes.data_ptr<uint8_t>();
  float* maxima = absmax.data_ptr<float>();
  const int32_t* lookup = table.data_ptr<int32_t>();
  const float* mids = midpoints.data_ptr<float>();  // the map's midpoints, then +inf
  const float tiny = std::numeric_limits<float>::min();
  constexpr int64_t kPiece = 256;  // elements scaled and looked up at a time, in stack buffers
  at::parallel_for(0, blocks, 16, [=](int64_t first, int64_t last) {  // by value: no aliasing with out
    alignas(64) float scaled[kPiece];
    alignas(64) int32_t index[kPiece];
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * block_size, end = std::min(numel, begin + block_size);
      float peak = 0.0f;
      int nan = 0;
#pragma omp simd reduction(max : peak) reduction(| : nan)
      for (int64_t i = begin; i < end; ++i) {
        const float a = std::fabs(in[i]);
        peak = std::max(peak, a);
        nan |= a != a;
      }
      if (nan) peak = std::numeric_limits<float>::quiet_NaN();  // torch.amax: NaN wins
      maxima[b] = peak;
      const float divisor = std::isnan(peak) ? peak : std::max(peak, tiny);
      for (int64_t piece = begin; piece < end; piece += kPiece) {
        const int64_t n = std::min(kPiece, end - piece);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) scaled[i] = in[piece + i] / divisor;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {  // the midpoints below the value's bf16-wide interval
          int32_t bits;
          std::memcpy(&bits, &scaled[i], sizeof bits);
          index[i] = lookup[(bits >> 16) + 32768];
        }
        for (int64_t s = 0; s < steps; ++s) {  // and those inside it that are below the value
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) index[i] += mids[index[i]] < scaled[i] ? 1 : 0;
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          int32_t k = std::min(index[i], 255);
          if (!is_signed && scaled[i] > 0.0f) k = std::max(k, 1);  // a positive value never codes to 0
          out[piece + i] = static_cast<uint8_t>(k);
        }
      }
    }
  });
}

void dequantize_blockwise_8bit(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code,
                               at::Tensor out, int64_t block_size) {
  check_cpu(codes, at::kByte, "codes");
  check_cpu(absmax, at::kFloat, "absmax");
  check_cpu(code, at::kFloat, "code");
  check_cpu(out, at::kFloat, "out");
  const int64_t numel = codes.numel(), blocks = (numel + block_size - 1) / block_size;
  TORCH_CHECK(out.numel() == numel && absmax.numel() == blocks && code.numel() == 256 && block_size > 0,
              "dequantize_blockwise: sizes of out, absmax or code do not match codes");
  const uint8_t* in = codes.data_ptr<uint8_t>();
  const float* maxima = absmax.data_ptr<float>();
  const float* values = code.data_ptr<float>();
  float* result = out.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [=](int64_t first, int64_t last) {  // by value: no aliasing with out
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * block_size, end = std::min(numel, begin + block_size);
      const float scale = maxima[b];
      for (int64_t i = begin; i < end; ++i) result[i] = values[in[i]] * scale;
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optim_plugins, module) {
  module.def("quantize_blockwise_8bit", &quantize_blockwise_8bit);
  module.def("dequantize_blockwise_8bit", &dequantize_blockwise_8bit);
}
