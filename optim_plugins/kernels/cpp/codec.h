// Block-wise 8/4-bit state coding in the formats of kernels/quantize.py, written once for quantize.cpp
// (the codec on its own) and for the compiled backend's generated loops (loops.py: decoded and coded
// around the update, block by block). Plain C++17, no ATen: both include it.
//
// A block of values is divided by its absmax (at least the smallest normal float; NaN where the block
// holds one) and each value becomes the index of the nearest code of the map (ties to the lower code),
// looked up in kernels.quantize.nearest_code_table: bits 0-7 of the entry for a value's upper 16 bits
// count the midpoints below that bf16-wide bucket, bits 8-23 hold the order key of the one midpoint
// inside it (0xFFFF: none), and the value takes one more where its own key (its lower 16 bits, reversed
// for negative values, whose bits grow as they fall) is greater. 8 bits: one code per byte; 4 bits: two,
// element 2k in the high nibble of byte k.
//
// Rank-1 4-bit states of a 2-D (rows x cols) tensor (kernels/quantize.py quantize_4bit_rank1_): element
// (r, c) divided by max(minimum(row_max[r], col_max[c]), smallest normal float) and coded in the linear
// map without zero, whose nearest code is arithmetic (nearest_linear4_code).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace optim_plugins_codec {

// out[i] = value(code of element first + i), for count elements
template <int BITS, typename Value>
inline void decode_with(const uint8_t* __restrict__ codes, int64_t first, int64_t count, Value value,
                        float* __restrict__ out) {
  if constexpr (BITS == 8) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) out[i] = value(codes[first + i]);
  } else {  // byte by byte: an odd first element alone, then whole pairs, then an odd last one
    int64_t i = 0;
    if (count > 0 && first % 2) out[i++] = value(codes[first / 2] & 0xF);
    const uint8_t* __restrict__ pairs = codes + (first + i) / 2;
    const int64_t whole = (count - i) / 2;
#pragma omp simd
    for (int64_t k = 0; k < whole; ++k) {
      out[i + 2 * k] = value(pairs[k] >> 4);
      out[i + 2 * k + 1] = value(pairs[k] & 0xF);
    }
    i += 2 * whole;
    if (i < count) out[i] = value(codes[(first + i) / 2] >> 4);
  }
}

// out[i] = values[code of element first + i] * scale, for count elements
template <int BITS>
inline void decode(const uint8_t* __restrict__ codes, int64_t first, int64_t count, float scale,
                   const float* __restrict__ values, float* __restrict__ out) {
  decode_with<BITS>(codes, first, count, [=](int k) { return values[k] * scale; }, out);
}

// The largest |x| of a block; NaN where it holds a NaN (as torch.amax)
inline float absmax(const float* __restrict__ x, int64_t count) {
  float peak = 0.0f;
  int nan = 0;
#pragma omp simd reduction(max : peak) reduction(| : nan)
  for (int64_t i = 0; i < count; ++i) {
    const float a = std::fabs(x[i]);
    peak = peak < a ? a : peak;
    nan |= a != a;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : peak;
}

// What a block is divided by: its absmax, at least the smallest normal float (NaN stays NaN)
inline float divisor(float peak) {
  const float tiny = std::numeric_limits<float>::min();
  return peak != peak ? peak : (peak < tiny ? tiny : peak);
}

// The code of scaled = x / by (kLast: the largest code); POSITIVE_NOT_ZERO: a positive value never codes to 0
template <int BITS, bool POSITIVE_NOT_ZERO>
inline uint8_t nearest_code(float x, float by, const int32_t* __restrict__ table) {
  constexpr int32_t kLast = (1 << BITS) - 1;
  const float scaled = x / by;
  int32_t bits;
  std::memcpy(&bits, &scaled, sizeof bits);
  const int32_t entry = table[(bits >> 16) + 32768];
  const int32_t key = (bits & 0xFFFF) ^ ((bits >> 31) & 0xFFFF);
  int32_t k = (entry & 0xFF) + (key > ((entry >> 8) & 0xFFFF) ? 1 : 0);
  k = k < kLast ? k : kLast;
  if (POSITIVE_NOT_ZERO && scaled > 0.0f) k = k < 1 ? 1 : k;
  return static_cast<uint8_t>(k);
}

// The code of x in the 4-bit linear map without zero, (k + 1) / 16 (kernels.quantize.linear_map),
// without a table: the number of midpoints (2k + 3) / 32 below x, k < 15, is ceil((32 x - 3) / 2)
// clamped to 0 .. 15, exact in float (32 x and the halving are exact; 32 x - 3 is exact from 1.5 on,
// and below it only its sign matters); NaN: the last code, as the table gives
inline uint8_t nearest_linear4_code(float x) {
  float k = std::ceil((x * 32.0f - 3.0f) * 0.5f);
  k = k < 15.0f ? k : 15.0f;  // NaN too
  k = k > 0.0f ? k : 0.0f;
  return static_cast<uint8_t>(static_cast<int32_t>(k));
}

// nearest(x[i]) stored as the codes of elements first .. first + count (first even for 4 bits; an
// odd count's last byte pairs its code with 0)
template <int BITS, typename Nearest>
inline void code_with(const float* __restrict__ x, int64_t first, int64_t count, Nearest nearest,
                      uint8_t* __restrict__ codes) {
  if constexpr (BITS == 8) {
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) codes[first + i] = nearest(x[i]);
  } else {
    constexpr int64_t kPiece = 256;  // values coded at a time into the stack buffer (even)
    alignas(64) uint8_t index[kPiece];
    for (int64_t piece = 0; piece < count; piece += kPiece) {
      const int64_t n = count - piece < kPiece ? count - piece : kPiece;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) index[i] = nearest(x[piece + i]);
      uint8_t* __restrict__ pairs = codes + (first + piece) / 2;
#pragma omp simd
      for (int64_t k = 0; k < n / 2; ++k) pairs[k] = static_cast<uint8_t>((index[2 * k] << 4) | index[2 * k + 1]);
      if (n % 2) pairs[n / 2] = static_cast<uint8_t>(index[n - 1] << 4);
    }
  }
}

// x[i] / by coded into the codes of elements first .. first + count (as code_with)
template <int BITS, bool POSITIVE_NOT_ZERO>
inline void code(const float* __restrict__ x, int64_t first, int64_t count, float by,
                 const int32_t* __restrict__ table, uint8_t* __restrict__ codes) {
  code_with<BITS>(x, first, count, [=](float v) { return nearest_code<BITS, POSITIVE_NOT_ZERO>(v, by, table); },
                  codes);
}

// A block coded with its own absmax, which is written to *peak_out
template <int BITS, bool POSITIVE_NOT_ZERO>
inline void code_block(const float* __restrict__ x, int64_t first, int64_t count, const int32_t* __restrict__ table,
                       uint8_t* __restrict__ codes, float* __restrict__ peak_out) {
  const float peak = absmax(x, count);
  *peak_out = peak;
  code<BITS, POSITIVE_NOT_ZERO>(x, first, count, divisor(peak), table, codes);
}

// torch.minimum's and torch.maximum's: NaN where either is NaN
inline float nan_minimum(float a, float b) {
  float low = a < b ? a : b;
  low = b != b ? b : low;
  return a != a ? a : low;
}
inline float nan_maximum(float a, float b) { return (b > a || b != b) ? b : a; }  // (a NaN a stays)

// Calls visit(offset, row, column, count) for the row pieces of elements begin .. end of a
// (rows x cols) row-major tensor: element offset + t is (row, column + t) for t < count.
template <typename Visit>
inline void by_rows(int64_t begin, int64_t end, int64_t cols, Visit visit) {
  for (int64_t e = begin; e < end;) {
    const int64_t row = e / cols, column = e % cols;
    const int64_t count = end - e < cols - column ? end - e : cols - column;
    visit(e, row, column, count);
    e += count;
  }
}

// out[i] = the value of rank-1 4-bit element first + i, for count elements: the linear map's value of
// its code k, (k + 1) / 16 (exact in float: no table), times minimum(its row's, its column's maximum)
inline void decode_rank1(const uint8_t* __restrict__ codes, int64_t first, int64_t count, int64_t cols,
                         const float* __restrict__ row_max, const float* __restrict__ col_max,
                         float* __restrict__ out) {
  decode_with<4>(codes, first, count, [](int k) { return static_cast<float>(k + 1) * 0.0625f; }, out);
  by_rows(first, first + count, cols, [&](int64_t offset, int64_t r, int64_t c, int64_t n) {
    const float rmax = row_max[r];
    float* __restrict__ piece = out + (offset - first);
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) piece[t] *= nan_minimum(rmax, col_max[c + t]);
  });
}

// x[i] coded as rank-1 4-bit element first + i (first even) with the maxima given, for count elements
inline void code_rank1(const float* __restrict__ x, int64_t first, int64_t count, int64_t cols,
                       const float* __restrict__ row_max, const float* __restrict__ col_max,
                       uint8_t* __restrict__ codes) {
  constexpr int64_t kPiece = 256;  // values scaled at a time into the stack buffer (even)
  alignas(64) float scaled[kPiece];
  const float tiny = std::numeric_limits<float>::min();
  for (int64_t piece = 0; piece < count; piece += kPiece) {
    const int64_t n = count - piece < kPiece ? count - piece : kPiece, begin = first + piece;
    by_rows(begin, begin + n, cols, [&](int64_t offset, int64_t r, int64_t c, int64_t k) {
      const float rmax = row_max[r];
      const float* __restrict__ in = x + (offset - first);
      float* __restrict__ out = scaled + (offset - begin);
#pragma omp simd
      for (int64_t t = 0; t < k; ++t) {
        const float scale = nan_minimum(rmax, col_max[c + t]);
        out[t] = in[t] / (scale < tiny ? tiny : scale);  // NaN stays
      }
    });
    code_with<4>(scaled, begin, n, [](float v) { return nearest_linear4_code(v); }, codes);
  }
}

// row_max[r] and col_max[c] raised to |x| of each element (r, c) of first .. first + count (NaN stays)
inline void add_rank1_maxima(const float* __restrict__ x, int64_t first, int64_t count, int64_t cols,
                             float* __restrict__ row_max, float* __restrict__ col_max) {
  by_rows(first, first + count, cols, [&](int64_t offset, int64_t r, int64_t c, int64_t n) {
    const float* __restrict__ piece = x + (offset - first);
    float* __restrict__ columns = col_max + c;
    float peak = 0.0f;
    int nan = 0;
#pragma omp simd reduction(max : peak) reduction(| : nan)
    for (int64_t t = 0; t < n; ++t) {
      const float a = std::fabs(piece[t]);
      columns[t] = nan_maximum(columns[t], a);
      peak = peak < a ? a : peak;
      nan |= a != a;
    }
    row_max[r] = nan_maximum(row_max[r], nan ? std::numeric_limits<float>::quiet_NaN() : peak);
  });
}

}  // namespace optim_plugins_codec
