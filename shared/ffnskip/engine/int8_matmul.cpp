// ffnskip::int8_matmul(x, w): x [M, K] int8 times w [N, K] int8 -> [M, N] int32, summed exactly,
// what torch._int_mm(x, w.t()) returns, for the few rows of a decode step on a CPU.
//
// Why: at one row the library's integer GEMM read SmolLM2-135M's int8 matrices at 9-12 GB/s on
// 2 cores (it packs the weight for its kernel on every call), where a plain read of them ran at
// 24; this kernel reads each weight row once, in place and in memory order, with the CPU's
// dot-product instructions, at 20-40 GB/s. Over 9-16 rows (a full decode batch) the AVX-512
// build sums tiles of 16 weight rows instead (see `tiles`). The integer sums are exact, so it
// returns the same numbers. Over more rows (a prefill chunk) the library's GEMM is faster:
// int8_kernel.py says where each one runs.
//
// Two builds of this one source, chosen by the instructions the compiler is allowed
// (int8_kernel.py picks the build the CPU runs): AVX-512 with VNNI, whose instruction multiplies
// and sums four byte pairs into each 32-bit lane; and AVX2, which widens the bytes to 16 bits and
// sums pairs of their products (its byte instruction saturates at 16 bits, which would not be
// exact for int8 times int8).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

#if !(defined(__AVX512VNNI__) && defined(__AVX512BW__)) && !defined(__AVX2__)
#error "int8_matmul.cpp needs AVX-512 VNNI or AVX2: build it with -mavx512vnni -mavx512bw or -mavx2"
#endif

namespace {

// Each weight row is read whole before the next, so a thread streams its share of the matrix in
// memory order. On 2 AMD EPYC cores, against tiles of 16 (8) rows read side by side, one chunk of
// each in turn, the 3072 x 576 gate/up product took 43-54 us against 58-64 at one row and 52-77
// against 73-86 at 4 rows of x (a row's later x rows read it from L1).

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

// the first min(bytes, 64) bytes of a 64-byte chunk (a masked load reads zeros past them)
inline __mmask64 first_bytes(int64_t bytes) { return bytes >= 64 ? ~0ULL : (~0ULL) >> (64 - bytes); }

// sum_k x[k], which dot() takes 128 times off each output (times bytes of 1, 64 at a time)
inline int32_t row_sum(const int8_t* x, int64_t k) {
  __m512i acc = _mm512_setzero_si512();
  for (int64_t c = 0; c < k; c += 64) {
    const __mmask64 mask = first_bytes(k - c);
    acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(1), _mm512_maskz_loadu_epi8(mask, x + c));
  }
  return _mm512_reduce_add_epi32(acc);
}

// sum_k w[k] x[k] over the whole of K. The instruction multiplies unsigned bytes by signed ones,
// so the weights are read as w + 128 (their top bit flipped) and 128 sum(x) is taken off. Whole
// 64-byte chunks load unmasked: with a masked load in the loop the kernel read 18-19 GB/s at one
// row on an AMD EPYC, unmasked 28-33.
inline int32_t dot(const int8_t* x, const int8_t* w, int64_t k, int32_t x_sum) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i acc = _mm512_setzero_si512();
  const int64_t whole = k - k % 64;
  for (int64_t c = 0; c < whole; c += 64)
    acc = _mm512_dpbusd_epi32(acc, _mm512_xor_si512(_mm512_loadu_si512(w + c), flip), _mm512_loadu_si512(x + c));
  if (whole < k) {
    // past the end of K both sides load zeros, and a zero x byte adds nothing
    const __mmask64 mask = first_bytes(k - whole);
    const __m512i wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w + whole), flip);
    acc = _mm512_dpbusd_epi32(acc, wv, _mm512_maskz_loadu_epi8(mask, x + whole));
  }
  return _mm512_reduce_add_epi32(acc) - 128 * x_sum;
}

#else  // AVX2

inline int32_t row_sum(const int8_t* /*x*/, int64_t /*k*/) { return 0; }  // dot() takes no correction

inline int32_t reduce_add(__m256i v) {
  __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, _MM_SHUFFLE(1, 0, 3, 2)));
  sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(sum);
}

inline __m256i widen(const int8_t* bytes) {  // 16 int8 -> 16 int16
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
}

// sum_k w[k] x[k] over the whole of K, 32 bytes a step: each product of two int16 is at most
// 2^14, and a pair of them sums into a 32-bit lane exactly. The last K % 32 columns are summed
// one by one. (x_sum is the AVX-512 build's correction: zero for this build, row_sum.)
inline int32_t dot(const int8_t* x, const int8_t* w, int64_t k, int32_t /*x_sum*/) {
  __m256i acc = _mm256_setzero_si256();
  const int64_t whole = k - k % 32;
  for (int64_t c = 0; c < whole; c += 32) {
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(widen(w + c), widen(x + c)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(widen(w + c + 16), widen(x + c + 16)));
  }
  int32_t sum = reduce_add(acc);
  for (int64_t c = whole; c < k; ++c) sum += static_cast<int32_t>(w[c]) * x[c];
  return sum;
}

#endif

// The weights are asked for ahead of their use with the non-temporal hint: a decode step streams
// 136 MB of them through a 32 MB L3, and brought in the ordinary way they evicted everything the
// step reads again (the cache's keys and values, the activations, the interpreter's and torch's
// own code and data for the eager work between the packages). Measured in process on 2 AMD EPYC
// cores, decode steps alternated with and without it: one row 3.3-6.2% faster in three runs of
// four (-1.9% in the other), the ordinary hint 0.5-3.1%; 16 rows 5.0-5.1% with either hint; the
// AVX2 build at one row 4.3%, at 8 rows level.
inline void prefetch_non_temporal(const int8_t* start, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(start);
  for (int64_t c = 0; c < bytes; c += 64) _mm_prefetch(p + c, _MM_HINT_NTA);
}

// weight rows asked for ahead of the one being summed (a few KB at SmolLM2's K of 576 and 1536)
constexpr int64_t kRowsAhead = 4;

// output columns [n_start, n_end) for every row of x: each weight row is read from memory once,
// for the first row of x, and from the core's cache for the others
void columns(const int8_t* x, const int8_t* w, int32_t* out, int64_t m, int64_t k, int64_t n,
             int64_t n_start, int64_t n_end, const int32_t* x_sums) {
  for (int64_t j = n_start; j < n_end; ++j) {
    if (j + kRowsAhead < n_end) prefetch_non_temporal(w + (j + kRowsAhead) * k, k);
    for (int64_t i = 0; i < m; ++i) out[i * n + j] = dot(x + i * k, w + j * k, k, x_sums[i]);
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

// A tile: 16 weight rows, one per 32-bit lane of a register. Over several rows of x the per-output
// reduction above (a dozen instructions for each 9 products at K = 576) costs more than the
// products; a tile keeps one accumulator per weight row, sums the 16 of them into one register
// with 45 shuffles and adds for each row of x, and reads its 16 weight rows (9 KB at K = 576) from
// L1 for every row of x after the first pass.
constexpr int64_t kTile = 16;
// Up to this many rows of x, the reduction per output costs less than the tile's (at one row a
// tile reads its weights at 32-36 GB/s, one row at a time at 42-46: measured on 2 AMD EPYC cores)
constexpr int64_t kFewRows = 8;

// lane j = the sum of acc[j]'s 16 lanes: pairs, then quadruples within each 128-bit lane, then
// across the four 128-bit lanes
inline __m512i lane_sums(const __m512i (&acc)[kTile]) {
  __m512i pairs[8], quads[4];
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p)
    pairs[p] = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[2 * p], acc[2 * p + 1]),
                                _mm512_unpackhi_epi32(acc[2 * p], acc[2 * p + 1]));
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q)
    quads[q] = _mm512_add_epi32(_mm512_unpacklo_epi64(pairs[2 * q], pairs[2 * q + 1]),
                                _mm512_unpackhi_epi64(pairs[2 * q], pairs[2 * q + 1]));
  const __m512i low = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[0], quads[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_i32x4(quads[0], quads[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i high = _mm512_add_epi32(_mm512_shuffle_i32x4(quads[2], quads[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                        _mm512_shuffle_i32x4(quads[2], quads[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(low, high, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(low, high, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The instruction multiplies unsigned bytes by signed ones. Here x is the unsigned side, read as
// x + 128 (`flipped`, zero past K), and the weights the signed side, so each output is the
// flipped row's sums less 128 times its weight row's sum: the tile's first pass sums the weight
// rows (times bytes of 1), each row whole in memory order, which streams the tile from memory.
inline __m512i tile_weight_sums(const int8_t* w, int64_t k) {
  const int64_t whole = k - k % 64;
  const __mmask64 mask = whole < k ? first_bytes(k - whole) : 0;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc[kTile];
#pragma GCC unroll 16
  for (int64_t j = 0; j < kTile; ++j) {
    acc[j] = _mm512_setzero_si512();
    for (int64_t c = 0; c < whole; c += 64) acc[j] = _mm512_dpbusd_epi32(acc[j], ones, _mm512_loadu_si512(w + j * k + c));
    if (mask) acc[j] = _mm512_dpbusd_epi32(acc[j], ones, _mm512_maskz_loadu_epi8(mask, w + j * k + whole));
  }
  return lane_sums(acc);
}

// one row of x as the unsigned bytes x + 128, 64 at a time, zero from k to the next whole 64
inline void flip(const int8_t* x, uint8_t* flipped, int64_t k) {
  const __m512i top = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t c = 0; c < k; c += 64) {
    const __mmask64 mask = first_bytes(k - c);
    const __m512i bytes = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, x + c), top);
    _mm512_storeu_si512(flipped + c, _mm512_maskz_mov_epi8(mask, bytes));
  }
}

// the tile's 16 sums of (x + 128) w for one flipped row of x
inline __m512i tile_row(const uint8_t* flipped, const int8_t* w, int64_t k) {
  const int64_t whole = k - k % 64;
  __m512i acc[kTile];
#pragma GCC unroll 16
  for (int64_t j = 0; j < kTile; ++j) acc[j] = _mm512_setzero_si512();
  for (int64_t c = 0; c < whole; c += 64) {
    const __m512i xv = _mm512_loadu_si512(flipped + c);
#pragma GCC unroll 16
    for (int64_t j = 0; j < kTile; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], xv, _mm512_loadu_si512(w + j * k + c));
  }
  if (whole < k) {
    const __mmask64 mask = first_bytes(k - whole);
    const __m512i xv = _mm512_loadu_si512(flipped + whole);
#pragma GCC unroll 16
    for (int64_t j = 0; j < kTile; ++j)
      acc[j] = _mm512_dpbusd_epi32(acc[j], xv, _mm512_maskz_loadu_epi8(mask, w + j * k + whole));
  }
  return lane_sums(acc);
}

// output columns [16 t, 16 t + 16) of every row of x, for tiles t in [t_start, t_end)
void tiles(const uint8_t* flipped, int64_t stride, const int8_t* w, int32_t* out, int64_t m, int64_t k,
           int64_t n, int64_t t_start, int64_t t_end) {
  for (int64_t t = t_start; t < t_end; ++t) {
    const int8_t* tile = w + t * kTile * k;
    if (t + 1 < t_end) prefetch_non_temporal(tile + kTile * k, kTile * k);  // the next tile
    const __m512i correction = _mm512_slli_epi32(tile_weight_sums(tile, k), 7);
    for (int64_t i = 0; i < m; ++i)
      _mm512_storeu_si512(out + i * n + t * kTile, _mm512_sub_epi32(tile_row(flipped + i * stride, tile, k), correction));
  }
}

#endif

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "int8_matmul: x [M, K] and w [N, K], got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.scalar_type() == at::kChar && w.scalar_type() == at::kChar, "int8_matmul: int8 x and w");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), n = wc.size(0);
  at::Tensor out = at::empty({m, n}, xc.options().dtype(at::kInt));
  const int8_t* xp = xc.const_data_ptr<int8_t>();
  const int8_t* wp = wc.const_data_ptr<int8_t>();
  int32_t* op = out.mutable_data_ptr<int32_t>();
  int64_t tiled = 0;  // the weight rows summed in tiles; the rest one by one
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (m > kFewRows) {
    const int64_t stride = (k + 63) / 64 * 64;
    std::vector<uint8_t> flipped(m * stride);
    for (int64_t i = 0; i < m; ++i) flip(xp + i * k, flipped.data() + i * stride, k);
    at::parallel_for(0, n / kTile, 1, [&](int64_t begin, int64_t end) {
      tiles(flipped.data(), stride, wp, op, m, k, n, begin, end);
    });
    tiled = n / kTile * kTile;
  }
#endif
  if (tiled < n) {
    std::vector<int32_t> x_sums(m);
    for (int64_t i = 0; i < m; ++i) x_sums[i] = row_sum(xp + i * k, k);
    at::parallel_for(tiled, n, 1, [&](int64_t begin, int64_t end) {
      columns(xp, wp, op, m, k, n, begin, end, x_sums.data());
    });
  }
  return out;
}

// shapes only: what tracing (torch.export) runs; symbolic sizes, since a substitute's rank is a
// dynamic size of its package
at::Tensor int8_matmul_meta(const at::Tensor& x, const at::Tensor& w) {
  return at::empty_symint({x.sym_size(0), w.sym_size(0)}, x.options().dtype(at::kInt));
}

}  // namespace

TORCH_LIBRARY(ffnskip, m) { m.def("int8_matmul(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(ffnskip, CPU, m) { m.impl("int8_matmul", int8_matmul); }
TORCH_LIBRARY_IMPL(ffnskip, Meta, m) { m.impl("int8_matmul", int8_matmul_meta); }
