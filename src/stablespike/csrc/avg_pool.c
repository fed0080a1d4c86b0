/* Backward of a 2x2 average pooling with stride 2 and no padding, CPU: each input element gets a
 * quarter of its window's output gradient (PyTorch's avg_pool2d_backward ran ~2.5x slower on
 * the twins' small tensors). g: (planes, H / 2, W / 2), out: (planes, H, W), contiguous; an odd
 * last row or column belongs to no window and gets zero. */
#include <stdint.h>

#define AVG_POOL_BACKWARD(NAME, T)                                                                \
void NAME(int64_t planes, int64_t H, int64_t W, const T *restrict g, T *restrict out)            \
{                                                                                                 \
    const int64_t Ho = H / 2, Wo = W / 2;                                                         \
    for (int64_t p = 0; p < planes; p++) {                                                        \
        for (int64_t y = 0; y < H; y++) {                                                         \
            T *restrict row = out + (p * H + y) * W;                                              \
            const T *restrict grow = g + (p * Ho + y / 2) * Wo;                                   \
            if (y >= 2 * Ho) {                                                                    \
                for (int64_t x = 0; x < W; x++) row[x] = 0;                                       \
                continue;                                                                         \
            }                                                                                     \
            for (int64_t x = 0; x < Wo; x++) {                                                    \
                T v = (T)0.25 * grow[x];                                                          \
                row[2 * x] = v;                                                                   \
                row[2 * x + 1] = v;                                                               \
            }                                                                                     \
            if (W > 2 * Wo) row[W - 1] = 0;                                                       \
        }                                                                                         \
    }                                                                                             \
}

AVG_POOL_BACKWARD(avg_pool2x2_backward_f32, float)
AVG_POOL_BACKWARD(avg_pool2x2_backward_f64, double)
