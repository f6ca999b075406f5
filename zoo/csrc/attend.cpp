// softmax(q kᵀ * scale + mask) v for the few queries of a decode step, a speculative check or a batch of steps, over
// a KV cache, with AVX2 (see zoo/kernels.py). torch's CPU SDPA (its flash kernel) spends ~40 us on SmolLM2's one
// query per layer over 160 keys and ~140 us over 1,024, most of it fixed cost; this one 13 and 61, each query row on
// its own (python bench/attend.py: 2.3-3.2x SDPA's speed on SmolLM2's heads, 1.6-2.5x on Gemma 3's).
// Each query row gets the same operations whatever the other rows and however many keys follow its last visible one:
// a key's score is one 8-key block's lane (blocks past the keys repeat the last key and are dropped; a block the mask
// hides entirely is skipped), the probabilities are summed one by one in the keys' order, and a masked key's zero
// probability adds nothing (hidden slots hold finite values: the caches start as zeros). So a decode step over the
// slots it fills gets the same bits as a compiled step over the whole cache, a speculative check's row as the step that
// would have decoded it, a row in a batch as the row alone, and a row whose keys lie among holes (the slots a
// speculative check or the engine rejected, masked) as over the same keys side by side.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec.h"

namespace {

using zoo_vec::hmax;
using zoo_vec::load8;

// Lane i: the sum of a[i]'s eight lanes (each lane's sum depends on a[i] alone)
inline __m256 sums8(const __m256 a[8]) {
    const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);  // [a0..a3 low half | high half]
    return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// e^x for x <= 0 (a score minus the row's largest), within ~2 float32 ulps: x = n ln2 + r, |r| <= ln2 / 2, e^r by
// Cephes' expf polynomial, times 2^n; 0 below -87.3 (and for -inf), NaN for NaN
inline __m256 exp_nonpositive(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-87.33654f);
    const __m256 under = _mm256_cmp_ps(x, lowest, _CMP_LT_OQ);
    x = _mm256_max_ps(lowest, x);  // (max_ps returns its second operand where either is NaN)
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts, the first exact in n
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    const __m256 e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(e, _mm256_castsi256_ps(two_n)));
}

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr int64_t MAX_HEAD_DIM = 512;

// One query row q [D] over keys k and values v (row strides ks, vs; the last dimension contiguous), S of them: keys
// j >= visible are hidden (causality), mask [S] (or null) is added to the scores. scores: a buffer of S rounded up to
// 8.
template <typename T>
void attend_row(const T* q, const T* k, const T* v, int64_t ks, int64_t vs, const T* mask, int64_t visible, int64_t S,
                int64_t D, float scale, float* scores, T* out) {
    float qf[MAX_HEAD_DIM];
    for (int64_t d = 0; d < D; d++) qf[d] = static_cast<float>(q[d]);
    const int64_t padded = (S + 7) / 8 * 8;
    for (int64_t j0 = 0; j0 < padded; j0 += 8) {
        const bool whole = j0 + 8 <= std::min(S, visible);  // all 8 keys there and causally visible
        __m256 m8 = _mm256_setzero_ps();
        bool any = false;  // whether a key of the block is visible
        if (whole && mask) {
            m8 = load8(mask + j0);
            any = _mm256_movemask_ps(_mm256_cmp_ps(m8, _mm256_set1_ps(NEG_INF), _CMP_NEQ_UQ)) != 0;
        } else {
            for (int64_t j = j0; j < std::min(j0 + 8, S); j++)
                any |= j < visible && (!mask || static_cast<float>(mask[j]) != NEG_INF);
        }
        if (!any) {
            _mm256_storeu_ps(scores + j0, _mm256_set1_ps(NEG_INF));
            continue;
        }
        const T* rows[8];
        for (int i = 0; i < 8; i++) rows[i] = k + std::min(j0 + i, S - 1) * ks;
        __m256 acc[8];
        for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 8) {
            const __m256 qd = _mm256_loadu_ps(qf + d);
            for (int i = 0; i < 8; i++) acc[i] = _mm256_fmadd_ps(load8(rows[i] + d), qd, acc[i]);
        }
        const __m256 scaled = _mm256_mul_ps(sums8(acc), _mm256_set1_ps(scale));
        if (whole) {  // (the same sums as the loop below, 8 at a time)
            _mm256_storeu_ps(scores + j0, mask ? _mm256_add_ps(scaled, m8) : scaled);
            continue;
        }
        _mm256_storeu_ps(scores + j0, scaled);
        for (int64_t j = j0; j < j0 + 8; j++)
            scores[j] = j >= S || j >= visible ? NEG_INF : mask ? scores[j] + static_cast<float>(mask[j]) : scores[j];
    }
    __m256 top = _mm256_set1_ps(NEG_INF);
    for (int64_t j0 = 0; j0 < padded; j0 += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(scores + j0));
    const __m256 largest = _mm256_set1_ps(hmax(top));
    for (int64_t j0 = 0; j0 < padded; j0 += 8)
        _mm256_storeu_ps(scores + j0, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j0), largest)));
    // the probabilities summed one by one in the keys' order (a hidden slot's 0 adds nothing, wherever it lies:
    // lanes of 8 slots would group the keys by slot, which holes shift), in the first pass over the values; in
    // float64, so that thousands of keys in a row lose nothing (float32's one chain of adds lost 1e-5 at 4,096)
    double total = 0.0;
    __m256 inverse = _mm256_setzero_ps();
    for (int64_t d0 = 0; d0 < D; d0 += 64) {  // 64 of the output's dimensions at a time, in registers
        const int n = static_cast<int>(std::min<int64_t>(64, D - d0) / 8);
        __m256 o[8];
        for (int c = 0; c < 8; c++) o[c] = _mm256_setzero_ps();
        for (int64_t j = 0; j < S; j++) {
            if (scores[j] == 0.0f) continue;  // (a hidden key: it would add 0 * v)
            if (d0 == 0) total += scores[j];  // (in the shadow of the FMAs' chains)
            const __m256 p = _mm256_set1_ps(scores[j]);
            const T* vj = v + j * vs + d0;
            for (int c = 0; c < n; c++) o[c] = _mm256_fmadd_ps(p, load8(vj + 8 * c), o[c]);
        }
        if (d0 == 0) inverse = _mm256_set1_ps(static_cast<float>(1.0 / total));
        for (int c = 0; c < n; c++) {
            float y[8];
            _mm256_storeu_ps(y, _mm256_mul_ps(o[c], inverse));
            for (int i = 0; i < 8; i++) out[d0 + 8 * c + i] = static_cast<T>(y[i]);  // (to nearest even)
        }
    }
}

// causal (with no mask: SDPA's is_causal): query t sees keys 0..t
template <typename T>
void attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, bool causal,
                 float scale, at::Tensor& out) {
    const int64_t B = q.size(0), H = q.size(1), T_ = q.size(2), D = q.size(3), H_kv = k.size(1), S = k.size(2);
    const int64_t padded = (S + 7) / 8 * 8;
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    const T* mp = mask.defined() ? mask.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    std::vector<float> scores(B * H * T_ * padded);
    at::parallel_for(0, B * H * T_, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {  // query row r = (b, h, t)
            const int64_t b = r / (H * T_), h = r / T_ % H, t = r % T_, g = h / (H / H_kv);
            const T* mrow = mp ? mp + b * mask.stride(0) + t * mask.stride(2) : nullptr;
            attend_row(qp + b * q.stride(0) + h * q.stride(1) + t * q.stride(2),
                       kp + b * k.stride(0) + g * k.stride(1), vp + b * v.stride(0) + g * v.stride(1),
                       k.stride(2), v.stride(2), mrow, causal && !mp ? t + 1 : S, S, D, scale,
                       scores.data() + r * padded, op + r * D);
        }
    });
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask,
                  bool causal, c10::optional<double> scale) {
    TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes() && q.size(0) == k.size(0) &&
                q.size(3) == k.size(3) && k.size(1) > 0 && q.size(1) % k.size(1) == 0 && k.size(2) > 0,
                "zoo_kernels::attend: q [B, H, T, D], k and v [B, H_kv, S, D], H a multiple of H_kv");
    const int64_t D = q.size(3), T_ = q.size(2), S = k.size(2);
    TORCH_CHECK(D % 8 == 0 && D <= MAX_HEAD_DIM, "zoo_kernels::attend: head dimension a multiple of 8, at most 512");
    TORCH_CHECK((q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat) &&
                k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type() &&
                (!mask || mask->scalar_type() == q.scalar_type()),
                "zoo_kernels::attend: q, k, v and the mask all bfloat16 or all float32");
    TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1,
                "zoo_kernels::attend: k and v contiguous in their last dimension");
    TORCH_CHECK(!mask || (mask->dim() <= 4 && at::is_expandable_to(mask->sizes(), {q.size(0), 1, T_, S})),
                "zoo_kernels::attend: a mask that broadcasts to [B, 1, T, S]");
    auto qc = q.contiguous();
    auto m = mask ? mask->expand({q.size(0), 1, T_, S}) : at::Tensor();  // (a view: broadcast dimensions stride 0)
    if (m.defined() && m.stride(3) != 1) m = m.contiguous();
    auto out = at::empty(q.sizes(), q.options());  // [B, H, T, D], contiguous
    const float s = static_cast<float>(scale ? *scale : 1.0 / std::sqrt(static_cast<double>(D)));
    if (q.scalar_type() == at::kBFloat16)
        attend_rows<at::BFloat16>(qc, k, v, m, causal, s, out);
    else
        attend_rows<float>(qc, k, v, m, causal, s, out);
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo_kernels, m) {
    m.def("attend(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, float? scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_kernels, Autograd, m) {
    m.impl("attend", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(zoo_kernels, CPU, m) {
    m.impl("attend", &attend);
}
