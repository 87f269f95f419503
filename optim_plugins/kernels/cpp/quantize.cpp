// Block-wise 8-bit and 4-bit state codecs on CPU: kernels/quantize.py's quantisers and
// dequantisers in one pass per block instead of a chain of eager tensor operations.
//
// The maps and the lookup tables come from Python (kernels/quantize.py `_search`), so there is one
// definition of the formats; the steps are the same (absmax with NaN propagation, x / max(absmax,
// tiny), the nearest code by the upper-16-bit table plus `steps` comparisons with the midpoints,
// ties to the lower code; for the unsigned 8-bit map no zero code for a positive value; 4 bits:
// element 2k in the high nibble, 2k+1 in the low one) and give the same bytes, tested against the
// eager functions.
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

// x (float32) -> codes (uint8: one per element with bits 8, two per byte with bits 4) and, with
// `scaled_by_block`, one absmax per block; without it x is already scaled (rank-1 normalisation).
void quantize_blockwise(const at::Tensor& x, at::Tensor codes, at::Tensor absmax, const at::Tensor& table,
                        const at::Tensor& midpoints, int64_t steps, bool scaled_by_block, bool positive_not_zero,
                        int64_t block_size, int64_t bits) {
  check_cpu(x, at::kFloat, "x");
  check_cpu(codes, at::kByte, "codes");
  check_cpu(absmax, at::kFloat, "absmax");
  check_cpu(table, at::kInt, "table");
  check_cpu(midpoints, at::kFloat, "midpoints");
  const int64_t numel = x.numel(), blocks = (numel + block_size - 1) / block_size;
  TORCH_CHECK((bits == 8 || (bits == 4 && block_size % 2 == 0)) && block_size > 0,
              "quantize_blockwise: bits must be 8, or 4 with an even block size");
  TORCH_CHECK(codes.numel() == (bits == 8 ? numel : (numel + 1) / 2) && table.numel() == 65536 &&
              (!scaled_by_block || absmax.numel() == blocks),
              "quantize_blockwise: sizes of codes, absmax or table do not match x");
  const float* in = x.data_ptr<float>();
  uint8_t* out = codes.data_ptr<uint8_t>();
  float* maxima = scaled_by_block ? absmax.data_ptr<float>() : nullptr;
  const int32_t* lookup = table.data_ptr<int32_t>();
  const float* mids = midpoints.data_ptr<float>();  // the map's midpoints, then +inf
  const int32_t last_code = int32_t(midpoints.numel() - 1);
  const float tiny = std::numeric_limits<float>::min();
  constexpr int64_t kPiece = 256;  // elements scaled and looked up at a time, in stack buffers (even)
  at::parallel_for(0, blocks, 16, [=](int64_t first, int64_t last) {  // by value: no aliasing with out
    alignas(64) float scaled[kPiece];
    alignas(64) int32_t index[kPiece];
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * block_size, end = std::min(numel, begin + block_size);
      float divisor = 1.0f;
      if (scaled_by_block) {
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
        divisor = std::isnan(peak) ? peak : std::max(peak, tiny);
      }
      for (int64_t piece = begin; piece < end; piece += kPiece) {
        const int64_t n = std::min(kPiece, end - piece);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) scaled[i] = in[piece + i] / divisor;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {  // the midpoints below the value's bf16-wide interval
          int32_t high;
          std::memcpy(&high, &scaled[i], sizeof high);
          index[i] = lookup[(high >> 16) + 32768];
        }
        for (int64_t s = 0; s < steps; ++s) {  // and those inside it that are below the value
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) index[i] += mids[index[i]] < scaled[i] ? 1 : 0;
        }
        if (bits == 8) {
          uint8_t* target = out + piece;
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            int32_t k = std::min(index[i], last_code);
            if (positive_not_zero && scaled[i] > 0.0f) k = std::max(k, 1);  // a positive v never codes to 0
            target[i] = static_cast<uint8_t>(k);
          }
        } else {  // piece is even: its pairs are whole; an odd tail pairs with a 0
          for (int64_t i = 0; i < n; i += 2)
            out[(piece + i) / 2] = static_cast<uint8_t>((std::min(index[i], last_code) << 4) |
                                                        (i + 1 < n ? std::min(index[i + 1], last_code) : 0));
        }
      }
    }
  });
}

template <int kBits>
void decode_range(const uint8_t* __restrict__ in, const float* __restrict__ values, float scale,
                  float* __restrict__ out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const int code = kBits == 8 ? in[i] : (in[i / 2] >> (i % 2 ? 0 : 4)) & 0xF;
    out[i] = values[code] * scale;
  }
}

// codes -> out (float32): code[index] times the block's absmax (without `scaled_by_block`: code[index]).
void dequantize_blockwise(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& code, at::Tensor out,
                          bool scaled_by_block, int64_t block_size, int64_t bits) {
  check_cpu(codes, at::kByte, "codes");
  check_cpu(absmax, at::kFloat, "absmax");
  check_cpu(code, at::kFloat, "code");
  check_cpu(out, at::kFloat, "out");
  const int64_t numel = out.numel(), blocks = (numel + block_size - 1) / block_size;
  TORCH_CHECK((bits == 8 || (bits == 4 && block_size % 2 == 0)) && block_size > 0,
              "dequantize_blockwise: bits must be 8, or 4 with an even block size");
  TORCH_CHECK(codes.numel() == (bits == 8 ? numel : (numel + 1) / 2) && code.numel() == (int64_t(1) << bits) &&
              (!scaled_by_block || absmax.numel() == blocks),
              "dequantize_blockwise: sizes of codes, absmax or code do not match out");
  const uint8_t* in = codes.data_ptr<uint8_t>();
  const float* maxima = scaled_by_block ? absmax.data_ptr<float>() : nullptr;
  const float* values = code.data_ptr<float>();
  float* result = out.data_ptr<float>();
  if (bits == 8 && scaled_by_block) {  // the 8-bit states: their own loop, as simple as it gets
    at::parallel_for(0, blocks, 16, [=](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const int64_t begin = b * block_size, end = std::min(numel, begin + block_size);
        const float scale = maxima[b];
        for (int64_t i = begin; i < end; ++i) result[i] = values[in[i]] * scale;
      }
    });
    return;
  }
  at::parallel_for(0, blocks, 16, [=](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * block_size, end = std::min(numel, begin + block_size);
      const float scale = scaled_by_block ? maxima[b] : 1.0f;  // x * 1.0f is x: one formula for both
      if (bits == 8) decode_range<8>(in, values, scale, result, begin, end);
      else decode_range<4>(in, values, scale, result, begin, end);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optim_plugins, module) {
  module.def("quantize_blockwise", &quantize_blockwise);
  module.def("dequantize_blockwise", &dequantize_blockwise);
}
