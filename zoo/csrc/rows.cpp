// The few rows of x a decode step, a speculative check or a batch multiplies, times weight-only quantized matrices,
// with AVX2 (see zoo/kernels.py): each group's scale applied once per group, the result rounded once to x's dtype.
// bfloat16 rows of x are multiplied as 16-bit integers (each group's |x| scaled by a power of two into [2^14, 2^15):
// exact for every x within 2^7 of its group's largest, which bf16's 8-bit significands make most of them), the codes'
// products summed exactly in int32 by _mm256_madd_epi16 (16 products an instruction, where float32 FMAs take 8 and
// the codes' conversion to float32 first); float32 rows in float32.
// - int4_rows: W in the layout torch's AVX2 build of _weight_int4pack_mm_for_cpu packs. That kernel dequantizes each
//   weight to float32 (code, scale and zero) before multiplying: ~6 GB/s over SmolLM2's layers with bf16 activations
//   on 2 Zen 3 cores; with float32 activations it takes a reference loop, 10x slower. python bench/int4_rows.py: one
//   row of bf16 x 1.5-3.1x torch's kernel on SmolLM2's layers, 4 and 32 rows 1.4-1.9x.
// - int8_rows: W as signed 8-bit codes, row-major, a scale (and a zero point) per group: 8-bit layers (Q8_0, Q5_0,
//   ...) and a tied head reading its embedding's codes, one byte per weight where the int4 kernel's two planes read
//   1.25 and ran over x twice (the head: 3.1x torch's kernel over the planes for one row).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using zoo_vec::hmax;
using zoo_vec::hsum;
using zoo_vec::load8;

// Eight rows' (scale, zero) pairs from [.., N, 2] as two float32 vectors
inline void load_scales(const at::BFloat16* p, __m256& s, __m256& z) {
    // each 32-bit word holds a row's bf16 scale (low half) and zero (high half); bf16 is float32's high half
    __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    s = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    z = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000))));
}

inline void load_scales(const float* p, __m256& s, __m256& z) {
    __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);  // s0 z0 s1 z1 s2 z2 s3 z3 | s4 z4 ... s7 z7
    // even and odd elements of each 128-bit lane: s0 s1 s4 s5 | s2 s3 s6 s7, then the 64-bit pairs in order
    __m256 even = _mm256_shuffle_ps(a, b, 0x88), odd = _mm256_shuffle_ps(a, b, 0xdd);
    s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), 0xd8));
    z = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(odd), 0xd8));
}

// y [R, N] (row stride N) = x [R, K] (row stride K) @ W^T for W's 32-row blocks b0..b1, R rows of x at once: the codes
// are decoded once for all R rows. V = 4 takes all 32 rows of a block at a time (four vectors of 8), V = 2 the 16 rows
// of one nibble (rows 0-15 in the low ones, 16-31 in the high), so that more rows of x keep their sums in registers.
// Each output is computed the same way whatever R and V (the same operations in the same order): a row of x gets
// the same products alone as in a batch. w = (code - 8) * scale + zero, so per group g
// y += scale * sum_k code_k x_k + (zero - 8 scale) * sum_k x_k.
template <int R, int V, typename S>
void blocks(const uint8_t* packed, const S* sz, const float* x, const float* xsum, float* y, int64_t N, int64_t K,
            int64_t group, int64_t b0, int64_t b1) {
    const int64_t G = K / group;
    const __m128i low = _mm_set1_epi8(15);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t* codes = packed + b * K * 16;  // per input k, 16 bytes: byte j = rows j (low nibble), j + 16
        for (int part = 0; part < 4 / V; part++) {  // (V = 2: the low nibbles, then the high)
            __m256 out[R][V];
            for (int r = 0; r < R; r++)
                for (int i = 0; i < V; i++) out[r][i] = _mm256_setzero_ps();
            for (int64_t g = 0; g < G; g++) {
                __m256 acc[R][V];
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < V; i++) acc[r][i] = _mm256_setzero_ps();
                for (int64_t k = g * group; k < (g + 1) * group; k++) {
                    __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + k * 16));
                    __m256 c[V];  // the codes of 8 rows each, as float32
                    if (V == 4 || part == 0) {
                        __m128i lo = _mm_and_si128(v, low);
                        c[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                        c[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                    }
                    if (V == 4 || part == 1) {
                        __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
                        c[V - 2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                        c[V - 1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                    }
                    for (int r = 0; r < R; r++) {
                        __m256 xk = _mm256_broadcast_ss(x + r * K + k);
                        for (int i = 0; i < V; i++) acc[r][i] = _mm256_fmadd_ps(c[i], xk, acc[r][i]);
                    }
                }
                for (int i = 0; i < V; i++) {
                    __m256 s, z;
                    load_scales(sz + (g * N + b * 32 + 8 * (part * V + i)) * 2, s, z);
                    __m256 z8 = _mm256_fnmadd_ps(eight, s, z);  // zero - 8 scale
                    for (int r = 0; r < R; r++)
                        out[r][i] = _mm256_fmadd_ps(z8, _mm256_set1_ps(xsum[r * G + g]),
                                                    _mm256_fmadd_ps(s, acc[r][i], out[r][i]));
                }
            }
            for (int r = 0; r < R; r++)
                for (int i = 0; i < V; i++) _mm256_storeu_ps(y + r * N + b * 32 + 8 * (part * V + i), out[r][i]);
        }
    }
}

// x [M, K] in float32, and each group's sum of x (for the zero points) [M, K / group]
template <typename T>
void widen(const T* xin, int64_t M, int64_t K, int64_t group, std::vector<float>& x, std::vector<float>& xsum) {
    const int64_t G = K / group;
    x.resize(M * K);
    xsum.resize(M * G);
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            float s = 0;
            for (int64_t k = m * K + g * group; k < m * K + (g + 1) * group; k++)
                s += x[k] = static_cast<float>(xin[k]);
            xsum[m * G + g] = s;
        }
}

// Rows [n0, n1) of y's M rows (row stride N) from their float32 sums, rounded to nearest even as Tensor.to rounds
template <typename T>
void round_into(const float* sums, T* y, int64_t M, int64_t N, int64_t n0, int64_t n1) {
    if (static_cast<const void*>(sums) == static_cast<const void*>(y)) return;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) y[m * N + n] = static_cast<T>(sums[m * N + n]);
}

// Where the sums go before round_into: y itself for float32, else a buffer
template <typename T>
float* sums_for(T* y, int64_t size, std::vector<float>& buffer) {
    if constexpr (std::is_same_v<T, float>) {
        return y;
    } else {
        buffer.resize(size);
        return buffer.data();
    }
}

template <typename S, typename T>
void rows(const uint8_t* packed, const S* sz, const T* xin, T* yout, int64_t M, int64_t N, int64_t K, int64_t group) {
    const int64_t G = K / group;
    std::vector<float> x, xsum, buffer;
    widen(xin, M, K, group, x, xsum);
    float* y = sums_for(yout, M * N, buffer);
    at::parallel_for(0, N / 32, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) {  // each block of codes read from memory once, for all rows of x
            int64_t m = 0;
            for (; m + 4 <= M; m += 4)
                blocks<4, 2>(packed, sz, x.data() + m * K, xsum.data() + m * G, y + m * N, N, K, group, b, b + 1);
            for (; m + 2 <= M; m += 2)
                blocks<2, 4>(packed, sz, x.data() + m * K, xsum.data() + m * G, y + m * N, N, K, group, b, b + 1);
            if (m < M)
                blocks<1, 4>(packed, sz, x.data() + m * K, xsum.data() + m * G, y + m * N, N, K, group, b, b + 1);
        }
        round_into(y, yout, M, N, b0 * 32, b1 * 32);
    });
}

// bfloat16 rows of x as 16-bit integers: q = x / p per group, p the power of two that puts the group's largest |x| in
// [2^14, 2^15), so every x within 2^7 of it (8 significant bits) is exact and smaller ones are rounded to a step of
// p <= |x|max / 2^14. Each group's sum of x (for the zero points) is summed in float32 from x itself.
struct Rows16 {
    std::vector<int16_t> q;  // [M, K]
    std::vector<float> p;    // [M, G]; 0 for a group of zeros, NaN for one holding an inf or a NaN
    std::vector<float> sum;  // [M, G]
};

template <typename T>
void quantize16(const T* x, int64_t M, int64_t K, int64_t group, Rows16& out) {
    const int64_t G = K / group;
    out.q.resize(M * K);
    out.p.resize(M * G);
    out.sum.resize(M * G);
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < M * G; i++) {  // group i's inputs are x[i * group ...] (groups tile rows)
        const T* xg = x + i * group;
        int16_t* q = out.q.data() + i * group;
        float largest = 0, sum = 0;
        const bool vectors = group % 8 == 0;
        if (vectors) {  // (lane by lane, then across: a fixed order)
            __m256 sums = _mm256_setzero_ps(), top = _mm256_setzero_ps();
            for (int64_t k = 0; k < group; k += 8) {
                const __m256 v = load8(xg + k);
                sums = _mm256_add_ps(sums, v);
                top = _mm256_max_ps(top, _mm256_and_ps(v, magnitude));
            }
            sum = hsum(sums), largest = hmax(top);
        } else {
            for (int64_t k = 0; k < group; k++) {
                const float v = static_cast<float>(xg[k]);
                sum += v;
                largest = std::max(largest, std::fabs(v));
            }
        }
        int e = 0;
        std::frexp(largest, &e);  // largest = f 2^e, f in [0.5, 1)
        float p = std::ldexp(1.0f, e - 15);  // (bf16's smallest subnormal, 2^-133, still leaves p >= 2^-148)
        if (!std::isfinite(sum))  // (an inf or a NaN in the group: a vector max may drop a NaN, their sum does not)
            p = NAN;
        else if (largest == 0)
            p = 0;
        out.p[i] = p;
        out.sum[i] = sum;
        if (vectors && p > 0 && 15 - e <= 127) {  // x / p = x 2^(15 - e), exactly, then rounded to nearest even
            const __m256 inverse = _mm256_set1_ps(std::ldexp(1.0f, 15 - e));
            for (int64_t k = 0; k < group; k += 8) {
                const __m256i n = _mm256_cvtps_epi32(_mm256_mul_ps(load8(xg + k), inverse));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                                 _mm_packs_epi32(_mm256_castsi256_si128(n), _mm256_extracti128_si256(n, 1)));
            }
        } else {
            for (int64_t k = 0; k < group; k++)
                q[k] = p > 0 ? static_cast<int16_t>(std::nearbyint(static_cast<float>(xg[k]) / p)) : 0;  // (to even)
        }
    }
}

inline __m256i broadcast_pair(const int16_t* q) {  // q[0], q[1] in every 32-bit lane
    int32_t pair;
    std::memcpy(&pair, q, 4);
    return _mm256_set1_epi32(pair);
}

// As blocks(), for x as Rows16 (bf16 scales): for each two inputs k, k + 1 (32 bytes of the layout, adjacent), the
// codes of 32 rows become 16-bit pairs (code_k, code_k+1) in each 32-bit lane, four vectors of 8 rows (0-3 | 8-11,
// 4-7 | 12-15, and the same + 16 from the high nibbles), and _mm256_madd_epi16 against (q_k, q_k+1) sums each row's
// two products in int32. A group's int32 sums are exact (|sum| <= 32 * 15 * 32767 < 2^24 for groups of 32, so its
// conversion to float32 is too) and each group adds scale * p * sum + (zero - 8 scale) * sum of x to y in float32.
// V as in blocks(); the float32 sums live in y between groups (registers hold the int32 ones).
template <int R, int V>
void blocks16(const uint8_t* packed, const at::BFloat16* sz, const int16_t* q, const float* p, const float* xsum,
              float* y, int64_t N, int64_t K, int64_t group, int64_t b) {
    const int64_t G = K / group;
    // per 128-bit lane of [v_k lo 8 bytes, v_k+1 lo 8 | v_k hi 8, v_k+1 hi 8]: bytes i and 8 + i as a 16-bit pair
    const __m256i pick0 = _mm256_setr_epi8(0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1,
                                           0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1);
    const __m256i pick1 = _mm256_setr_epi8(4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1,
                                           4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1);
    const __m256i low = _mm256_set1_epi16(15);
    const __m256 eight = _mm256_set1_ps(8.0f);
    const uint8_t* codes = packed + b * K * 16;
    for (int part = 0; part < 4 / V; part++) {
        for (int64_t g = 0; g < G; g++) {
            __m256i acc[R][V];
            for (int r = 0; r < R; r++)
                for (int i = 0; i < V; i++) acc[r][i] = _mm256_setzero_si256();
            for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
                __m256i v = _mm256_permute4x64_epi64(
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k * 16)), 0xd8);
                __m256i w0 = _mm256_shuffle_epi8(v, pick0), w1 = _mm256_shuffle_epi8(v, pick1), c[V];
                if (V == 4 || part == 0) c[0] = _mm256_and_si256(w0, low), c[1] = _mm256_and_si256(w1, low);
                if (V == 4 || part == 1) c[V - 2] = _mm256_srli_epi16(w0, 4), c[V - 1] = _mm256_srli_epi16(w1, 4);
                for (int r = 0; r < R; r++) {
                    const __m256i qk = broadcast_pair(q + r * K + k);
                    for (int i = 0; i < V; i++) acc[r][i] = _mm256_add_epi32(acc[r][i], _mm256_madd_epi16(c[i], qk));
                }
            }
            for (int j = 0; j < V / 2; j++) {  // rows 16 h + 0-7 and 16 h + 8-15 of the block
                const int64_t row = b * 32 + 16 * (part * V / 2 + j);
                __m256 s[2], z8[2];
                for (int i = 0; i < 2; i++) {
                    __m256 zero;
                    load_scales(sz + (g * N + row + 8 * i) * 2, s[i], zero);
                    z8[i] = _mm256_fnmadd_ps(eight, s[i], zero);  // zero - 8 scale
                }
                for (int r = 0; r < R; r++) {
                    const __m256i sums[2] = {_mm256_permute2x128_si256(acc[r][2 * j], acc[r][2 * j + 1], 0x20),
                                             _mm256_permute2x128_si256(acc[r][2 * j], acc[r][2 * j + 1], 0x31)};
                    const __m256 pg = _mm256_set1_ps(p[r * G + g]), xs = _mm256_set1_ps(xsum[r * G + g]);
                    for (int i = 0; i < 2; i++) {
                        float* out = y + r * N + row + 8 * i;
                        const __m256 before = g == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out);
                        _mm256_storeu_ps(out, _mm256_fmadd_ps(z8[i], xs, _mm256_fmadd_ps(
                            _mm256_mul_ps(s[i], pg), _mm256_cvtepi32_ps(sums[i]), before)));
                    }
                }
            }
        }
    }
}

// The largest group the int32 sums hold. Each lane adds, per group, group / 2 madd results of two products (int4_rows:
// |sum| <= 2048 * 2 * 15 * 32767 ~ 2.01e9 at 4,096) or group / 16 of two (int8_rows: 256 * 2 * 128 * 32767 ~ 2.15e9,
// and |q| <= 32640 for bf16 x, ~2.14e9): below 2^31 ~ 2.147e9
constexpr int64_t GROUP16 = 4096;

void rows16(const uint8_t* packed, const at::BFloat16* sz, const at::BFloat16* xin, at::BFloat16* yout, int64_t M,
            int64_t N, int64_t K, int64_t group) {
    const int64_t G = K / group;
    Rows16 x;
    quantize16(xin, M, K, group, x);
    std::vector<float> y(M * N);
    at::parallel_for(0, N / 32, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) {  // each block of codes read from memory once, for all rows of x
            int64_t m = 0;
            for (; m + 4 <= M; m += 4)
                blocks16<4, 2>(packed, sz, x.q.data() + m * K, x.p.data() + m * G, x.sum.data() + m * G,
                               y.data() + m * N, N, K, group, b);
            for (; m + 2 <= M; m += 2)
                blocks16<2, 4>(packed, sz, x.q.data() + m * K, x.p.data() + m * G, x.sum.data() + m * G,
                               y.data() + m * N, N, K, group, b);
            if (m < M)
                blocks16<1, 4>(packed, sz, x.q.data() + m * K, x.p.data() + m * G, x.sum.data() + m * G,
                               y.data() + m * N, N, K, group, b);
        }
        round_into(y.data(), yout, M, N, b0 * 32, b1 * 32);
    });
}

at::Tensor int4_rows(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                     const at::Tensor& scales_and_zeros) {
    TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && scales_and_zeros.dim() == 3, "zoo_kernels::int4_rows: x [M, K], "
                "packed [N, K / 2], scales_and_zeros [K / group_size, N, 2]");
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
    TORCH_CHECK(K > 0 && packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) * 2 == K &&
                N % 32 == 0 && group_size > 0 && K % group_size == 0 && scales_and_zeros.size(0) == K / group_size &&
                scales_and_zeros.size(1) == N && scales_and_zeros.size(2) == 2,
                "zoo_kernels::int4_rows: shapes do not match");
    TORCH_CHECK(x.scalar_type() == scales_and_zeros.scalar_type() &&
                (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
                "zoo_kernels::int4_rows: x and scales_and_zeros both bfloat16 or both float32");
    auto sz = scales_and_zeros.contiguous(), xc = x.contiguous();
    // in x's dtype, rounded inside the operator as torch's kernel rounds: compiled code, which fuses what follows,
    // cannot skip the rounding, and gets the eager products
    auto y = at::empty({M, N}, x.options());
    const uint8_t* p = packed.data_ptr<uint8_t>();
    if (sz.scalar_type() == at::kBFloat16 && group_size % 2 == 0 && group_size <= GROUP16)
        rows16(p, sz.data_ptr<at::BFloat16>(), xc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), M, N, K,
               group_size);
    else if (sz.scalar_type() == at::kBFloat16)
        rows(p, sz.data_ptr<at::BFloat16>(), xc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), M, N, K,
             group_size);
    else
        rows(p, sz.data_ptr<float>(), xc.data_ptr<float>(), y.data_ptr<float>(), M, N, K, group_size);
    return y;
}

// y [R, N] (row stride N) = x [R, K] @ W^T for W's rows n0..n1: codes int8 [N, K], scales and zeros [N, K / group]
// (zeros may be null), w = code * scale + zero. As in blocks(), each output's operations are the same whatever R.
template <int R, typename S>
void int8_block(const int8_t* codes, const S* scales, const S* zeros, const float* x, const float* xsum, float* y,
                int64_t N, int64_t K, int64_t group, int64_t n0, int64_t n1) {
    const int64_t G = K / group;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t* c = codes + n * K;
        __m256 out[R];
        float zsum[R];
        for (int r = 0; r < R; r++) out[r] = _mm256_setzero_ps(), zsum[r] = 0;
        for (int64_t g = 0; g < G; g++) {
            __m256 acc[R][4];  // four sums a row, each of every fourth 8 codes: four chains of dependent FMAs, not one
            for (int r = 0; r < R; r++)
                for (int j = 0; j < 4; j++) acc[r][j] = _mm256_setzero_ps();
            int64_t k = g * group;
            for (; k + 32 <= (g + 1) * group; k += 32)
                for (int j = 0; j < 4; j++) {  // 8 codes, sign-extended, as float32
                    __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                        _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + k + 8 * j))));
                    for (int r = 0; r < R; r++)
                        acc[r][j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * K + k + 8 * j), acc[r][j]);
                }
            for (; k < (g + 1) * group; k += 8) {  // (groups of 8 or 16)
                __m256 w = _mm256_cvtepi32_ps(
                    _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + k))));
                for (int r = 0; r < R; r++) acc[r][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * K + k), acc[r][0]);
            }
            for (int r = 0; r < R; r++)
                acc[r][0] = _mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3]));
            const __m256 s = _mm256_set1_ps(static_cast<float>(scales[n * G + g]));
            for (int r = 0; r < R; r++) out[r] = _mm256_fmadd_ps(s, acc[r][0], out[r]);
            if (zeros)
                for (int r = 0; r < R; r++) zsum[r] += static_cast<float>(zeros[n * G + g]) * xsum[r * G + g];
        }
        for (int r = 0; r < R; r++) y[r * N + n] = hsum(out[r]) + zsum[r];
    }
}

// As int8_block, for x as Rows16 (bf16 scales and zeros): 16 codes sign-extended to 16 bits, _mm256_madd_epi16 against
// q, a group's sum in int32 (exact), converted to float32 once (|sum| may pass 2^24: one rounding) and scaled.
template <int R, typename S>
void int8_block16(const int8_t* codes, const S* scales, const S* zeros, const int16_t* q,
                  const float* p, const float* xsum, float* y, int64_t N, int64_t K, int64_t group, int64_t n0,
                  int64_t n1) {
    const int64_t G = K / group;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t* c = codes + n * K;
        __m256 out[R];
        float zsum[R];
        for (int r = 0; r < R; r++) out[r] = _mm256_setzero_ps(), zsum[r] = 0;
        for (int64_t g = 0; g < G; g++) {
            __m256i acc[R];
            for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_si256();
            int64_t k = g * group;
            for (; k + 16 <= (g + 1) * group; k += 16) {
                const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + k)));
                for (int r = 0; r < R; r++)
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(
                        w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * K + k))));
            }
            if (k < (g + 1) * group) {  // (a group of 8 more: the high half's codes are zeros)
                const __m256i w = _mm256_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + k)));
                for (int r = 0; r < R; r++)
                    acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(
                        w, _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * K + k)))));
            }
            const float s = static_cast<float>(scales[n * G + g]);
            for (int r = 0; r < R; r++)
                out[r] = _mm256_fmadd_ps(_mm256_set1_ps(s * p[r * G + g]), _mm256_cvtepi32_ps(acc[r]), out[r]);
            if (zeros)
                for (int r = 0; r < R; r++) zsum[r] += static_cast<float>(zeros[n * G + g]) * xsum[r * G + g];
        }
        for (int r = 0; r < R; r++) y[r * N + n] = hsum(out[r]) + zsum[r];
    }
}

template <typename S>
void int8_rows_of(const int8_t* codes, const S* scales, const S* zeros, const S* xin, S* yout, int64_t M, int64_t N,
                  int64_t K, int64_t group) {
    const int64_t G = K / group;
    // bf16 rows of x as Rows16, float32 ones as floats
    const bool int16 = std::is_same_v<S, at::BFloat16> && group <= GROUP16;
    std::vector<float> x, xsum, buffer;
    Rows16 x16;
    if (int16)
        quantize16(xin, M, K, group, x16);
    else
        widen(xin, M, K, group, x, xsum);
    float* y = sums_for(yout, M * N, buffer);
    at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
        for (int64_t c0 = n0; c0 < n1; c0 += 64) {  // 64 rows of codes (36 KB for K = 576) at a time, for all rows of x
            const int64_t c1 = std::min(c0 + 64, n1);
            int64_t m = 0;
            if (int16) {  // (4 rows at a time: registers enough for their int32 and float32 sums)
                for (; m + 4 <= M; m += 4)
                    int8_block16<4>(codes, scales, zeros, x16.q.data() + m * K, x16.p.data() + m * G,
                                    x16.sum.data() + m * G, y + m * N, N, K, group, c0, c1);
                for (; m + 2 <= M; m += 2)
                    int8_block16<2>(codes, scales, zeros, x16.q.data() + m * K, x16.p.data() + m * G,
                                    x16.sum.data() + m * G, y + m * N, N, K, group, c0, c1);
                for (; m < M; m++)
                    int8_block16<1>(codes, scales, zeros, x16.q.data() + m * K, x16.p.data() + m * G,
                                    x16.sum.data() + m * G, y + m * N, N, K, group, c0, c1);
            } else {
                for (; m + 2 <= M; m += 2)
                    int8_block<2>(codes, scales, zeros, x.data() + m * K, xsum.data() + m * G, y + m * N, N, K, group,
                                  c0, c1);
                for (; m < M; m++)
                    int8_block<1>(codes, scales, zeros, x.data() + m * K, xsum.data() + m * G, y + m * N, N, K, group,
                                  c0, c1);
            }
        }
        round_into(y, yout, M, N, n0, n1);
    });
}

at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& zeros) {
    TORCH_CHECK(x.dim() == 2 && codes.dim() == 2 && scales.dim() == 2, "zoo_kernels::int8_rows: x [M, K], codes "
                "[N, K], scales [N, K / group]");
    const int64_t M = x.size(0), K = x.size(1), N = codes.size(0), G = scales.size(1);
    TORCH_CHECK(K > 0 && codes.scalar_type() == at::kChar && codes.is_contiguous() && codes.size(1) == K && G > 0 &&
                K % G == 0 && (K / G) % 8 == 0 && scales.size(0) == N &&
                (!zeros || zeros->sizes() == scales.sizes()), "zoo_kernels::int8_rows: shapes do not match");
    TORCH_CHECK(x.scalar_type() == scales.scalar_type() && (!zeros || zeros->scalar_type() == x.scalar_type()) &&
                (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
                "zoo_kernels::int8_rows: x, scales and zeros all bfloat16 or all float32");
    auto xc = x.contiguous(), s = scales.contiguous();
    auto z = zeros ? zeros->contiguous() : at::Tensor();
    auto y = at::empty({M, N}, x.options());  // (rounded as int4_rows rounds)
    const int8_t* c = codes.data_ptr<int8_t>();
    if (x.scalar_type() == at::kBFloat16)
        int8_rows_of(c, s.data_ptr<at::BFloat16>(), zeros ? z.data_ptr<at::BFloat16>() : nullptr,
                     xc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), M, N, K, K / G);
    else
        int8_rows_of(c, s.data_ptr<float>(), zeros ? z.data_ptr<float>() : nullptr, xc.data_ptr<float>(),
                     y.data_ptr<float>(), M, N, K, K / G);
    return y;
}

}  // namespace

TORCH_LIBRARY(zoo_kernels, m) {
    m.def("int4_rows(Tensor x, Tensor packed, int group_size, Tensor scales_and_zeros) -> Tensor");
    m.def("int8_rows(Tensor x, Tensor codes, Tensor scales, Tensor? zeros) -> Tensor");
}

// No backward (the weights are frozen; Int4Linear sends inputs that need a gradient to a GEMM instead): a backward
// through them raises, as through torch's kernel, rather than passing no gradient
TORCH_LIBRARY_IMPL(zoo_kernels, Autograd, m) {
    m.impl("int4_rows", torch::autograd::autogradNotImplementedFallback());
    m.impl("int8_rows", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(zoo_kernels, CPU, m) {
    m.impl("int4_rows", &int4_rows);
    m.impl("int8_rows", &int8_rows);
}
