// Fused CPU versions of the element-wise W4A4 steps in optimum_qap/quant/functional.py and kernels.py.
//
// Each function computes, value for value, what the eager PyTorch code computes (the tests compare them bit for
// bit): float32 math in the same order, IEEE division (never a multiplication by a reciprocal), round half to
// even, NaN propagated as torch.amin / amax / clamp propagate it. Built with -ffp-contract=off so that no
// multiply-add is fused. One pass over each row instead of the ~20 dispatched operations of the eager code.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// the per-value helpers must be inlined into the row loops for those to vectorize
#define QAP_INLINE inline __attribute__((always_inline))

namespace {

// 16-bit floats read and written through their bits, which the compiler vectorizes (the c10 conversions it
// does not): bf16 -> float is exact; float -> bf16 rounds to nearest even as PyTorch does, NaN to a quiet NaN.
QAP_INLINE float to_float(float v) { return v; }
QAP_INLINE float to_float(c10::Half v) { return static_cast<float>(v); }
QAP_INLINE float to_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename scalar_t>
QAP_INLINE scalar_t from_float(float v) {
  return static_cast<scalar_t>(v);
}
template <>
QAP_INLINE c10::BFloat16 from_float<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
  return c10::BFloat16(v == v ? rounded : static_cast<uint16_t>(0x7FC0), c10::BFloat16::from_bits());
}

// torch.round (round half to even) without a libm call per element: adding and subtracting 2**23 leaves the
// nearest integer of a float of magnitude below 2**23 (the default rounding mode rounds ties to even); larger
// floats are integers already. NaN fails the comparison and passes through; the sign is kept for -0.
// Without -ffast-math the compiler keeps the sum and the difference as two rounded float operations.
QAP_INLINE float round_half_even(float v) {
  const float magnitude = std::fabs(v);
  const float rounded = std::copysign((magnitude + 8388608.0f) - 8388608.0f, v);
  return magnitude < 8388608.0f ? rounded : v;
}

QAP_INLINE float clamp_keep_nan(float v, float low, float high) {
  v = v < low ? low : v;
  return v > high ? high : v;
}

struct RowRange {
  float scale;
  float zero;  // integer zero point (asymmetric) or 0
};

// scale and zero point of one row, as functional.asymmetric_params / symmetric_scale compute them
template <typename scalar_t>
RowRange row_range(const scalar_t* row, int64_t length, int64_t bits, bool symmetric) {
  // eight lanes as a GCC / Clang vector: the compiler does not reorder a float min / max reduction by itself
  constexpr int64_t lanes = 8;
  typedef float float_lanes __attribute__((vector_size(lanes * sizeof(float))));
  typedef int32_t int_lanes __attribute__((vector_size(lanes * sizeof(int32_t))));
  float_lanes lane_low, lane_high;
  int_lanes lane_nan = {};
  for (int64_t l = 0; l < lanes; ++l) {
    lane_low[l] = std::numeric_limits<float>::infinity();
    lane_high[l] = -lane_low[l];
  }
  const int64_t whole = length - length % lanes;
  for (int64_t i = 0; i < whole; i += lanes) {
    float_lanes v;
    for (int64_t l = 0; l < lanes; ++l) v[l] = to_float(row[i + l]);
    lane_nan |= v != v;
    lane_low = v < lane_low ? v : lane_low;
    lane_high = v > lane_high ? v : lane_high;
  }
  float low = lane_low[0], high = lane_high[0];
  bool nan = lane_nan[0] != 0;
  for (int64_t l = 1; l < lanes; ++l) {
    low = lane_low[l] < low ? lane_low[l] : low;
    high = lane_high[l] > high ? lane_high[l] : high;
    nan |= lane_nan[l] != 0;
  }
  for (int64_t i = whole; i < length; ++i) {
    const float v = to_float(row[i]);
    nan |= v != v;
    low = v < low ? v : low;
    high = v > high ? v : high;
  }
  if (nan) low = high = std::numeric_limits<float>::quiet_NaN();
  RowRange range;
  if (symmetric) {
    const float absmax = std::fabs(low) > std::fabs(high) || nan ? std::fabs(low) : std::fabs(high);
    range.scale = absmax / static_cast<float>((1 << (bits - 1)) - 1);
    range.zero = 0.0f;
  } else {
    low = low > 0.0f ? 0.0f : low;
    high = high < 0.0f ? 0.0f : high;
    range.scale = (high - low) / static_cast<float>((1 << bits) - 1);
  }
  if (range.scale == 0.0f) range.scale = 1.0f;
  if (!symmetric) range.zero = round_half_even(-(low / range.scale));
  return range;
}

// centred code q - z (float32, an exact integer) of the values of one row; the symmetry is a template argument
// so that the loops over a row have no branch the compiler cannot vectorize
template <bool symmetric>
struct RowCodes {
  float scale, zero, lowest, highest;

  RowCodes(const RowRange& range, int64_t bits)
      : scale(range.scale),
        zero(range.zero),
        lowest(symmetric ? -static_cast<float>(1 << (bits - 1)) : 0.0f),
        highest(static_cast<float>(symmetric ? (1 << (bits - 1)) - 1 : (1 << bits) - 1)) {}

  QAP_INLINE float operator()(float v) const {
    const float rounded = round_half_even(v / scale);
    if (symmetric) return clamp_keep_nan(rounded, lowest, highest);
    return clamp_keep_nan(rounded + zero, lowest, highest) - zero;
  }
};

template <bool symmetric, typename scalar_t>
void fake_quant_row(const scalar_t* row, int64_t length, const RowCodes<symmetric>& codes, scalar_t* target) {
  for (int64_t i = 0; i < length; ++i) target[i] = from_float<scalar_t>(codes(to_float(row[i])) * codes.scale);
}

// a NaN code has no int8 value (torch's float -> int8 cast leaves it unspecified too); its row scale is NaN,
// which makes the row's outputs NaN either way
template <bool symmetric, typename scalar_t>
void int8_code_row(const scalar_t* row, int64_t length, const RowCodes<symmetric>& codes, int8_t* target) {
  for (int64_t i = 0; i < length; ++i) {
    const float code = codes(to_float(row[i]));
    target[i] = static_cast<int8_t>(code == code ? code : 0.0f);
  }
}

void check_rows(const at::Tensor& x, int64_t bits) {
  TORCH_CHECK(x.device().is_cpu(), "optimum_qap fused ops run on CPU tensors");
  TORCH_CHECK(x.dim() == 2, "expected rows [n, length], got ", x.dim(), " dims");
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must lie in [2, 8], got ", bits);
}

// grain: rows per task, about 64k values
int64_t row_grain(int64_t length) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, length)); }

inline bool is_little_endian() {
  const uint16_t one = 1;
  uint8_t first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

QAP_INLINE uint32_t element_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}
QAP_INLINE uint16_t element_bits(c10::BFloat16 v) { return v.x; }
QAP_INLINE uint16_t element_bits(c10::Half v) { return v.x; }

// one weight group's (code - center) * scale, written to row[start:stop]
template <typename scalar_t>
struct DequantizedGroup {
  float scale;
  float center;
  scalar_t* row;

  QAP_INLINE scalar_t value(int code) const { return from_float<scalar_t>((static_cast<float>(code) - center) * scale); }

  void bytes(const uint8_t* codes, int64_t start, int64_t stop) const {
    for (int64_t i = start; i < stop; ++i) row[i] = value(codes[i]);
  }

  // code i sits in byte i / 2, the even one in the low nibble
  void nibbles(const uint8_t* codes, int64_t start, int64_t stop) const {
    int64_t i = start;
    if (i % 2 && i < stop) row[i] = value(codes[i / 2] >> 4), ++i;
    const int64_t first_pair = i / 2, pairs = (stop - i) / 2;
    write_pairs(codes + first_pair, pairs, row + 2 * first_pair);
    i += 2 * pairs;
    if (i < stop) row[i] = value(codes[i / 2] & 0x0F);
  }

  // the two values of each byte as one word of twice the element width (low nibble first, little-endian):
  // a loop without interleaved stores, which the compiler vectorizes
  void write_pairs(const uint8_t* pair, int64_t pairs, scalar_t* out) const {
    using word_t = std::conditional_t<sizeof(scalar_t) == 2, uint32_t, uint64_t>;
    if constexpr (sizeof(scalar_t) <= 4) {
      if (is_little_endian()) {
        typedef word_t __attribute__((may_alias)) aliased_word;
        aliased_word* words = reinterpret_cast<aliased_word*>(out);
        for (int64_t j = 0; j < pairs; ++j) {
          words[j] = static_cast<word_t>(element_bits(value(pair[j] & 0x0F))) |
                     static_cast<word_t>(element_bits(value(pair[j] >> 4))) << (8 * sizeof(scalar_t));
        }
        return;
      }
    }
    for (int64_t j = 0; j < pairs; ++j) {
      out[2 * j] = value(pair[j] & 0x0F);
      out[2 * j + 1] = value(pair[j] >> 4);
    }
  }
};

}  // namespace

// functional.fake_quant_per_token on rows: dynamic quantization with one range per row, back to x's dtype
at::Tensor fake_quant_rows(const at::Tensor& input, int64_t bits, bool symmetric) {
  check_rows(input, bits);
  const at::Tensor x = input.contiguous();
  at::Tensor out = at::empty_like(x);
  const int64_t rows = x.size(0), length = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fake_quant_rows", [&] {
    const scalar_t* source = x.const_data_ptr<scalar_t>();
    scalar_t* target = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(length), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = source + r * length;
        const RowRange range = row_range(row, length, bits, symmetric);
        if (symmetric) {
          fake_quant_row(row, length, RowCodes<true>(range, bits), target + r * length);
        } else {
          fake_quant_row(row, length, RowCodes<false>(range, bits), target + r * length);
        }
      }
    });
  });
  return out;
}

// functional.per_token_codes on rows, for the integer GEMM: int8 centred codes [n, length], float32 scales [n, 1]
std::tuple<at::Tensor, at::Tensor> int8_codes_rows(const at::Tensor& input, int64_t bits, bool symmetric) {
  check_rows(input, bits);
  TORCH_CHECK(bits <= (symmetric ? 8 : 7), "centred codes of ", bits, "-bit ", symmetric ? "" : "a",
              "symmetric rows do not fit int8");
  const at::Tensor x = input.contiguous();
  const int64_t rows = x.size(0), length = x.size(1);
  at::Tensor codes = at::empty({rows, length}, x.options().dtype(at::kChar));
  at::Tensor scales = at::empty({rows, 1}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_codes_rows", [&] {
    const scalar_t* source = x.const_data_ptr<scalar_t>();
    int8_t* target = codes.mutable_data_ptr<int8_t>();
    float* scale = scales.mutable_data_ptr<float>();
    at::parallel_for(0, rows, row_grain(length), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = source + r * length;
        const RowRange range = row_range(row, length, bits, symmetric);
        scale[r] = range.scale;
        if (symmetric) {
          int8_code_row(row, length, RowCodes<true>(range, bits), target + r * length);
        } else {
          int8_code_row(row, length, RowCodes<false>(range, bits), target + r * length);
        }
      }
    });
  });
  return {codes, scales};
}

// kernels.int8_gemm's epilogue: (float(accumulated) * row_scale) * column_scale, rounded once to dtype
at::Tensor scale_accumulated(const at::Tensor& accumulated, const at::Tensor& row_scale,
                             const at::Tensor& column_scale, at::ScalarType dtype) {
  TORCH_CHECK(accumulated.device().is_cpu() && accumulated.scalar_type() == at::kInt && accumulated.dim() == 2,
              "expected int32 CPU rows [n, out]");
  const int64_t rows = accumulated.size(0), columns = accumulated.size(1);
  TORCH_CHECK(row_scale.numel() == rows && column_scale.numel() == columns, "scale sizes do not match [",
              rows, ", ", columns, "]");
  const at::Tensor acc = accumulated.contiguous();
  const at::Tensor row_s = row_scale.to(at::kFloat).contiguous();
  const at::Tensor column_s = column_scale.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({rows, columns}, acc.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "scale_accumulated", [&] {
    const int32_t* source = acc.const_data_ptr<int32_t>();
    const float* rs = row_s.const_data_ptr<float>();
    const float* cs = column_s.const_data_ptr<float>();
    scalar_t* target = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(columns), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t c = 0; c < columns; ++c) {
          const float scaled = static_cast<float>(source[r * columns + c]) * rs[r];
          target[r * columns + c] = from_float<scalar_t>(scaled * cs[c]);
        }
      }
    });
  });
  return out;
}

// functional.dequantize_weight of 4- or 8-bit packed codes [out, packed] with per-group scale [out, groups] and
// optional uint8 zero point: (code - zero) * scale in the scale's dtype (computed in float32, rounded once, as
// PyTorch computes a 16-bit float product on CPU; the difference of small integers is exact)
at::Tensor dequantize_packed(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                             int64_t bits, int64_t group_size, int64_t length) {
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 2,
              "expected uint8 CPU codes [out, packed]");
  TORCH_CHECK(bits == 4 || bits == 8, "dequantize_packed serves 4- and 8-bit codes, got ", bits);
  const int64_t rows = packed.size(0), groups = scale.size(1);
  TORCH_CHECK(group_size * groups >= length && group_size * (groups - 1) < length, "group_size ", group_size,
              " and ", groups, " groups do not cover ", length, " codes");
  const at::Tensor codes = packed.contiguous();
  const at::Tensor s = scale.contiguous();
  const bool has_zero = zero.has_value();
  const at::Tensor z = has_zero ? zero->contiguous() : at::Tensor();
  TORCH_CHECK(!has_zero || z.scalar_type() == at::kByte, "zero points must be uint8");
  const float symmetric_center = static_cast<float>(1 << (bits - 1));
  at::Tensor out = at::empty({rows, length}, s.options());
  const int64_t row_bytes = codes.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, s.scalar_type(), "dequantize_packed", [&] {
    const uint8_t* source = codes.const_data_ptr<uint8_t>();
    const scalar_t* scales = s.const_data_ptr<scalar_t>();
    const uint8_t* zeros = has_zero ? z.const_data_ptr<uint8_t>() : nullptr;
    scalar_t* target = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(length), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
          const float center = has_zero ? static_cast<float>(zeros[r * groups + g]) : symmetric_center;
          const int64_t start = g * group_size, stop = std::min(length, start + group_size);
          const DequantizedGroup<scalar_t> group{to_float(scales[r * groups + g]), center,
                                                 target + r * length};
          if (bits == 8) {
            group.bytes(source + r * row_bytes, start, stop);
          } else {
            group.nibbles(source + r * row_bytes, start, stop);
          }
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY(optimum_qap, m) {
  m.def("fake_quant_rows(Tensor x, int bits, bool symmetric) -> Tensor");
  m.def("int8_codes_rows(Tensor x, int bits, bool symmetric) -> (Tensor, Tensor)");
  m.def("scale_accumulated(Tensor accumulated, Tensor row_scale, Tensor column_scale, ScalarType dtype) -> Tensor");
  m.def("dequantize_packed(Tensor packed, Tensor scale, Tensor? zero, int bits, int group_size, int length) -> Tensor");
}

TORCH_LIBRARY_IMPL(optimum_qap, CPU, m) {
  m.impl("fake_quant_rows", &fake_quant_rows);
  m.impl("int8_codes_rows", &int8_codes_rows);
  m.impl("scale_accumulated", &scale_accumulated);
  m.impl("dequantize_packed", &dequantize_packed);
}
