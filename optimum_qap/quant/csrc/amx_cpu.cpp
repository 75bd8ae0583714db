// W4A4 as an integer GEMM on Intel AMX tiles, for group-wise (and per-channel) 4-bit weights and dynamic
// per-token activations: the prefill path of optimum_qap/quant/kernels.py ("amx_int8_gemm").
//
//   out[m, n] = a_scale[m] * sum_g w_scale[n, g] * sum_{k in g} a_code[m, k] * (w_code[n, k] - w_zero[n, g]) + bias[n]
//
// or, for per-group activations, sum over runs r of channels within one weight group and one activation group:
//   out[m, n] = sum_r (a_scale[m, ga(r)] * sum_{k in r} a_code * w_code) * w_scale[n, gw(r)] + bias[n]
//
// Activation codes arrive centred (int8, from int8_codes_rows); weight codes are centred here from the packed
// nibbles the layer stores (no copy of the weight is kept). Each group's dot products accumulate exactly in int32
// on the tiles; the per-group scaling runs in float32 on the vector units. Roles are swapped (C^T = W . A^T) so
// that weight rows load as tiles as they lie in memory and only the activations need the tiles' 4-byte interleave.
//
// Blocking, measured on one Sapphire Rapids core (benchmarks/crossover.py, benchmarks/linear.py): the activations of up to 640 tokens
// over 1024 input channels stay in L2 while 8 blocks of 32 weight rows are centred and multiplied against them.
// Compiled only where the compiler targets AMX (-march=native on such a CPU); elsewhere amx_available() is false.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512BW__) && defined(__AVX512BF16__) && \
    defined(__linux__)
#define QAP_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

#ifdef QAP_AMX

constexpr int64_t K_BLOCK = 1024;          // input channels per pass over the activations
constexpr int64_t TOKEN_CHUNK = 640;       // tokens whose packed activations stay in L2
constexpr int64_t ROW_BLOCKS_PER_TASK = 8;  // blocks of 32 weight rows sharing one pass over the activations
constexpr int64_t STEP = 64;               // input channels per tile product (64 int8 per tile row)

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// all eight tiles 16 rows x 64 bytes: C (int32 16x16), weight rows (16 x 64 int8), activations (16 x 16 x 4 int8)
void configure_tiles() {
  TileConfig config;
  std::memset(&config, 0, sizeof config);
  config.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

// Linux hands a process the AMX register state only on request (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA)
bool tiles_granted() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return granted;
}

// 16x16 transpose of 32-bit words held in 16 registers
inline void transpose_words(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i) {
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// activation codes of 16 tokens x 64 channels as one B tile: row r holds channels 4r..4r+3 of each token
inline void pack_activation_tile(const int8_t* codes, int64_t K, int64_t tokens, int64_t step, uint32_t* tile) {
  __m512i r[16];
  for (int64_t i = 0; i < 16; ++i) {
    r[i] = i < tokens ? _mm512_loadu_si512(codes + i * K + STEP * step) : _mm512_setzero_si512();
  }
  transpose_words(r);
  for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(tile + 16 * i, r[i]);
}

inline void store_row(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
inline void store_row(at::BFloat16* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
inline void store_row(at::Half* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// a finished C^T tile (16 weight rows x 16 tokens, float32) as out[token, n0:n0+16] = tile^T * a_scale + bias
// (a_scale null: the per-group activation scales are applied already)
template <typename out_t>
void write_output_tile(const float* tile, const float* a_scale, const float* bias, out_t* out, int64_t N,
                       int64_t n0, int64_t tokens) {
  __m512i r[16];
  for (int64_t i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(tile + 16 * i);
  transpose_words(r);
  const __m512 b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
  for (int64_t j = 0; j < std::min<int64_t>(tokens, 16); ++j) {
    const __m512 sum = _mm512_castsi512_ps(r[j]);
    const __m512 v = _mm512_add_ps(a_scale ? _mm512_mul_ps(sum, _mm512_set1_ps(a_scale[j])) : sum, b);
    store_row(out + j * N + n0, v);
  }
}

struct Problem {
  const int8_t* a_codes;  // [M, K]
  const float* a_scale;   // [M, a_groups]
  const uint8_t* packed;  // [N, K / 2]
  const float* w_scale;   // [N, groups]
  const uint8_t* zero;    // [N, groups] or null
  const float* bias;      // [N] or null
  int64_t M, N, K, groups, group_size, a_groups, a_group_size;
  // channels summed exactly before one scaling: the smaller group (the larger is a multiple of it)
  int64_t run_size() const { return std::min(group_size, a_group_size); }
};

// one block of `steps` tile steps from channel k0, cut into runs of `run` steps (one whole group, or all steps of
// the block inside a wider group), with the weight and activation group of each run
struct RunGroups {
  int64_t k0, steps, run, count;
  int64_t weight[K_BLOCK / STEP], activation[K_BLOCK / STEP];
  RunGroups(const Problem& p, int64_t first_channel, int64_t block_steps)
      : k0(first_channel), steps(block_steps), run(std::min(p.run_size() / STEP, block_steps)), count(0) {
    for (int64_t start = 0; start < steps; start += run, ++count) {
      weight[count] = (k0 + STEP * start) / p.group_size;
      activation[count] = (k0 + STEP * start) / p.a_group_size;
    }
  }
};

// weight codes minus their zero point (8 for symmetric 4-bit) as int8 A tiles: for each of the 32 rows from
// `row`, the channels of the block, 64 per tile row; tile (h, s) holds rows 16h.. of step s
inline void centre_weight_rows(const Problem& p, const RunGroups& runs, int64_t row, int8_t* tiles) {
  const __m512i low = _mm512_set1_epi16(0x0F), high = _mm512_set1_epi16(0xF0);
  for (int64_t i = 0; i < 32; ++i) {
    const int64_t n = row + i;
    const uint8_t* bytes = p.packed + n * (p.K / 2) + runs.k0 / 2;
    int8_t* target = tiles + (i / 16) * runs.steps * 1024 + (i % 16) * 64;
    for (int64_t r = 0; r < runs.count; ++r) {
      const __m512i center = _mm512_set1_epi8(p.zero ? static_cast<char>(p.zero[n * p.groups + runs.weight[r]]) : 8);
      for (int64_t s = r * runs.run; s < std::min((r + 1) * runs.run, runs.steps); ++s) {
        // byte b = odd << 4 | even: widen to 16 bits, move the odd nibble to the high byte: the codes in order
        const __m512i wide = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 32 * s)));
        const __m512i codes = _mm512_or_si512(_mm512_and_si512(wide, low), _mm512_slli_epi16(_mm512_and_si512(wide, high), 4));
        _mm512_storeu_si512(target + s * 1024, _mm512_sub_epi8(codes, center));
      }
    }
  }
}

// scratch of one worker thread, kept between calls (a fresh buffer per call page-faults it in again)
struct WorkerScratch {
  std::vector<int8_t> weight_tiles;
  std::vector<float> accumulators;
  alignas(64) int32_t partial[8][256];
};

WorkerScratch& worker_scratch() {
  static thread_local WorkerScratch scratch;
  return scratch;
}

// out^T for 32 weight rows x 16 * token_tiles tokens (1 or 2 tiles), over the channels of `runs`: tile
// products per group into C, each group's int32 sums scaled into the float32 accumulators `c` (tile 2h + j: rows
// 16h.., tokens 16j..) while the next group runs. One token tile (a call's last 16 or fewer tokens) skips the
// second half's products; every output sums its groups in the same order either way.
// `token_scales`: per-group activation scales of these tokens, [a_groups][padded tokens] (null for per-token).
template <int token_tiles>
void multiply_block(const Problem& p, const int8_t* a0, const int8_t* a1, const uint32_t* b0, const uint32_t* b1,
                    int64_t row, const RunGroups& runs, const float* token_scales, int64_t padded_tokens,
                    float* const c[4], int32_t (*partial)[256]) {
  const int64_t run = runs.run, steps = runs.steps;
  int64_t index = 0, pending = -1;
  auto scale_pending = [&]() {
    const int32_t (*sums)[256] = partial + 4 * (pending & 1);
    const int64_t group = runs.weight[pending];
    __m512 token_scale[2];
    for (int j = 0; j < token_tiles && token_scales; ++j) {
      token_scale[j] = _mm512_loadu_ps(token_scales + runs.activation[pending] * padded_tokens + 16 * j);
    }
    for (int h = 0; h < 2; ++h) {
      for (int i = 0; i < 16; ++i) {
        const __m512 s = _mm512_set1_ps(p.w_scale[(row + 16 * h + i) * p.groups + group]);
        for (int j = 0; j < token_tiles; ++j) {
          float* acc = c[2 * h + j] + 16 * i;
          __m512 sum = _mm512_cvtepi32_ps(_mm512_loadu_si512(sums[2 * h + j] + 16 * i));
          if (token_scales) sum = _mm512_mul_ps(sum, token_scale[j]);
          _mm512_storeu_ps(acc, _mm512_fmadd_ps(sum, s, _mm512_loadu_ps(acc)));
        }
      }
    }
  };
  for (int64_t start = 0; start < steps; start += run) {
    _tile_zero(0);
    _tile_zero(2);
    if constexpr (token_tiles == 2) {
      _tile_zero(1);
      _tile_zero(3);
    }
    for (int64_t s = start; s < std::min(start + run, steps); ++s) {
      _tile_loadd(4, a0 + s * 1024, 64);
      _tile_loadd(5, a1 + s * 1024, 64);
      _tile_loadd(6, b0 + s * 256, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(2, 5, 6);
      if constexpr (token_tiles == 2) {
        _tile_loadd(7, b1 + s * 256, 64);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(3, 5, 7);
      }
    }
    if (pending >= 0) scale_pending();
    pending = index++;
    int32_t (*slot)[256] = partial + 4 * (pending & 1);
    _tile_stored(0, slot[0], 64);
    _tile_stored(2, slot[2], 64);
    if constexpr (token_tiles == 2) {
      _tile_stored(1, slot[1], 64);
      _tile_stored(3, slot[3], 64);
    }
  }
  scale_pending();
}

// one chunk of tokens [m0, m0 + tokens) against the weight rows [32 * first_block, 32 * last_block)
template <typename out_t>
void multiply_chunk(const Problem& p, const uint32_t* packed_activations, const float* token_scales, int64_t m0,
                    int64_t tokens, int64_t first_block, int64_t last_block, out_t* out) {
  WorkerScratch& scratch = worker_scratch();
  const int64_t padded = (tokens + 31) / 32 * 32, token_tiles = padded / 16, k_steps = p.K / STEP;
  const int64_t blocks = last_block - first_block;
  const size_t tile_bytes = static_cast<size_t>(blocks) * 2 * (K_BLOCK / STEP) * 1024;
  const size_t accumulator_floats = static_cast<size_t>(blocks) * 2 * token_tiles * 256;
  if (scratch.weight_tiles.size() < tile_bytes) scratch.weight_tiles.resize(tile_bytes);
  if (scratch.accumulators.size() < accumulator_floats) scratch.accumulators.resize(accumulator_floats);
  for (int64_t k0 = 0; k0 < p.K; k0 += K_BLOCK) {
    const int64_t steps = std::min(K_BLOCK, p.K - k0) / STEP;
    const RunGroups runs(p, k0, steps);
    for (int64_t b = 0; b < blocks; ++b) {
      centre_weight_rows(p, runs, 32 * (first_block + b), scratch.weight_tiles.data() + b * 2 * steps * 1024);
    }
    for (int64_t pair = 0; pair < padded / 32; ++pair) {
      const uint32_t* b0 = packed_activations + ((2 * pair) * k_steps + k0 / STEP) * 256;
      const uint32_t* b1 = packed_activations + ((2 * pair + 1) * k_steps + k0 / STEP) * 256;
      for (int64_t b = 0; b < blocks; ++b) {
        float* c[4];
        for (int h = 0; h < 2; ++h) {
          for (int j = 0; j < 2; ++j) {
            c[2 * h + j] = scratch.accumulators.data() + ((2 * b + h) * token_tiles + 2 * pair + j) * 256;
            if (k0 == 0) std::memset(c[2 * h + j], 0, 1024);
          }
        }
        const int8_t* a0 = scratch.weight_tiles.data() + b * 2 * steps * 1024;
        const int64_t row = 32 * (first_block + b);
        const float* scales = token_scales ? token_scales + 32 * pair : nullptr;
        if (tokens - 32 * pair > 16) {
          multiply_block<2>(p, a0, a0 + steps * 1024, b0, b1, row, runs, scales, padded, c, scratch.partial);
        } else {
          multiply_block<1>(p, a0, a0 + steps * 1024, b0, b1, row, runs, scales, padded, c, scratch.partial);
        }
        if (k0 + steps * STEP < p.K) continue;
        for (int h = 0; h < 2; ++h) {
          for (int j = 0; j < 2; ++j) {
            const int64_t first_token = 32 * pair + 16 * j;
            if (first_token >= tokens) continue;
            const float* a_scale = token_scales ? nullptr : p.a_scale + m0 + first_token;
            write_output_tile(c[2 * h + j], a_scale, p.bias, out + (m0 + first_token) * p.N, p.N, row + 16 * h,
                              tokens - first_token);
          }
        }
      }
    }
  }
}

template <typename out_t>
void amx_multiply(const Problem& p, out_t* out) {
  const int64_t chunks = (p.M + TOKEN_CHUNK - 1) / TOKEN_CHUNK;
  const int64_t chunk = ((p.M + chunks - 1) / chunks + 31) / 32 * 32;
  const int64_t k_steps = p.K / STEP, row_blocks = p.N / 32;
  // the calling thread's packed activations, read by every worker
  static thread_local std::vector<uint32_t> packed_activations;
  const size_t words = static_cast<size_t>(chunk / 16) * k_steps * 256;
  if (packed_activations.size() < words) packed_activations.resize(words);
  uint32_t* packed = packed_activations.data();
  // per-group activation scales as [a_groups][tokens of the chunk, padded]: 16 tokens' scales in one load
  static thread_local std::vector<float> token_scales;
  if (p.a_groups > 1 && token_scales.size() < static_cast<size_t>(p.a_groups * chunk)) {
    token_scales.resize(p.a_groups * chunk);
  }
  for (int64_t m0 = 0; m0 < p.M; m0 += chunk) {
    const int64_t tokens = std::min(chunk, p.M - m0), token_tiles = (tokens + 31) / 32 * 2;
    const int64_t padded = token_tiles * 16;
    if (p.a_groups > 1) {
      for (int64_t g = 0; g < p.a_groups; ++g) {
        for (int64_t t = 0; t < padded; ++t) {
          token_scales[g * padded + t] = t < tokens ? p.a_scale[(m0 + t) * p.a_groups + g] : 0.0f;
        }
      }
    }
    const float* chunk_scales = p.a_groups > 1 ? token_scales.data() : nullptr;
    at::parallel_for(0, token_tiles * k_steps, 64, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t tile = t / k_steps, step = t % k_steps;
        const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(16, tokens - 16 * tile));
        pack_activation_tile(p.a_codes + (m0 + std::min(16 * tile, tokens)) * p.K, p.K, rows, step, packed + t * 256);
      }
    });
    // fewer row blocks per task where there are more threads than tasks (outputs do not depend on the split)
    const int64_t per_task = std::clamp<int64_t>(row_blocks / at::get_num_threads(), 1, ROW_BLOCKS_PER_TASK);
    const int64_t tasks = (row_blocks + per_task - 1) / per_task;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      configure_tiles();
      for (int64_t task = begin; task < end; ++task) {
        const int64_t first = task * per_task;
        multiply_chunk(p, packed, chunk_scales, m0, tokens, first, std::min(row_blocks, first + per_task), out);
      }
      _tile_release();
    });
  }
}

#endif  // QAP_AMX

bool amx_available() {
#ifdef QAP_AMX
  return tiles_granted();
#else
  return false;
#endif
}

// whether amx_int8_gemm serves this layout (callers fall back to another path otherwise): weight groups and
// activation groups (in_features for per-channel weights and per-token activations) of whole tile rows that tile
// the channels, the larger a multiple of the smaller, whose runs tile the 1024-channel blocks or span whole ones
bool amx_serves(int64_t in_features, int64_t out_features, int64_t group_size, int64_t a_group_size) {
#ifdef QAP_AMX
  const int64_t run = std::min(group_size, a_group_size), wide = std::max(group_size, a_group_size);
  const bool tiles = in_features % group_size == 0 && in_features % a_group_size == 0 && wide % run == 0;
  const bool blocks = run == in_features || K_BLOCK % run == 0 || run % K_BLOCK == 0;
  return in_features % STEP == 0 && out_features % 32 == 0 && run % STEP == 0 && tiles && blocks;
#else
  return false;
#endif
}

at::Tensor amx_int8_gemm(const at::Tensor& a_codes, const at::Tensor& a_scale, const at::Tensor& packed,
                         const at::Tensor& w_scale, const c10::optional<at::Tensor>& zero, int64_t group_size,
                         int64_t a_group_size, const c10::optional<at::Tensor>& bias, at::ScalarType dtype) {
  TORCH_CHECK(amx_available(), "amx_int8_gemm needs AMX tiles (see optimum_qap.quant.fused.amx_available)");
  TORCH_CHECK(a_codes.scalar_type() == at::kChar && a_codes.dim() == 2, "activation codes must be int8 [tokens, in]");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, "weights must be packed uint8 [out, in / 2]");
  const int64_t M = a_codes.size(0), K = a_codes.size(1), N = packed.size(0), groups = w_scale.size(1);
  TORCH_CHECK(packed.size(1) * 2 == K, "packed weights hold ", packed.size(1) * 2, " codes per row, expected ", K);
  TORCH_CHECK(amx_serves(K, N, group_size, a_group_size), "amx_int8_gemm does not serve in=", K, " out=", N,
              " group=", group_size, " activation group=", a_group_size);
  TORCH_CHECK(groups * group_size == K && w_scale.size(0) == N, "weight scales [", w_scale.size(0), ", ", groups,
              "] do not match ", N, " rows of ", K / group_size, " groups");
  TORCH_CHECK(!zero.has_value() || (zero->scalar_type() == at::kByte && zero->sizes() == w_scale.sizes()),
              "zero points must be uint8 shaped like the scales");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "unsupported output dtype");
  at::Tensor out = at::empty({M, N}, a_codes.options().dtype(dtype));
  if (M == 0) return out;
#ifdef QAP_AMX
  const at::Tensor codes = a_codes.contiguous(), weights = packed.contiguous();
  const at::Tensor row_scale = a_scale.to(at::kFloat).contiguous(), scales = w_scale.to(at::kFloat).contiguous();
  const at::Tensor zeros = zero.has_value() ? zero->contiguous() : at::Tensor();
  const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t a_groups = K / a_group_size;
  TORCH_CHECK(row_scale.numel() == M * a_groups, "expected ", a_groups, " activation scales per token, got ",
              row_scale.numel(), " for ", M, " tokens");
  TORCH_CHECK(!bias.has_value() || bias_f.numel() == N, "expected one bias per output");
  const Problem problem{codes.const_data_ptr<int8_t>(), row_scale.const_data_ptr<float>(),
                        weights.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                        zero.has_value() ? zeros.const_data_ptr<uint8_t>() : nullptr,
                        bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr, M, N, K, groups, group_size,
                        a_groups, a_group_size};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "amx_int8_gemm", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) amx_multiply(problem, out.mutable_data_ptr<scalar_t>());
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(optimum_qap, m) {
  m.def("amx_available() -> bool", &amx_available);
  m.def("amx_serves(int in_features, int out_features, int group_size, int a_group_size) -> bool", &amx_serves);
  m.def("amx_int8_gemm(Tensor a_codes, Tensor a_scale, Tensor packed, Tensor w_scale, Tensor? zero, int group_size, "
        "int a_group_size, Tensor? bias, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(optimum_qap, CPU, m) { m.impl("amx_int8_gemm", &amx_int8_gemm); }
