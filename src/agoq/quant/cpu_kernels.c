/* Fused CPU kernels of the agoq codec: quantize+pack and unpack+dequantize in one pass
 * over each block, the block held in L1. Built by agoq/quant/cpu_kernels.py with
 * -O3 and no fast-math: every float operation is the IEEE one the torch reference does,
 * in the same order, so the bits are the reference's (tests/test_quant_ops.py checks it).
 *
 * dtype codes: 0 float32, 1 bfloat16, 2 float16.  fmt codes: 0 int, 1 fp4_e2m1, 2 fp8_e4m3.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define MAX_BLOCK 4096


static inline float bits2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f2bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* float -> bfloat16, round to nearest even (torch's rounding; a NaN stays a NaN). */
static inline uint16_t bf16_rne(float f) {
    uint32_t u = f2bits(f);
    uint16_t r = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (uint16_t)0x7FC0 : r;
}

static void load_block(const void *x, int dtype, int64_t start, int64_t count, int block,
                       float *out) {
    int64_t i;
    if (dtype == 0) {
        const float *p = (const float *)x + start;
        for (i = 0; i < count; i++) out[i] = p[i];
    } else if (dtype == 1) {
        const uint16_t *p = (const uint16_t *)x + start;
        for (i = 0; i < count; i++) out[i] = bits2f((uint32_t)p[i] << 16);
    } else {
        const _Float16 *p = (const _Float16 *)x + start;
        for (i = 0; i < count; i++) out[i] = (float)p[i];
    }
    for (i = count; i < block; i++) out[i] = 0.0f;
}

/* torch's float -> float8_e4m3fn (c10's algorithm, branch-free so it vectorises): round to
 * nearest even; magnitudes >= 464 give the NaN code (never reached: |v| <= 448). */
static inline uint8_t e4m3_from_f32(float f) {
    uint32_t fb = f2bits(f);
    const uint32_t sign = fb & 0x80000000u;
    const uint32_t denorm = 141u << 23;
    fb ^= sign;
    uint32_t sub = f2bits(bits2f(fb) + bits2f(denorm)) - denorm;
    uint32_t nrm = (fb + ((uint32_t)(7 - 127) << 23) + 0x7FFFFu + ((fb >> 20) & 1u)) >> 20;
    uint32_t r = fb < (121u << 23) ? sub : nrm;
    r = fb >= (1087u << 20) ? 0x7Fu : r;
    return (uint8_t)(r | (sign >> 24));
}

/* One bit plane of width w (k = 8 / w codes per byte, planar: byte j holds codes
 * j, j + n, ..., j + (k-1)n of the block at bit offsets 0, w, ...). */
static void pack_plane(const uint8_t *c, int n, int w, int shift, uint8_t *dst) {
    const uint8_t m = (uint8_t)((1 << w) - 1);
    if (w == 4) {
        for (int j = 0; j < n; j++)
            dst[j] = (uint8_t)(((c[j] >> shift) & m) | (((c[j + n] >> shift) & m) << 4));
    } else if (w == 2) {
        for (int j = 0; j < n; j++)
            dst[j] = (uint8_t)(((c[j] >> shift) & m) | (((c[j + n] >> shift) & m) << 2) |
                               (((c[j + 2 * n] >> shift) & m) << 4) |
                               (((c[j + 3 * n] >> shift) & m) << 6));
    } else { /* w == 1 */
        for (int j = 0; j < n; j++) {
            uint8_t b = 0;
            for (int i = 0; i < 8; i++) b |= (uint8_t)(((c[j + i * n] >> shift) & 1) << i);
            dst[j] = b;
        }
    }
}

static void unpack_plane(const uint8_t *src, int n, int w, int shift, int first, uint8_t *c) {
    const uint8_t m = (uint8_t)((1 << w) - 1);
    const int k = 8 / w;
    for (int i = 0; i < k; i++) {
        uint8_t *ci = c + i * n;
        if (first)
            for (int j = 0; j < n; j++) ci[j] = (uint8_t)((src[j] >> (i * w)) & m);
        else
            for (int j = 0; j < n; j++) ci[j] |= (uint8_t)(((src[j] >> (i * w)) & m) << shift);
    }
}

static const int PLANE_W[9][2] = {
    {0, 0}, {0, 0}, {2, 0}, {2, 1}, {4, 0}, {4, 1}, {4, 2}, {0, 0}, {8, 0}};

static void pack_block(const uint8_t *codes, int block, int bits, uint8_t *dst) {
    if (bits == 8) {
        memcpy(dst, codes, (size_t)block);
        return;
    }
    int shift = 0;
    for (int p = 0; p < 2 && PLANE_W[bits][p]; p++) {
        int w = PLANE_W[bits][p], n = block / (8 / w);
        pack_plane(codes, n, w, shift, dst);
        dst += n;
        shift += w;
    }
}

static void unpack_block(const uint8_t *src, int block, int bits, uint8_t *codes) {
    if (bits == 8) {
        memcpy(codes, src, (size_t)block);
        return;
    }
    int shift = 0;
    for (int p = 0; p < 2 && PLANE_W[bits][p]; p++) {
        int w = PLANE_W[bits][p], n = block / (8 / w);
        unpack_plane(src, n, w, shift, p == 0, codes);
        src += n;
        shift += w;
    }
}

/* The scale of one block, as codec.block_scales computes it (NaN for a non-finite block). */
static inline float block_scale(const float *v, int block, float maxv, int bf16_scale) {
    /* |v| as integers: for non-negative floats the bit patterns order like the values, and
     * every NaN sorts above +inf, so one integer max finds absmax and non-finite blocks. */
    uint32_t m = 0;
    for (int i = 0; i < block; i++) {
        uint32_t a = f2bits(v[i]) & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    if (m >= 0x7F800000u) return NAN;
    float amax = bits2f(m);
    float s = amax / maxv;
    if (amax / s > maxv) s = bits2f(f2bits(s) + 1u); /* nextafter(s, +inf), s >= 0 finite */
    if (bf16_scale) {
        int32_t b = ((int32_t)f2bits(s) + 0xFFFF) & -0x10000;
        if (b > 0x7F7F0000) b = 0x7F7F0000;
        s = bits2f((uint32_t)b);
    }
    return s;
}

/* One element's code. Int: |v| <= maxv by the scale's rounding, so the clamp is the
 * reference's safety net, done on integers where it vectorises. */
static inline int32_t enc_int(float v, int32_t qmax, int32_t half) {
    int32_t q = (int32_t)rintf(v);
    q = q < -qmax ? -qmax : q;
    q = q > qmax ? qmax : q;
    return q + half;
}

static inline int32_t enc_int_noise(float v, float u, int32_t qmax, int32_t half) {
    int32_t q = (int32_t)floorf(v + u);
    q = q < -qmax ? -qmax : q;
    q = q > qmax ? qmax : q;
    return q + half;
}

/* Nearest-even E2M1 of |v| <= 6. The grid 0, .5, .., 2 | 2, 3, 4 | 4, 6 is uniform within
 * each range, so one round-to-nearest-even of a * (2, 1 or 1/2) (exact: powers of two) plus
 * the range's first code gives the reference's code, ties included. */
static inline int32_t enc_fp4(float v) {
    float a = fabsf(v);
    float m = a < 2.0f ? 2.0f : (a < 4.0f ? 1.0f : 0.5f);
    int32_t c = (a < 2.0f ? 0 : 2) + (a < 4.0f ? 0 : 2);
    int32_t code = (int32_t)rintf(a * m) + c;
    return code | ((int32_t)(v < 0.0f) << 3);
}

#define ENCODE(EXPR)                                                                       \
    do {                                                                                   \
        if (bits == 8) {                                                                   \
            for (int i = 0; i < block; i++) {                                              \
                const int k = i;                                                           \
                dst[i] = (uint8_t)(EXPR);                                                  \
            }                                                                              \
        } else if (bits == 4) { /* fused with the 4-bit plane: byte j = codes j, j + B/2 */ \
            const int h = block / 2;                                                       \
            for (int j = 0; j < h; j++) {                                                  \
                int k = j;                                                                 \
                int32_t lo = (EXPR);                                                       \
                k = j + h;                                                                 \
                int32_t hi = (EXPR);                                                       \
                dst[j] = (uint8_t)(lo | (hi << 4));                                        \
            }                                                                              \
        } else {                                                                           \
            for (int i = 0; i < block; i++) {                                              \
                const int k = i;                                                           \
                codes[i] = (uint8_t)(EXPR);                                                \
            }                                                                              \
            pack_block(codes, block, bits, dst);                                           \
        }                                                                                  \
    } while (0)

/* Encode and pack one block into dst (xv: the block's fp32 values, may be overwritten). */
static void encode_block(float *xv, float s, int block, int bits, int fmt, float maxv,
                         const float *noise, uint8_t *dst) {
    uint8_t codes[MAX_BLOCK];
    int ok = (s > 0.0f) && (s <= 3.40282347e38f); /* finite and positive */
    /* v = x / s; an all-zero block (s = 0) keeps x / 1 (its signed zeros); a non-finite
     * block (s NaN) gets the zero code. */
    const float d = ok ? s : 1.0f;
    if (!ok && s != 0.0f) memset(xv, 0, (size_t)block * sizeof(float));
    if (fmt == 0) {
        const int32_t qmax = (int32_t)maxv, half = 1 << (bits - 1);
        if (noise)
            ENCODE(enc_int_noise(xv[k] / d, noise[k], qmax, half));
        else
            ENCODE(enc_int(xv[k] / d, qmax, half));
    } else if (fmt == 1) {
        ENCODE(enc_fp4(xv[k] / d));
    } else {
        ENCODE(e4m3_from_f32(xv[k] / d));
    }
}

int agoq_quantize(const void *x, int dtype, int64_t rows, int64_t row_elems,
                  const float *noise, uint8_t *wire, int64_t row_bytes, int64_t scale_off,
                  int bits, int fmt, int block, int bf16_scale, float maxv, int nthreads) {
    if (block > MAX_BLOCK || block <= 0) return 1;
    const int64_t nb = (row_elems + block - 1) / block;
    const int64_t total = rows * nb;
    const int64_t bbytes = (int64_t)block * bits / 8;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < total; t++) {
        float xv[MAX_BLOCK];
        int64_t r = t / nb, b = t % nb;
        int64_t start = b * block;
        int64_t count = row_elems - start < block ? row_elems - start : block;
        load_block(x, dtype, r * row_elems + start, count, block, xv);
        float s = block_scale(xv, block, maxv, bf16_scale);
        const float *nz = noise ? noise + (r * nb + b) * block : 0;
        uint8_t *row = wire + r * row_bytes;
        encode_block(xv, s, block, bits, fmt, maxv, nz, row + b * bbytes);
        if (bf16_scale) {
            uint16_t h = (uint16_t)(f2bits(s) >> 16);
            memcpy(row + scale_off + b * 2, &h, 2);
        } else {
            memcpy(row + scale_off + b * 4, &s, 4);
        }
        if (b == nb - 1) { /* the alignment gap and tail of the row are zero */
            memset(row + nb * bbytes, 0, (size_t)(scale_off - nb * bbytes));
            int64_t end = scale_off + nb * (bf16_scale ? 2 : 4);
            memset(row + end, 0, (size_t)(row_bytes - end));
        }
    }
    return 0;
}


/* E2M1 magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 (exact, as the table's): codes >= 2 are
 * the fp32 bit patterns (c + 252) << 22. */
static inline float dec_fp4(int32_t c) {
    int32_t m = c & 7;
    uint32_t bits = m >= 2 ? (uint32_t)(m + 252) << 22 : (m == 1 ? 0x3F000000u : 0u);
    return bits2f(bits | ((uint32_t)(c & 8) << 28));
}

#define DECODE(EXPR)                                                                       \
    do {                                                                                   \
        if (bits == 8) {                                                                   \
            for (int i = 0; i < block; i++) {                                              \
                const int32_t c = src[i];                                                  \
                v[i] = (EXPR);                                                             \
            }                                                                              \
        } else if (bits == 4) {                                                            \
            const int h = block / 2;                                                       \
            for (int j = 0; j < h; j++) {                                                  \
                int32_t c = src[j] & 15;                                                   \
                v[j] = (EXPR);                                                             \
                c = src[j] >> 4;                                                           \
                v[j + h] = (EXPR);                                                         \
            }                                                                              \
        } else {                                                                           \
            uint8_t codes[MAX_BLOCK];                                                      \
            unpack_block(src, block, bits, codes);                                         \
            for (int i = 0; i < block; i++) {                                              \
                const int32_t c = codes[i];                                                \
                v[i] = (EXPR);                                                             \
            }                                                                              \
        }                                                                                  \
    } while (0)

/* A 4-bit block from its 16-entry value table: element j (j < B/2) is the low nibble of
 * byte j, element j + B/2 its high nibble. Output float32 (dtype 0) or bfloat16 (1). */
static void dequant4_lookup(const uint8_t *src, int block, const float *tab, int dtype,
                            uint8_t *dst) {
    const int h = block / 2;
    uint16_t tab16[16];
    for (int c = 0; c < 16; c++) tab16[c] = bf16_rne(tab[c]);
#if defined(__AVX2__)
    if (h % 32 == 0) {
        const __m256i lowmask = _mm256_set1_epi8(0x0F);
        if (dtype == 1) {
            uint8_t lo[16], hi[16];
            for (int c = 0; c < 16; c++) {
                lo[c] = (uint8_t)(tab16[c] & 0xFF);
                hi[c] = (uint8_t)(tab16[c] >> 8);
            }
            const __m256i tlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)lo));
            const __m256i thi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)hi));
            uint16_t *out = (uint16_t *)dst;
            for (int j = 0; j < h; j += 32) {
                __m256i bytes = _mm256_loadu_si256((const __m256i *)(src + j));
                __m256i nib[2] = {_mm256_and_si256(bytes, lowmask),
                                  _mm256_and_si256(_mm256_srli_epi16(bytes, 4), lowmask)};
                for (int k = 0; k < 2; k++) {
                    __m256i l = _mm256_shuffle_epi8(tlo, nib[k]);
                    __m256i u = _mm256_shuffle_epi8(thi, nib[k]);
                    __m256i a = _mm256_unpacklo_epi8(l, u); /* elements 0-7 | 16-23 */
                    __m256i b = _mm256_unpackhi_epi8(l, u); /* elements 8-15 | 24-31 */
                    uint16_t *o = out + j + k * h;
                    _mm256_storeu_si256((__m256i *)o, _mm256_permute2x128_si256(a, b, 0x20));
                    _mm256_storeu_si256((__m256i *)(o + 16), _mm256_permute2x128_si256(a, b, 0x31));
                }
            }
        } else {
            const __m256 t0 = _mm256_loadu_ps(tab), t1 = _mm256_loadu_ps(tab + 8);
            float *out = (float *)dst;
            for (int j = 0; j < h; j += 8) {
                __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(src + j)));
                __m256i nib[2] = {_mm256_and_si256(bytes, _mm256_set1_epi32(15)),
                                  _mm256_srli_epi32(bytes, 4)};
                for (int k = 0; k < 2; k++) {
                    __m256 a = _mm256_permutevar8x32_ps(t0, nib[k]);
                    __m256 b = _mm256_permutevar8x32_ps(t1, nib[k]);
                    __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(nib[k], 28));
                    _mm256_storeu_ps(out + j + k * h, _mm256_blendv_ps(a, b, sel));
                }
            }
        }
        return;
    }
#endif
    if (dtype == 1) {
        uint16_t *out = (uint16_t *)dst;
        for (int j = 0; j < h; j++) {
            out[j] = tab16[src[j] & 15];
            out[j + h] = tab16[src[j] >> 4];
        }
    } else {
        float *out = (float *)dst;
        for (int j = 0; j < h; j++) {
            out[j] = tab[src[j] & 15];
            out[j + h] = tab[src[j] >> 4];
        }
    }
}

int agoq_dequantize(const uint8_t *payload, int64_t p_stride, const void *scales,
                    int64_t s_stride, int bf16_scale, void *out, int dtype, int64_t rows,
                    int64_t row_elems, int bits, int fmt, int block, const float *lut,
                    float fmax, int nthreads) {
    if (block > MAX_BLOCK || block <= 0) return 1;
    const int64_t nb = (row_elems + block - 1) / block;
    const int64_t total = rows * nb;
    const int64_t bbytes = (int64_t)block * bits / 8;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < total; t++) {
        float v[MAX_BLOCK];
        int64_t r = t / nb, b = t % nb;
        const uint8_t *src = payload + r * p_stride + b * bbytes;
        float s;
        if (bf16_scale) {
            uint16_t h = ((const uint16_t *)scales)[r * s_stride + b];
            s = bits2f((uint32_t)h << 16);
        } else {
            s = ((const float *)scales)[r * s_stride + b];
        }
        const float half = (float)(1 << (bits - 1));
        int64_t start = b * block;
        int64_t count = row_elems - start < block ? row_elems - start : block;
        int64_t o = r * row_elems + start;
        if (bits == 4 && count == block && dtype != 2) {
            /* 16 codes: the block's 16 output values, computed by the same scalar math as
             * below, then looked up (with byte shuffles under AVX2). */
            float tab[16];
            for (int c = 0; c < 16; c++) {
                float a = (fmt == 0 ? ((float)c - half) : dec_fp4(c)) * s;
                a = a > fmax ? fmax : a;
                tab[c] = a < -fmax ? -fmax : a;
            }
            dequant4_lookup(src, block, tab, dtype, (uint8_t *)out + o * (dtype == 0 ? 4 : 2));
            continue;
        }
        if (fmt == 0) {
            DECODE(((float)c - half) * s);
        } else if (fmt == 1) {
            DECODE(dec_fp4(c) * s);
        } else {
            DECODE(lut[c] * s);
        }
        /* Saturate (a scale rounded up can push the top code one ulp past the range);
         * the comparisons keep NaN. */
        for (int i = 0; i < block; i++) {
            float a = v[i];
            a = a > fmax ? fmax : a;
            v[i] = a < -fmax ? -fmax : a;
        }
        if (dtype == 0) {
            memcpy((float *)out + o, v, (size_t)count * 4);
        } else if (dtype == 1) {
            uint16_t *dst = (uint16_t *)out + o;
            for (int64_t i = 0; i < count; i++) dst[i] = bf16_rne(v[i]);
        } else {
            _Float16 *dst = (_Float16 *)out + o;
            for (int64_t i = 0; i < count; i++) dst[i] = (_Float16)v[i];
        }
    }
    return 0;
}
