// The few rows of x a decode step, a speculative check or a batch multiplies, times weight-only quantized matrices,
// with AVX2 (see zoo/kernels.py): each group's scale applied once per group, the result rounded once to x's dtype.
// bfloat16 rows of x are multiplied as 16-bit integers (each group's |x| scaled by a power of two into [2^14, 2^15):
// exact for every x within 2^7 of its group's largest, which bf16's 8-bit significands make most of them), the codes'
// products summed exactly in int32 by _mm256_madd_epi16 (16 products an instruction, where float32 FMAs take 8 and
// the codes' conversion to float32 first); float32 rows in float32.
// - int4_rows: W in the layout torch's AVX2 build of _weight_int4pack_mm_for_cpu packs (blocks of 32 rows), or its
//   AVX-512 build (64). That kernel dequantizes each weight to float32 (code, scale and zero) before multiplying:
//   ~6 GB/s over SmolLM2's layers with bf16 activations on 2 Zen 3 cores; with float32 activations it takes a
//   reference loop, 10x slower. python bench/int4_rows.py: one row of bf16 x 1.5-3.1x torch's kernel on SmolLM2's
//   layers, 4 and 32 rows 1.4-1.9x (Zen 3); on Zen 4 (VNNI) one row 1.06-1.45x torch's AVX-512 build, 4 and 32
//   rows 0.74-1.20x (the 192-row k and v layers least: three blocks of 64 over two threads).
// - int8_rows: W as signed 8-bit codes, row-major, a scale (and a zero point) per group: 8-bit layers (Q8_0, Q5_0,
//   ...) and a tied head reading its embedding's codes, one byte per weight where the int4 kernel's two planes read
//   1.25 and ran over x twice (the head: 3.1x torch's kernel over the planes for one row). With AVX512-VNNI, byte
//   products (int8_block_vnni).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace {

using zoo_vec::hmax;
using zoo_vec::hsum;
using zoo_vec::load8;

// Functions for CPUs with AVX512-VNNI (and the AVX-512 parts they use), which vnni() says this is
#define VNNI __attribute__((target("avx512vnni,avx512vl,avx512bw,avx512f")))

// Whether this CPU has AVX512-VNNI, and ZOO_KERNELS_VNNI is not 0 (which takes the AVX2 paths: tests compare both)
bool vnni() {
    static const bool cpu = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512f");
    const char* off = std::getenv("ZOO_KERNELS_VNNI");
    return cpu && !(off && std::strcmp(off, "0") == 0);
}

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

// torch packs int4 codes in blocks of L rows, L = 32 in its AVX2 build and 64 in its AVX-512 one: per block and input
// k, L / 2 bytes, byte j holding row j in its low nibble and row j + L / 2 in its high.
// y [R, N] (row stride N) = x [R, K] (row stride K) @ W^T for W's L-row blocks b0..b1, R rows of x at once: the codes
// are decoded once for all R rows. Each pass over K takes V vectors of 8 rows (rows 8t..8t + 7 for t = part V ..
// part V + V - 1): V = 4 for 32 rows at a time, V = 2 for 16, so that more rows of x keep their sums in registers.
// Each output is computed the same way whatever R and V (the same operations in the same order): a row of x gets
// the same products alone as in a batch. w = (code - 8) * scale + zero, so per group g
// y += scale * sum_k code_k x_k + (zero - 8 scale) * sum_k x_k.
template <int L, int R, int V, typename S>
void blocks(const uint8_t* packed, const S* sz, const float* x, const float* xsum, float* y, int64_t N, int64_t K,
            int64_t group, int64_t b0, int64_t b1) {
    const int64_t G = K / group;
    const __m128i low = _mm_set1_epi8(15);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t* codes = packed + b * K * (L / 2);
        for (int part = 0; part < L / 8 / V; part++) {
            __m256 out[R][V];
            for (int r = 0; r < R; r++)
                for (int i = 0; i < V; i++) out[r][i] = _mm256_setzero_ps();
            for (int64_t g = 0; g < G; g++) {
                __m256 acc[R][V];
                for (int r = 0; r < R; r++)
                    for (int i = 0; i < V; i++) acc[r][i] = _mm256_setzero_ps();
                for (int64_t k = g * group; k < (g + 1) * group; k++) {
                    __m256 c[V];  // the codes of 8 rows each, as float32
                    for (int i = 0; i < V; i++) {  // rows 8t..8t + 7: bytes 8t.. of the low nibbles, or of the high
                        const int t = part * V + i, nibble = t / (L / 16);
                        __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(
                            codes + k * (L / 2) + 8 * (t % (L / 16))));
                        v = _mm_and_si128(nibble ? _mm_srli_epi16(v, 4) : v, low);
                        c[i] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                    }
                    for (int r = 0; r < R; r++) {
                        __m256 xk = _mm256_broadcast_ss(x + r * K + k);
                        for (int i = 0; i < V; i++) acc[r][i] = _mm256_fmadd_ps(c[i], xk, acc[r][i]);
                    }
                }
                for (int i = 0; i < V; i++) {
                    __m256 s, z;
                    load_scales(sz + (g * N + b * L + 8 * (part * V + i)) * 2, s, z);
                    __m256 z8 = _mm256_fnmadd_ps(eight, s, z);  // zero - 8 scale
                    for (int r = 0; r < R; r++)
                        out[r][i] = _mm256_fmadd_ps(z8, _mm256_set1_ps(xsum[r * G + g]),
                                                    _mm256_fmadd_ps(s, acc[r][i], out[r][i]));
                }
            }
            for (int r = 0; r < R; r++)
                for (int i = 0; i < V; i++) _mm256_storeu_ps(y + r * N + b * L + 8 * (part * V + i), out[r][i]);
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

template <int L, typename S, typename T>
void rows(const uint8_t* packed, const S* sz, const T* xin, T* yout, int64_t M, int64_t N, int64_t K, int64_t group) {
    const int64_t G = K / group;
    std::vector<float> x, xsum, buffer;
    widen(xin, M, K, group, x, xsum);
    float* y = sums_for(yout, M * N, buffer);
    at::parallel_for(0, N / L, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) {  // each block of codes read from memory once, for all rows of x
            int64_t m = 0;
            for (; m + 4 <= M; m += 4)
                blocks<L, 4, 2>(packed, sz, x.data() + m * K, xsum.data() + m * G, y + m * N, N, K, group, b, b + 1);
            for (; m + 2 <= M; m += 2)
                blocks<L, 2, 4>(packed, sz, x.data() + m * K, xsum.data() + m * G, y + m * N, N, K, group, b, b + 1);
            if (m < M)
                blocks<L, 1, 4>(packed, sz, x.data() + m * K, xsum.data() + m * G, y + m * N, N, K, group, b, b + 1);
        }
        round_into(y, yout, M, N, b0 * L, b1 * L);
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

// As blocks(), for x as Rows16 (bf16 scales): for each two inputs k, k + 1, the codes of 8 rows become 16-bit pairs
// (code_k, code_k+1) in each 32-bit lane, and _mm256_madd_epi16 against (q_k, q_k+1) sums each row's two products in
// int32. A group's int32 sums are exact (|sum| <= 32 * 15 * 32767 < 2^24 for groups of 32, so its conversion to
// float32 is too) and each group adds scale * p * sum + (zero - 8 scale) * sum of x to y in float32.
// The code vectors t of a block, over two inputs, hold the rows (4 | 4 more in the high 128-bit lane):
//   L = 32 (the two inputs' 16 bytes adjacent: one load, a permute, two byte shuffles): t = 0: 0-3 | 8-11,
//     1: 4-7 | 12-15 (low nibbles), 2, 3: the same + 16 (high nibbles); t, t + 1 give rows 16 j..+7 and 16 j + 8..+7
//     (j = t / 2) once their lanes are exchanged;
//   L = 64 (32 bytes each: two loads, interleaved byte by byte, then widened): t = 0: 0-3 | 16-19, 1: 4-7 | 20-23,
//     2: 8-11 | 24-27, 3: 12-15 | 28-31 (low nibbles), 4-7: the same + 32; t, t + 1 give rows 32 (j / 2) + 8 (j % 2)
//     ..+7 and 16 more.
// Each pass over K takes V of them (part V .. part V + V - 1); the float32 sums live in y between groups (registers
// hold the int32 ones).
template <int L>
inline int64_t run_of(int j) {  // the first row of the first run of 8 that code vectors 2j, 2j + 1 give
    return L == 32 ? 16 * j : 32 * (j / 2) + 8 * (j % 2);
}

// Group g's int32 sums of code vectors 2j, 2j + 1 (acc[r][2j], acc[r][2j + 1] for R rows of x: rows first..first + 7
// and first + apart.. once their 128-bit lanes are exchanged) added to y's float32 sums: scale * p * sum + (zero -
// 8 scale) * sum of x. blocks16 and blocks16_vnni64 end their groups here: the same steps, the same bits.
template <int R, int V>
__attribute__((always_inline)) inline void add_runs(const __m256i (&acc)[R][V], int j, int64_t first, int64_t apart,
                                                    const at::BFloat16* sz, const float* p, const float* xsum,
                                                    float* y, int64_t N, int64_t G, int64_t g) {
    const int64_t runs[2] = {first, first + apart};
    __m256 s[2], z8[2];
    for (int i = 0; i < 2; i++) {
        __m256 zero_point;
        load_scales(sz + (g * N + runs[i]) * 2, s[i], zero_point);
        z8[i] = _mm256_fnmadd_ps(_mm256_set1_ps(8.0f), s[i], zero_point);  // zero - 8 scale
    }
    for (int r = 0; r < R; r++) {
        const __m256i sums[2] = {_mm256_permute2x128_si256(acc[r][2 * j], acc[r][2 * j + 1], 0x20),
                                 _mm256_permute2x128_si256(acc[r][2 * j], acc[r][2 * j + 1], 0x31)};
        const __m256 pg = _mm256_set1_ps(p[r * G + g]), xs = _mm256_set1_ps(xsum[r * G + g]);
        for (int i = 0; i < 2; i++) {
            float* out = y + r * N + runs[i];
            const __m256 before = g == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(out);
            _mm256_storeu_ps(out, _mm256_fmadd_ps(z8[i], xs, _mm256_fmadd_ps(
                _mm256_mul_ps(s[i], pg), _mm256_cvtepi32_ps(sums[i]), before)));
        }
    }
}

template <int L, int R, int V>
void blocks16(const uint8_t* packed, const at::BFloat16* sz, const int16_t* q, const float* p, const float* xsum,
              float* y, int64_t N, int64_t K, int64_t group, int64_t b) {
    const int64_t G = K / group;
    // L = 32: per 128-bit lane of [v_k lo 8 bytes, v_k+1 lo 8 | v_k hi 8, v_k+1 hi 8]: bytes i and 8 + i as a pair
    const __m256i pick0 = _mm256_setr_epi8(0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1,
                                           0, -1, 8, -1, 1, -1, 9, -1, 2, -1, 10, -1, 3, -1, 11, -1);
    const __m256i pick1 = _mm256_setr_epi8(4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1,
                                           4, -1, 12, -1, 5, -1, 13, -1, 6, -1, 14, -1, 7, -1, 15, -1);
    const __m256i low = _mm256_set1_epi16(15), zero = _mm256_setzero_si256();
    const uint8_t* codes = packed + b * K * (L / 2);
    for (int part = 0; part < L / 8 / V; part++) {
        for (int64_t g = 0; g < G; g++) {
            __m256i acc[R][V];
            for (int r = 0; r < R; r++)
                for (int i = 0; i < V; i++) acc[r][i] = _mm256_setzero_si256();
            for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
                __m256i w[L / 16], c[V];  // both nibbles of code vectors t and t + L / 16 (the first's rows + L / 2)
                if constexpr (L == 32) {
                    const __m256i v = _mm256_permute4x64_epi64(
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k * 16)), 0xd8);
                    w[0] = _mm256_shuffle_epi8(v, pick0), w[1] = _mm256_shuffle_epi8(v, pick1);
                } else {
                    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k * 32)),
                                  bb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k * 32 + 32));
                    if (V == 4 || part % 2 == 0) {
                        const __m256i u = _mm256_unpacklo_epi8(a, bb);  // a0 b0 a1 b1 .. a7 b7 | a16 b16 ..
                        w[0] = _mm256_unpacklo_epi8(u, zero), w[1] = _mm256_unpackhi_epi8(u, zero);
                    }
                    if (V == 4 || part % 2 == 1) {
                        const __m256i u = _mm256_unpackhi_epi8(a, bb);  // a8 b8 .. a15 b15 | a24 b24 ..
                        w[2] = _mm256_unpacklo_epi8(u, zero), w[3] = _mm256_unpackhi_epi8(u, zero);
                    }
                }
                for (int i = 0; i < V; i++) {
                    const int t = part * V + i;
                    c[i] = t < L / 16 ? _mm256_and_si256(w[t], low) : _mm256_srli_epi16(w[t - L / 16], 4);
                }
                for (int r = 0; r < R; r++) {
                    const __m256i qk = broadcast_pair(q + r * K + k);
                    for (int i = 0; i < V; i++) acc[r][i] = _mm256_add_epi32(acc[r][i], _mm256_madd_epi16(c[i], qk));
                }
            }
            for (int j = 0; j < V / 2; j++)  // the two runs of 8 rows of code vectors 2j, 2j + 1
                add_runs<R, V>(acc, j, b * L + run_of<L>(part * V / 2 + j), L / 4, sz, p, xsum, y, N, G, g);
        }
    }
}

// As blocks16<64, R, V>, all 64 rows of a block in one pass over K (AVX-512's 32 vector registers hold their sums),
// each row's two products added to its sum by _mm256_dpwssd_epi32 (a multiply, an add and the pair's sum in one
// instruction): the same int32 sums and the same float32 steps, so the same bits as blocks16.
template <int R>
VNNI void blocks16_vnni64(const uint8_t* packed, const at::BFloat16* sz, const int16_t* q, const float* p,
                          const float* xsum, float* y, int64_t N, int64_t K, int64_t group, int64_t b) {
    const int64_t G = K / group;
    const __m256i low = _mm256_set1_epi16(15), zero = _mm256_setzero_si256();
    const uint8_t* codes = packed + b * K * 32;
    for (int64_t g = 0; g < G; g++) {
        __m256i acc[R][8];
        for (int r = 0; r < R; r++)
            for (int i = 0; i < 8; i++) acc[r][i] = _mm256_setzero_si256();
        for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k * 32)),
                          bb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + k * 32 + 32));
            const __m256i u0 = _mm256_unpacklo_epi8(a, bb), u1 = _mm256_unpackhi_epi8(a, bb);
            const __m256i w[4] = {_mm256_unpacklo_epi8(u0, zero), _mm256_unpackhi_epi8(u0, zero),
                                  _mm256_unpacklo_epi8(u1, zero), _mm256_unpackhi_epi8(u1, zero)};
            __m256i c[8];  // code vectors t = 0..7 as blocks16 numbers them for L = 64
            for (int i = 0; i < 4; i++) c[i] = _mm256_and_si256(w[i], low), c[4 + i] = _mm256_srli_epi16(w[i], 4);
            for (int r = 0; r < R; r++) {
                const __m256i qk = broadcast_pair(q + r * K + k);
                for (int i = 0; i < 8; i++) acc[r][i] = _mm256_dpwssd_epi32(acc[r][i], c[i], qk);
            }
        }
        for (int j = 0; j < 4; j++)  // the two runs of 8 rows of code vectors 2j, 2j + 1
            add_runs<R, 8>(acc, j, b * 64 + run_of<64>(j), 16, sz, p, xsum, y, N, G, g);
    }
}

// The largest group the int32 sums hold. Each lane adds, per group, group / 2 madd results of two products (int4_rows:
// |sum| <= 2048 * 2 * 15 * 32767 ~ 2.01e9 at 4,096) or group / 16 of two (int8_rows: 256 * 2 * 128 * 32767 ~ 2.15e9,
// and |q| <= 32640 for bf16 x, ~2.14e9): below 2^31 ~ 2.147e9
constexpr int64_t GROUP16 = 4096;

template <int L>
void rows16(const uint8_t* packed, const at::BFloat16* sz, const at::BFloat16* xin, at::BFloat16* yout, int64_t M,
            int64_t N, int64_t K, int64_t group) {
    const int64_t G = K / group;
    Rows16 x;
    quantize16(xin, M, K, group, x);
    std::vector<float> y(M * N);
    const bool fast = L == 64 && vnni();  // (blocks16_vnni64)
    at::parallel_for(0, N / L, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; b++) {  // each block of codes read from memory once, for all rows of x
            int64_t m = 0;
            if constexpr (L == 64) {
                if (fast) {
                    for (; m + 2 <= M; m += 2)  // (a row alone: blocks16<64, 1, 4> below, faster for one)
                        blocks16_vnni64<2>(packed, sz, x.q.data() + m * K, x.p.data() + m * G, x.sum.data() + m * G,
                                           y.data() + m * N, N, K, group, b);
                }
            }
            for (; m + 4 <= M; m += 4)
                blocks16<L, 4, 2>(packed, sz, x.q.data() + m * K, x.p.data() + m * G, x.sum.data() + m * G,
                                  y.data() + m * N, N, K, group, b);
            for (; m + 2 <= M; m += 2)
                blocks16<L, 2, 4>(packed, sz, x.q.data() + m * K, x.p.data() + m * G, x.sum.data() + m * G,
                                  y.data() + m * N, N, K, group, b);
            if (m < M)
                blocks16<L, 1, 4>(packed, sz, x.q.data() + m * K, x.p.data() + m * G, x.sum.data() + m * G,
                                  y.data() + m * N, N, K, group, b);
        }
        round_into(y.data(), yout, M, N, b0 * L, b1 * L);
    });
}

template <int L>
void int4_rows_of(const at::Tensor& x, const uint8_t* packed, int64_t group, const at::Tensor& sz, at::Tensor& y) {
    const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
    if (sz.scalar_type() == at::kBFloat16 && group % 2 == 0 && group <= GROUP16)
        rows16<L>(packed, sz.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), M, N,
                  K, group);
    else if (sz.scalar_type() == at::kBFloat16)
        rows<L>(packed, sz.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), M, N, K,
                group);
    else
        rows<L>(packed, sz.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(), M, N, K, group);
}

at::Tensor int4_rows(const at::Tensor& x, const at::Tensor& packed, int64_t group_size,
                     const at::Tensor& scales_and_zeros, int64_t block_rows) {
    TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && scales_and_zeros.dim() == 3, "zoo_kernels::int4_rows: x [M, K], "
                "packed [N, K / 2], scales_and_zeros [K / group_size, N, 2]");
    const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
    TORCH_CHECK(block_rows == 32 || block_rows == 64, "zoo_kernels::int4_rows: block_rows is 32 (torch's AVX2 layout) "
                "or 64 (its AVX-512 one)");
    TORCH_CHECK(K > 0 && packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) * 2 == K &&
                N % block_rows == 0 && group_size > 0 && K % group_size == 0 &&
                scales_and_zeros.size(0) == K / group_size && scales_and_zeros.size(1) == N &&
                scales_and_zeros.size(2) == 2, "zoo_kernels::int4_rows: shapes do not match");
    TORCH_CHECK(x.scalar_type() == scales_and_zeros.scalar_type() &&
                (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
                "zoo_kernels::int4_rows: x and scales_and_zeros both bfloat16 or both float32");
    auto sz = scales_and_zeros.contiguous(), xc = x.contiguous();
    // in x's dtype, rounded inside the operator as torch's kernel rounds: compiled code, which fuses what follows,
    // cannot skip the rounding, and gets the eager products
    auto y = at::empty({M, N}, x.options());
    if (block_rows == 32)
        int4_rows_of<32>(xc, packed.data_ptr<uint8_t>(), group_size, sz, y);
    else
        int4_rows_of<64>(xc, packed.data_ptr<uint8_t>(), group_size, sz, y);
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

// AVX512-VNNI CPUs (AMD's Zen 4, Intel's Xeons from Cascade Lake on): the same int32 group sums as int8_block16's,
// exactly, in fewer instructions. _mm256_dpbusd_epi32 multiplies unsigned bytes by signed ones and sums each four
// into a 32-bit lane (32 products an instruction, where _mm256_madd_epi16 takes 16 and an add), so each q is split
// into bytes, q = 256 h + l (h = q >> 8 signed, l = q & 255 unsigned): sum c q = 256 sum c h + sum c l, the first
// taken as sum (c + 128) h - 128 sum h (c + 128 = c ^ 0x80: the unsigned codes) and the second directly. A group's
// sum, a vector of 8 lanes, then needs adding across: eight groups' vectors are added across together (three rounds
// of _mm256_hadd_epi32 and a lane exchange) into one vector of their 8 sums, which is converted to float32 and scaled
// by the 8 groups' scales at once. The sums are exact integers (mod 2^32 on the way, exact at the end: |sum c q| <=
// group 128 32640 < 2^31 for groups of up to 512), each converted to float32 once (as int8_block16's are), but
// int8_block16 converts a group's 8 lane sums and adds them across in float32: the two paths' outputs may differ
// in the last bits (each is the same for a row alone as in a batch).
struct Bytes16 {  // Rows16's q as bytes, and per group (padded with zeros to a multiple of 8) what the products need
    std::vector<uint8_t> l;   // [M, K] q & 255
    std::vector<int8_t> h;    // [M, K] q >> 8
    std::vector<int32_t> hh;  // [M, G8] 32768 sum h (mod 2^32)
    std::vector<float> p, sum;  // [M, G8] Rows16's p and sum, zeros past G
};

void split_bytes(const Rows16& x, int64_t M, int64_t K, int64_t group, Bytes16& out) {
    const int64_t G = K / group, G8 = (G + 7) / 8 * 8;
    out.l.resize(M * K), out.h.resize(M * K);
    out.hh.assign(M * G8, 0), out.p.assign(M * G8, 0.0f), out.sum.assign(M * G8, 0.0f);
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            uint32_t hsum = 0;
            for (int64_t k = m * K + g * group; k < m * K + (g + 1) * group; k++) {
                out.l[k] = static_cast<uint8_t>(x.q[k] & 255);
                out.h[k] = static_cast<int8_t>(x.q[k] >> 8);
                hsum += static_cast<uint32_t>(static_cast<int32_t>(out.h[k]));
            }
            out.hh[m * G8 + g] = static_cast<int32_t>(hsum * 32768u);
            out.p[m * G8 + g] = x.p[m * G + g], out.sum[m * G8 + g] = x.sum[m * G + g];
        }
}

// Up to 8 (valid) bf16 values from p as float32, zeros past valid
VNNI inline __m256 load8_bf16(const at::BFloat16* p, int valid) {
    const __m128i h = _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << valid) - 1), p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// One group's sums for R rows of x, 8 lanes each (C: the group's 32-byte chunks, 0 where not 1, 2 or 4)
template <int R, int C>
VNNI inline void group_vnni(const int8_t* c, const uint8_t* l, const int8_t* h, int64_t K, int64_t group,
                            __m256i (&v)[R]) {
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256i lo[R], hi[R];
    for (int r = 0; r < R; r++) lo[r] = hi[r] = _mm256_setzero_si256();
    const int64_t chunks = C ? C : group / 32;
#pragma GCC unroll 4
    for (int64_t i = 0; i < chunks; i++) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + 32 * i));
        const __m256i u = _mm256_xor_si256(w, flip);  // c + 128, unsigned
        for (int r = 0; r < R; r++) {
            lo[r] = _mm256_dpbusd_epi32(lo[r], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(l + r * K + 32 * i)),
                                        w);
            hi[r] = _mm256_dpbusd_epi32(hi[r], u,
                                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + r * K + 32 * i)));
        }
    }
    for (int r = 0; r < R; r++) v[r] = _mm256_add_epi32(_mm256_slli_epi32(hi[r], 8), lo[r]);
}

template <int R, int C>
VNNI void int8_block_vnni(const int8_t* codes, const at::BFloat16* scales, const at::BFloat16* zeros,
                          const Bytes16& x, int64_t m0, float* y, int64_t N, int64_t K, int64_t group, int64_t n0,
                          int64_t n1) {
    const int64_t G = K / group, G8 = (G + 7) / 8 * 8;
    const uint8_t* l = x.l.data() + m0 * K;
    const int8_t* h = x.h.data() + m0 * K;
    const int32_t* hh = x.hh.data() + m0 * G8;
    const float *p = x.p.data() + m0 * G8, *xsum = x.sum.data() + m0 * G8;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t* c = codes + n * K;
        __m256 out[R], zout[R];
        for (int r = 0; r < R; r++) out[r] = _mm256_setzero_ps(), zout[r] = _mm256_setzero_ps();
        for (int64_t g0 = 0; g0 < G; g0 += 8) {
            const int valid = static_cast<int>(std::min<int64_t>(8, G - g0));
            __m256i quads[R][2];  // groups g0..g0 + 3 and g0 + 4..g0 + 7 added across in pairs of lanes, twice
            for (int half = 0; half < 2; half++) {
                __m256i pairs[R][2];  // _mm256_hadd_epi32 of two groups' sums (zeros past G)
                for (int i = 0; i < 2; i++) {
                    __m256i v0[R], v1[R];
                    for (int r = 0; r < R; r++) v0[r] = v1[r] = _mm256_setzero_si256();
                    const int64_t g = g0 + 4 * half + 2 * i;
                    if (g < G) group_vnni<R, C>(c + g * group, l + g * group, h + g * group, K, group, v0);
                    if (g + 1 < G)
                        group_vnni<R, C>(c + (g + 1) * group, l + (g + 1) * group, h + (g + 1) * group, K, group, v1);
                    for (int r = 0; r < R; r++) pairs[r][i] = _mm256_hadd_epi32(v0[r], v1[r]);
                }
                for (int r = 0; r < R; r++) quads[r][half] = _mm256_hadd_epi32(pairs[r][0], pairs[r][1]);
            }
            const __m256 s = load8_bf16(scales + n * G + g0, valid);
            const __m256 z = zeros ? load8_bf16(zeros + n * G + g0, valid) : _mm256_setzero_ps();
            for (int r = 0; r < R; r++) {
                // [g0 g1 g2 g3 (first halves) | the same (second halves)], and g4..g7's: the halves added
                const __m256i a = quads[r][0], b = quads[r][1];
                __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20),
                                                _mm256_permute2x128_si256(a, b, 0x31));
                sums = _mm256_sub_epi32(sums, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hh + r * G8 + g0)));
                const __m256 sp = _mm256_mul_ps(s, _mm256_loadu_ps(p + r * G8 + g0));
                out[r] = _mm256_fmadd_ps(sp, _mm256_cvtepi32_ps(sums), out[r]);
                if (zeros) zout[r] = _mm256_fmadd_ps(z, _mm256_loadu_ps(xsum + r * G8 + g0), zout[r]);
            }
        }
        for (int r = 0; r < R; r++) y[r * N + n] = hsum(out[r]) + (zeros ? hsum(zout[r]) : 0.0f);
    }
}

template <int R>
void int8_block_vnni(const int8_t* codes, const at::BFloat16* scales, const at::BFloat16* zeros, const Bytes16& x,
                     int64_t m0, float* y, int64_t N, int64_t K, int64_t group, int64_t n0, int64_t n1) {
    if (group == 32)
        int8_block_vnni<R, 1>(codes, scales, zeros, x, m0, y, N, K, group, n0, n1);
    else if (group == 64)
        int8_block_vnni<R, 2>(codes, scales, zeros, x, m0, y, N, K, group, n0, n1);
    else if (group == 128)
        int8_block_vnni<R, 4>(codes, scales, zeros, x, m0, y, N, K, group, n0, n1);
    else
        int8_block_vnni<R, 0>(codes, scales, zeros, x, m0, y, N, K, group, n0, n1);
}

// Whether int8_rows takes the VNNI path for bf16 x in groups of `group`
bool vnni_for(int64_t group) { return vnni() && group % 32 == 0 && group <= 512; }

template <typename S>
void int8_rows_of(const int8_t* codes, const S* scales, const S* zeros, const S* xin, S* yout, int64_t M, int64_t N,
                  int64_t K, int64_t group) {
    const int64_t G = K / group;
    // bf16 rows of x as Rows16, float32 ones as floats
    const bool int16 = std::is_same_v<S, at::BFloat16> && group <= GROUP16;
    std::vector<float> x, xsum, buffer;
    Rows16 x16;
    Bytes16 bytes;
    bool vnni = false;
    if (int16)
        quantize16(xin, M, K, group, x16);
    else
        widen(xin, M, K, group, x, xsum);
    if constexpr (std::is_same_v<S, at::BFloat16>)
        if (int16 && (vnni = vnni_for(group))) split_bytes(x16, M, K, group, bytes);
    float* y = sums_for(yout, M * N, buffer);
    at::parallel_for(0, N, 256, [&](int64_t n0, int64_t n1) {
        for (int64_t c0 = n0; c0 < n1; c0 += 64) {  // 64 rows of codes (36 KB for K = 576) at a time, for all rows of x
            const int64_t c1 = std::min(c0 + 64, n1);
            int64_t m = 0;
            if constexpr (std::is_same_v<S, at::BFloat16>) {
                if (vnni) {
                    for (; m + 4 <= M; m += 4)
                        int8_block_vnni<4>(codes, scales, zeros, bytes, m, y + m * N, N, K, group, c0, c1);
                    for (; m + 2 <= M; m += 2)
                        int8_block_vnni<2>(codes, scales, zeros, bytes, m, y + m * N, N, K, group, c0, c1);
                    for (; m < M; m++)
                        int8_block_vnni<1>(codes, scales, zeros, bytes, m, y + m * N, N, K, group, c0, c1);
                }
            }
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
    m.def("int4_rows(Tensor x, Tensor packed, int group_size, Tensor scales_and_zeros, int block_rows) -> Tensor");
    m.def("int8_rows(Tensor x, Tensor codes, Tensor scales, Tensor? zeros) -> Tensor");
    m.def("vnni() -> bool", &vnni);  // whether the kernels take their VNNI paths here (tests check it)
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
