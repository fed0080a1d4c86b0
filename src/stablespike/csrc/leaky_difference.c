/* One step of the twins of an LIF layer carried as differences, CPU, one pass per direction
 * (see twin_differences.py, class _LeakyDifference, for the formulas). The surrogate is the
 * fast sigmoid, derivative 1 / (1 + slope |u|)^2. Arrays are contiguous, n elements each; the
 * partner membranes are already gathered into twin order. NULL arrays are zero / not wanted. */
#include <math.h>
#include <stdint.h>

#define LEAKY_FORWARD(NAME, T)                                                                    \
void NAME(int64_t n, const T *restrict partner_prev, const T *restrict partner,                 \
          const T *restrict delta, const T *restrict current, double beta, double thr,           \
          double factor, T *restrict new_delta, T *restrict spike_delta)                          \
{                                                                                                 \
    const T b = (T)beta, th = (T)thr, f = (T)factor;                                             \
    for (int64_t i = 0; i < n; i++) {                                                             \
        T pp = partner_prev[i];                                                                   \
        T reset = (T)(pp + delta[i] > th) - (T)(pp > th);                                         \
        T nw = b * delta[i] - reset * th;                                                         \
        if (current) nw += current[i];                                                            \
        T up = partner[i] - th;                                                                   \
        T ut = up + nw;                                                                           \
        new_delta[i] = nw;                                                                        \
        spike_delta[i] = ((T)(ut > 0) - (T)(up > 0)) * f;                                         \
    }                                                                                             \
}

#define LEAKY_BACKWARD(NAME, T)                                                                   \
void NAME(int64_t n, const T *restrict partner, const T *restrict new_delta,                     \
          const T *restrict g_new, const T *restrict g_spike, double beta, double thr,            \
          double factor, double slope, T *restrict g_delta, T *restrict g_current,                \
          T *restrict g_partner)                                                                  \
{                                                                                                 \
    const T b = (T)beta, th = (T)thr, f = (T)factor, s = (T)slope;                               \
    for (int64_t i = 0; i < n; i++) {                                                             \
        T gn = g_new ? g_new[i] : (T)0;                                                           \
        T gp = 0;                                                                                 \
        if (g_spike) {                                                                            \
            T up = partner[i] - th;                                                               \
            T ut = up + new_delta[i];                                                             \
            T dt = (T)1 + s * (ut < 0 ? -ut : ut), dp = (T)1 + s * (up < 0 ? -up : up);           \
            T gs = g_spike[i] * f;                                                                \
            T through_twin = gs / (dt * dt);                                                      \
            gn += through_twin;                                                                   \
            gp = through_twin - gs / (dp * dp);                                                   \
        }                                                                                         \
        g_delta[i] = b * gn;                                                                      \
        if (g_current) g_current[i] = gn;                                                         \
        g_partner[i] = gp;                                                                        \
    }                                                                                             \
}

LEAKY_FORWARD(leaky_difference_forward_f32, float)
LEAKY_FORWARD(leaky_difference_forward_f64, double)
LEAKY_BACKWARD(leaky_difference_backward_f32, float)
LEAKY_BACKWARD(leaky_difference_backward_f64, double)
