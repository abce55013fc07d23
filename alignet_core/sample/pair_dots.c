/* The teacher's three dot products per triplet, [a·b, a·c, b·c], from float16 or float32 rows
 * (alignet_core/sample/native.py builds and loads this file; teacher.py holds the same sum in numpy).
 *
 * One pass reads each of a triplet's three rows once, converts float16 to float32 in registers (exact)
 * and keeps the three sums in float32. The order of every addition is fixed by this source, so any
 * compiler, flag set or CPU gives the same bits (the build passes -ffp-contract=off: no fused
 * multiply-add; a product is rounded to float32, then added):
 *   lane l (0..15) sums the products at k = l, l + 16, l + 32, ... in increasing k, from 0.0f;
 *   the 16 lanes are added as a tree: w[l] += w[l + h] for h = 8, 4, 2, 1;
 *   the last p mod 16 products are then added one by one in increasing k.
 * The rows of the next triplets are prefetched: they are random rows of a large store.
 */
#include <stdint.h>
#include <string.h>

#define LANES 16
#define AHEAD 4 /* triplets prefetched ahead */

typedef float f8 __attribute__((vector_size(32)));

#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
static inline f8 load_f16(const _Float16 *x) { return (f8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)x)); }
#else
static inline f8 load_f16(const _Float16 *x) {
    f8 v;
    for (int l = 0; l < 8; l++) v[l] = (float)x[l];
    return v;
}
#endif

static inline f8 load_f32(const float *x) {
    f8 v;
    memcpy(&v, x, sizeof v);
    return v;
}

/* lanes 0..7 in lo, 8..15 in hi */
static inline float lane_tree(f8 lo, f8 hi) {
    float w[LANES];
    memcpy(w, &lo, sizeof lo);
    memcpy(w + 8, &hi, sizeof hi);
    for (int h = LANES / 2; h >= 1; h /= 2)
        for (int l = 0; l < h; l++) w[l] = w[l] + w[l + h];
    return w[0];
}

#define PAIR_DOTS(T, LOAD)                                                                                   \
    for (int64_t i = 0; i < m; i++) {                                                                        \
        if (i + AHEAD < m) {                                                                                 \
            const int64_t *n = t + 3 * (i + AHEAD);                                                          \
            for (int r = 0; r < 3; r++) {                                                                    \
                const char *row = (const char *)(e + n[r] * p);                                              \
                for (int64_t k = 0; k < p * (int64_t)sizeof(T); k += 64) __builtin_prefetch(row + k);        \
            }                                                                                                \
        }                                                                                                    \
        const T *a = e + t[3 * i] * p, *b = e + t[3 * i + 1] * p, *c = e + t[3 * i + 2] * p;                \
        f8 ab0 = {0}, ab1 = {0}, ac0 = {0}, ac1 = {0}, bc0 = {0}, bc1 = {0};                                 \
        int64_t k = 0;                                                                                       \
        for (; k + LANES <= p; k += LANES) {                                                                 \
            f8 a0 = LOAD(a + k), a1 = LOAD(a + k + 8), b0 = LOAD(b + k), b1 = LOAD(b + k + 8);               \
            f8 c0 = LOAD(c + k), c1 = LOAD(c + k + 8);                                                       \
            ab0 += a0 * b0; ab1 += a1 * b1;                                                                  \
            ac0 += a0 * c0; ac1 += a1 * c1;                                                                  \
            bc0 += b0 * c0; bc1 += b1 * c1;                                                                  \
        }                                                                                                    \
        float ab = lane_tree(ab0, ab1), ac = lane_tree(ac0, ac1), bc = lane_tree(bc0, bc1);                  \
        for (; k < p; k++) {                                                                                 \
            float x = (float)a[k], y = (float)b[k], z = (float)c[k];                                         \
            ab += x * y; ac += x * z; bc += y * z;                                                           \
        }                                                                                                    \
        out[3 * i] = ab; out[3 * i + 1] = ac; out[3 * i + 2] = bc;                                           \
    }

/* e: (rows, p) row-major; t: (m, 3) row-major int64 row numbers (checked by the caller); out: (m, 3). */
void pair_dots_f16(const _Float16 *e, int64_t p, const int64_t *t, int64_t m, float *out) { PAIR_DOTS(_Float16, load_f16) }

void pair_dots_f32(const float *e, int64_t p, const int64_t *t, int64_t m, float *out) { PAIR_DOTS(float, load_f32) }
