/* Benettin renormalization of twin rows, CPU, one pass per call (see lyapunov/renorm.py for the
 * math).
 *
 * Compiled on first use by native.py with the system C compiler and called through ctypes: no
 * torch headers, so it builds in well under a second. The PyTorch node in renorm.py is the
 * reference (and the path on GPUs); tests compare the two and gradcheck this one.
 *
 * Layout: n state tensors, tensor j is row-major (B + K, W_j): B nominal rows, then K twin rows.
 * Twin k's partner is nominal row index[k] (index == NULL: row k). group_of[j] in [0, G) says
 * which norm tensor j shares. Per-row sums of squares accumulate in double.
 * differences != 0: the tensors hold the differences twin - partner themselves (B = 0, K rows),
 * so the partner is zero and no gradient goes to partner rows.
 */
#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#define PARTNER_ROW(j, k, W) \
    (differences ? NULL : states[j] + (index ? index[k] : (k)) * (W))

/* forward: diffs_j = twin_j - partner_j (saved, (K, W_j) each, concatenated), norms (G, K) floored
 * at tiny, total (K) = sqrt(sum_g norms^2), twin rows of outs_j (outs == states: in place) set
 * to partner + diff * target / norm. */
#define RENORM_FORWARD(NAME, T)                                                                   \
void NAME(int n, T **states, T **outs, const int64_t *widths, const int *group_of, int G,         \
          int64_t B, int64_t K, const int64_t *index, int differences, double target,             \
          double tiny, T *diffs, T *norms, T *total)                                              \
{                                                                                                 \
    for (int64_t k = 0; k < K; k++) {                                                             \
        double sq[G > 0 ? G : 1];                                                                 \
        for (int g = 0; g < G; g++) sq[g] = 0.0;                                                  \
        int64_t offset = 0;                                                                       \
        for (int j = 0; j < n; j++) {                                                             \
            int64_t W = widths[j];                                                                \
            const T *twin = states[j] + (B + k) * W, *partner = PARTNER_ROW(j, k, W);             \
            T *d = diffs + offset + k * W;                                                        \
            double acc = 0.0;                                                                     \
            if (partner) {                                                                        \
                _Pragma("omp simd reduction(+:acc)")                                              \
                for (int64_t i = 0; i < W; i++) {                                                 \
                    T v = twin[i] - partner[i];                                                   \
                    d[i] = v;                                                                     \
                    acc += (double)v * (double)v;                                                 \
                }                                                                                 \
            } else {                                                                              \
                _Pragma("omp simd reduction(+:acc)")                                              \
                for (int64_t i = 0; i < W; i++) {                                                 \
                    T v = twin[i];                                                                \
                    d[i] = v;                                                                     \
                    acc += (double)v * (double)v;                                                 \
                }                                                                                 \
            }                                                                                     \
            sq[group_of[j]] += acc;                                                               \
            offset += K * W;                                                                      \
        }                                                                                         \
        double all = 0.0;                                                                         \
        for (int g = 0; g < G; g++) {                                                             \
            T norm = (T)sqrt(sq[g]);                                                              \
            if (!(norm >= (T)tiny)) norm = (T)tiny;                                               \
            norms[g * K + k] = norm;                                                              \
            all += (double)norm * (double)norm;                                                   \
        }                                                                                         \
        total[k] = G == 1 ? norms[k] : (T)sqrt(all);                                              \
        offset = 0;                                                                               \
        for (int j = 0; j < n; j++) {                                                             \
            int64_t W = widths[j];                                                                \
            T scale = (T)(target / (double)norms[group_of[j] * K + k]);                           \
            T *twin = outs[j] + (B + k) * W;                                                      \
            const T *partner = PARTNER_ROW(j, k, W), *d = diffs + offset + k * W;                 \
            if (partner)                                                                          \
                for (int64_t i = 0; i < W; i++) twin[i] = partner[i] + d[i] * scale;              \
            else                                                                                  \
                for (int64_t i = 0; i < W; i++) twin[i] = d[i] * scale;                           \
            offset += K * W;                                                                      \
        }                                                                                         \
    }                                                                                             \
}

/* backward: grads_j (B + K, W_j) from the state gradients g_j (NULL: zero) and g_total (NULL:
 * zero). Twin rows: scale * G + coef * D with coef = (dL/dn) / n; partner rows: their own
 * gradient plus G - that (the partner enters the new twin directly and through D). */
#define RENORM_BACKWARD(NAME, T)                                                                  \
void NAME(int n, T **g_states, T **grads, const int64_t *widths, const int *group_of, int G,      \
          int64_t B, int64_t K, const int64_t *index, int differences, double target,             \
          const T *diffs, const T *norms, const T *total, const T *g_total)                       \
{                                                                                                 \
    for (int j = 0; j < n; j++) {                                                                 \
        size_t bytes = (size_t)(B * widths[j]) * sizeof(T);                                       \
        if (g_states[j]) memcpy(grads[j], g_states[j], bytes); else memset(grads[j], 0, bytes);   \
    }                                                                                             \
    for (int64_t k = 0; k < K; k++) {                                                             \
        double coef[G > 0 ? G : 1];                                                               \
        for (int g = 0; g < G; g++) {                                                             \
            double nk = norms[g * K + k];                                                         \
            coef[g] = !g_total ? 0.0 : G == 1 ? g_total[k] : g_total[k] * nk / total[k];          \
        }                                                                                         \
        int64_t offset = 0;                                                                       \
        for (int j = 0; j < n; j++) {  /* dL/dn through scale = target / n */                     \
            int64_t W = widths[j];                                                                \
            if (g_states[j]) {                                                                    \
                const T *Gt = g_states[j] + (B + k) * W, *d = diffs + offset + k * W;             \
                double dot = 0.0, nk = norms[group_of[j] * K + k];                                \
                _Pragma("omp simd reduction(+:dot)")                                              \
                for (int64_t i = 0; i < W; i++) dot += (double)Gt[i] * (double)d[i];              \
                coef[group_of[j]] -= dot * (target / nk) / nk;                                    \
            }                                                                                     \
            offset += K * W;                                                                      \
        }                                                                                         \
        for (int g = 0; g < G; g++) {  /* a zero divergence (n at its floor) passes no gradient */ \
            double c = coef[g] / (double)norms[g * K + k];                                        \
            coef[g] = isfinite(c) ? c : 0.0;                                                      \
        }                                                                                         \
        offset = 0;                                                                               \
        for (int j = 0; j < n; j++) {                                                             \
            int64_t W = widths[j];                                                                \
            T scale = (T)(target / (double)norms[group_of[j] * K + k]);                           \
            T c = (T)coef[group_of[j]];                                                           \
            const T *d = diffs + offset + k * W;                                                  \
            const T *Gt = g_states[j] ? g_states[j] + (B + k) * W : NULL;                         \
            T *twin = grads[j] + (B + k) * W;                                                     \
            T *partner = differences ? NULL : grads[j] + (index ? index[k] : k) * W;              \
            /* one branch-free loop per case, so that each vectorizes */                          \
            if (Gt && partner) {                                                                  \
                _Pragma("omp simd")                                                               \
                for (int64_t i = 0; i < W; i++) {                                                 \
                    T dd = scale * Gt[i] + c * d[i];                                              \
                    twin[i] = dd;                                                                 \
                    partner[i] += Gt[i] - dd;                                                     \
                }                                                                                 \
            } else if (Gt) {                                                                      \
                _Pragma("omp simd")                                                               \
                for (int64_t i = 0; i < W; i++) twin[i] = scale * Gt[i] + c * d[i];               \
            } else if (partner) {                                                                 \
                _Pragma("omp simd")                                                               \
                for (int64_t i = 0; i < W; i++) {                                                 \
                    twin[i] = c * d[i];                                                           \
                    partner[i] -= c * d[i];                                                       \
                }                                                                                 \
            } else {                                                                              \
                _Pragma("omp simd")                                                               \
                for (int64_t i = 0; i < W; i++) twin[i] = c * d[i];                               \
            }                                                                                     \
            offset += K * W;                                                                      \
        }                                                                                         \
    }                                                                                             \
}

RENORM_FORWARD(renorm_forward_f32, float)
RENORM_FORWARD(renorm_forward_f64, double)
RENORM_BACKWARD(renorm_backward_f32, float)
RENORM_BACKWARD(renorm_backward_f64, double)
