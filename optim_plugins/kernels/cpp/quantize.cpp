// Block-wise 8-bit and 4-bit state codecs on CPU: kernels/quantize.py's quantisers and
// dequantisers in one pass per block instead of a chain of eager tensor operations; the rank-1
// 4-bit ones of 2-D tensors in two passes (maxima, codes) and one (decode).
//
// The maps and the nearest-code table come from Python (kernels/quantize.py `nearest_code_table`), so
// there is one definition of the formats (but for the rank-1 codec's linear map, whose nearest code and
// values are arithmetic: codec.h nearest_linear4_code and decode_rank1, tested against the map); the coding itself is
// codec.h's (shared with the compiled backend's loops) and gives the bytes of the eager functions,
// tested against them.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "codec.h"

namespace {

namespace codec = optim_plugins_codec;

void check_cpu(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype,
              "quantize_blockwise: ", name, " must be a contiguous CPU tensor of ", dtype);
}

template <int BITS, bool POSITIVE_NOT_ZERO>
void quantize_blocks(const float* in, uint8_t* out, float* maxima, const int32_t* table, int64_t numel,
                     int64_t block_size) {
  const int64_t blocks = (numel + block_size - 1) / block_size;
  at::parallel_for(0, blocks, 16, [=](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * block_size, count = std::min(numel, begin + block_size) - begin;
      if (maxima)
        codec::code_block<BITS, POSITIVE_NOT_ZERO>(in + begin, begin, count, table, out, maxima + b);
      else  // already scaled (rank-1 normalisation): x / 1.0f is x
        codec::code<BITS, POSITIVE_NOT_ZERO>(in + begin, begin, count, 1.0f, table, out);
    }
  });
}

// x (float32) -> codes (uint8: one per element with bits 8, two per byte with bits 4) and, with
// `scaled_by_block`, one absmax per block; without it x is already scaled (rank-1 normalisation).
void quantize_blockwise(const at::Tensor& x, at::Tensor codes, at::Tensor absmax, const at::Tensor& table,
                        bool scaled_by_block, bool positive_not_zero, int64_t block_size, int64_t bits) {
  check_cpu(x, at::kFloat, "x");
  check_cpu(codes, at::kByte, "codes");
  check_cpu(absmax, at::kFloat, "absmax");
  check_cpu(table, at::kInt, "table");
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
  if (bits == 4)
    quantize_blocks<4, false>(in, out, maxima, lookup, numel, block_size);
  else if (positive_not_zero)
    quantize_blocks<8, true>(in, out, maxima, lookup, numel, block_size);
  else
    quantize_blocks<8, false>(in, out, maxima, lookup, numel, block_size);
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
  at::parallel_for(0, blocks, 16, [=](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * block_size, count = std::min(numel, begin + block_size) - begin;
      const float scale = maxima ? maxima[b] : 1.0f;  // x * 1.0f is x: one formula for both
      if (bits == 8) codec::decode<8>(in, begin, count, scale, values, result + begin);
      else codec::decode<4>(in, begin, count, scale, values, result + begin);
    }
  });
}

constexpr int64_t kRank1Block = 128;  // elements coded or decoded at a time (even: whole bytes)

// Rank-1 4-bit coding of a 2-D (rows x cols) float32 tensor (kernels/quantize.py quantize_4bit_rank1_):
// maxima = [max |x| of each row, of each column] (NaN where one holds a NaN, as torch.amax), then
// each element divided by max(minimum(its row's, its column's maximum), smallest normal float) and
// coded in the linear map without zero (codec.h nearest_linear4_code), two codes per byte.
void quantize_4bit_rank1_2d(const at::Tensor& x, at::Tensor packed, at::Tensor maxima) {
  check_cpu(x, at::kFloat, "x");
  check_cpu(packed, at::kByte, "packed");
  check_cpu(maxima, at::kFloat, "maxima");
  TORCH_CHECK(x.dim() == 2, "quantize_4bit_rank1_2d: x must be 2-D");
  const int64_t rows = x.size(0), cols = x.size(1), numel = x.numel();
  TORCH_CHECK(packed.numel() == (numel + 1) / 2 && maxima.numel() == rows + cols,
              "quantize_4bit_rank1_2d: sizes of packed or maxima do not match x");
  if (numel == 0) return;
  const float* in = x.data_ptr<float>();
  float* row_max = maxima.data_ptr<float>();
  float* column_max = row_max + rows;
  // the maxima: rows cut into parts stepped in parallel, each part keeping its own column maxima (no
  // thread ids: the parts are fixed), merged after
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), rows, numel / 65536}));
  std::vector<float> columns(static_cast<size_t>(parts * cols), 0.0f);
  at::parallel_for(0, parts, 1, [&](int64_t first, int64_t last) {
    for (int64_t part = first; part < last; ++part) {
      const int64_t begin = part * rows / parts * cols, end = (part + 1) * rows / parts * cols;
      std::fill(row_max + begin / cols, row_max + end / cols, 0.0f);
      codec::add_rank1_maxima(in + begin, begin, end - begin, cols, row_max, columns.data() + part * cols);
    }
  });
  for (int64_t c = 0; c < cols; ++c) {
    float peak = columns[c];
    for (int64_t part = 1; part < parts; ++part) peak = codec::nan_maximum(peak, columns[part * cols + c]);
    column_max[c] = peak;
  }
  // the codes, a block of elements at a time (blocks may span rows)
  uint8_t* out = packed.data_ptr<uint8_t>();
  const int64_t blocks = (numel + kRank1Block - 1) / kRank1Block;
  at::parallel_for(0, blocks, 64, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * kRank1Block, end = std::min(numel, begin + kRank1Block);
      codec::code_rank1(in + begin, begin, end - begin, cols, row_max, column_max, out);
    }
  });
}

// The 2-D tensor out (rows x cols) that rank-1 4-bit `packed` and `maxima` stand for:
// the linear map's value of each code times minimum(its row's, its column's maximum)
// (kernels/quantize.py dequantize_4bit_rank1).
void dequantize_4bit_rank1_2d(const at::Tensor& packed, const at::Tensor& maxima, at::Tensor out) {
  check_cpu(packed, at::kByte, "packed");
  check_cpu(maxima, at::kFloat, "maxima");
  check_cpu(out, at::kFloat, "out");
  TORCH_CHECK(out.dim() == 2, "dequantize_4bit_rank1_2d: out must be 2-D");
  const int64_t rows = out.size(0), cols = out.size(1), numel = out.numel();
  TORCH_CHECK(packed.numel() == (numel + 1) / 2 && maxima.numel() == rows + cols,
              "dequantize_4bit_rank1_2d: sizes of packed or maxima do not match out");
  const uint8_t* in = packed.data_ptr<uint8_t>();
  const float* row_max = maxima.data_ptr<float>();
  const float* column_max = row_max + rows;
  float* result = out.data_ptr<float>();
  const int64_t blocks = (numel + kRank1Block - 1) / kRank1Block;
  at::parallel_for(0, blocks, 64, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      const int64_t begin = b * kRank1Block, end = std::min(numel, begin + kRank1Block);
      codec::decode_rank1(in, begin, end - begin, cols, row_max, column_max, result + begin);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optim_plugins, module) {
  module.def("quantize_blockwise", &quantize_blockwise);
  module.def("dequantize_blockwise", &dequantize_blockwise);
  module.def("quantize_4bit_rank1_2d", &quantize_4bit_rank1_2d);
  module.def("dequantize_4bit_rank1_2d", &dequantize_4bit_rank1_2d);
}
