/* One step of the twins of an LIF layer carried as differences, CPU, one pass per direction
 * (see twin_differences.py, class _LeakyDifference, for the formulas). The surrogate is the
 * fast sigmoid, derivative 1 / (1 + slope |u|)^2. Each call handles the elements [start, stop)
 * of the (K, row) twin arrays; the nominal membranes have B rows, and twin row r's partner is
 * row index[r] (index NULL: row r). Arrays are contiguous; NULL arrays are zero / not wanted.
 * flipped[r] (K bytes, zeroed by the caller) is set to 1 where a spike of twin row r differs. */
#include <math.h>
#include <stdint.h>

#define LEAKY_FORWARD(NAME, T)                                                                    \
void NAME(int64_t start, int64_t stop, int64_t row, const int64_t *restrict index,              \
          const T *restrict mem_prev, const T *restrict mem, const T *restrict delta,             \
          const T *restrict current, double beta, double thr, double factor,                      \
          T *restrict new_delta, T *restrict spike_delta, T *restrict partner_out,                \
          int8_t *restrict flipped)                                                               \
{                                                                                                 \
    const T b = (T)beta, th = (T)thr, f = (T)factor;                                             \
    for (int64_t i = start; i < stop;) {                                                          \
        const int64_t r = i / row, end = (r + 1) * row < stop ? (r + 1) * row : stop;            \
        /* the partner of twin element i is element i + shift of the nominal arrays */          \
        const int64_t shift = ((index ? index[r] : r) - r) * row;                                 \
        const T *restrict prev = mem_prev + shift, *restrict now = mem + shift;                   \
        int any = 0;                                                                              \
        for (; i < end; i++) {                                                                    \
            T pp = prev[i];                                                                       \
            T reset = (T)(pp + delta[i] > th) - (T)(pp > th);                                     \
            T nw = b * delta[i] - reset * th;                                                     \
            if (current) nw += current[i];                                                        \
            T up = now[i] - th;                                                                   \
            T ut = up + nw;                                                                       \
            int differ = (ut > 0) != (up > 0);                                                    \
            new_delta[i] = nw;                                                                    \
            spike_delta[i] = (T)((ut > 0) - (up > 0)) * f;                                        \
            partner_out[i] = now[i];                                                              \
            any |= differ;                                                                        \
        }                                                                                         \
        /* rows are never split between calls (native.call_elementwise's align) */              \
        if (flipped && any) flipped[r] = 1;                                                       \
    }                                                                                             \
}

#define LEAKY_BACKWARD(NAME, T)                                                                   \
void NAME(int64_t start, int64_t stop, const T *restrict partner, const T *restrict new_delta,  \
          const T *restrict g_new, const T *restrict g_spike, double beta, double thr,            \
          double factor, double slope, T *restrict g_delta, T *restrict g_current,                \
          T *restrict g_partner)                                                                  \
{                                                                                                 \
    const T b = (T)beta, th = (T)thr, f = (T)factor, s = (T)slope;                               \
    for (int64_t i = start; i < stop; i++) {                                                      \
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
