/*
 * reference/mnist_cnn.c: the pipeline's default convnet in plain C11, written to be read.
 *
 *     28x28x1 -> Conv 5x5 32 -> MaxPool 2 -> BatchNorm -> ReLU        (24x24 -> 12x12x32)
 *             -> Conv 5x5 64 -> MaxPool 2 -> BatchNorm -> ReLU        ( 8x8  ->  4x4x64)
 *             -> Conv 3x3 128, padded ("same") -> BatchNorm -> ReLU   (          4x4x128)
 *             -> Flatten (2,048) -> Dropout 0.3 -> Dense 10 softmax
 *
 * The fast program is ../mnist_cnn.c (a register-tiled matrix-product kernel, im2col,
 * packing, per-layer timers); this one is the same program with the speed taken out, and the
 * fast one is tested against it. Both have the same commands, flags, defaults, files, error
 * lines, random numbers, math and output lines (../mnist_cnn.c's header describes them); here
 * each kind of layer is one forward and one backward function of plain loops, for any shape,
 * and the story reads top to bottom: parameters, layers, the model, training, commands.
 *
 * Build (with or without -fopenmp: the model file has the same bits for any --threads):
 *     cc -std=c11 -O3 -march=native -ffp-contract=fast -fopenmp -I stages/frameworks/c \
 *        -o mnist_cnn_ref stages/frameworks/c/reference/mnist_cnn.c -lm
 * Run:
 *     mnist_cnn_ref train --images X.idx --labels Y.idx [--val-images VX.idx
 *                         --val-labels VY.idx] --out MODEL.bin [--epochs 24]
 *                         [--batch-size 128] [--learning-rate 0.002]
 *                         [--schedule constant|cosine (cosine)] [--label-smoothing 0.1]
 *                         [--rotation 10] [--shift 0.1] [--zoom 0.1] [--restore-best 0|1 (0)]
 *                         [--ema 0] [--seed 42] [--threads 1]
 *     mnist_cnn_ref predict --model MODEL.bin --images X.idx --out P.idx [--threads 1]
 *     mnist_cnn_ref grad --model MODEL.bin --images X.idx --labels Y.idx --out G.bin
 *                        --mask M.idx [--seed 42] [--label-smoothing 0] [--threads 1]
 *
 * Layout: activations are NHWC ([image][row][column][channel]), kernels HWIO
 * ([row][column][in][out]), the dense kernel [2048][10].
 * Threads: each parallel loop gives every output element to one thread (an image, a row of a
 * kernel's gradient, a channel of BatchNorm, a parameter), and every sum runs in an order
 * that the shapes alone decide, so no bit depends on --threads or on OpenMP. (No innermost
 * loop sums products into one scalar: GCC may vectorise such a loop in order but unfused,
 * and then only where OpenMP outlined it; products accumulate into arrays instead.)
 */
#define PROGRAM "mnist_cnn"
#include "mnist.h"
#include <stddef.h>

enum { C1 = 32, C2 = 64, C3 = 128, FEATURES = 4 * 4 * C3 }; /* channels; 2,048 features */
enum { MAX_CNN_BATCH = 2048, EVAL_BATCH = 256 };
static const float DROPOUT = 0.3f, BN_EPSILON = 1e-3f, BN_MOMENTUM = 0.99f;

static int min_int(int a, int b) { return a < b ? a : b; }

/* ---------------------------------------------------------------------------------------- */
/* The parameters, in the model file's order (gradients and Adam's moments share it)          */

typedef struct {
    float conv1[5 * 5 * 1 * C1], bn1[4][C1]; /* bn: gamma, beta, moving mean, moving variance */
    float conv2[5 * 5 * C1 * C2], bn2[4][C2];
    float conv3[3 * 3 * C2 * C3], bn3[4][C3];
    float dense[FEATURES * CLASSES], dense_bias[CLASSES];
} Params;
enum { GAMMA, BETA, MEAN, VAR };
enum { PARAM_COUNT = sizeof(Params) / sizeof(float) };                   /* 147,114 */
enum { MODEL_HEADER = 28, MODEL_BYTES = MODEL_HEADER + 4 * PARAM_COUNT }; /* 588,484 */

static float *flat(Params *p) { return (float *)p; }

/* What Adam trains: every array but BatchNorm's moving statistics (gamma and beta are
   adjacent rows), as [offset, offset + length) of the flat parameters. */
#define AT(member) (offsetof(Params, member) / sizeof(float))
static const struct { size_t offset; int length; } TRAINABLE[] = {
    {AT(conv1), 25 * C1},     {AT(bn1), 2 * C1}, {AT(conv2), 25 * C1 * C2}, {AT(bn2), 2 * C2},
    {AT(conv3), 9 * C2 * C3}, {AT(bn3), 2 * C3}, {AT(dense), FEATURES * CLASSES},
    {AT(dense_bias), CLASSES}};
enum { TRAINABLE_ARRAYS = sizeof TRAINABLE / sizeof TRAINABLE[0] };

/* Glorot-uniform limit of a kernel with `window` inputs per output and `in`/`out` channels. */
static double glorot(int window, int in, int out) { return sqrt(6.0 / (window * (in + out))); }

/* Keras' initialisation; each kernel weight drawn from the INIT stream with its index in the
   model file as the counter. */
static void init_params(Params *p, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    uint64_t key = stream_key(seed, STREAM_INIT);
    struct { float *w; int n; double limit; } kernels[] = {
        {p->conv1, 25 * C1, glorot(25, 1, C1)}, {p->conv2, 25 * C1 * C2, glorot(25, C1, C2)},
        {p->conv3, 9 * C2 * C3, glorot(9, C2, C3)},
        {p->dense, FEATURES * CLASSES, glorot(1, FEATURES, CLASSES)}};
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < kernels[k].n; i++) {
            uint64_t index = (uint64_t)(kernels[k].w + i - flat(p));
            kernels[k].w[i] = (float)((2.0 * uniform01(random_bits(key, index)) - 1.0) *
                                      kernels[k].limit);
        }
    for (int c = 0; c < C1; c++) p->bn1[GAMMA][c] = p->bn1[VAR][c] = 1.0f;
    for (int c = 0; c < C2; c++) p->bn2[GAMMA][c] = p->bn2[VAR][c] = 1.0f;
    for (int c = 0; c < C3; c++) p->bn3[GAMMA][c] = p->bn3[VAR][c] = 1.0f;
}

/* "MNISTCNN", uint32 version 1, 32, 64, 128, 10, then the floats; all little-endian. */
static int save_params(const char *path, Params *p)
{
    unsigned char *bytes = allocate(MODEL_BYTES, 1);
    memcpy(bytes, "MNISTCNN", 8);
    uint32_t header[5] = {1, C1, C2, C3, CLASSES};
    for (int i = 0; i < 5; i++)
        put_32(bytes + 8 + 4 * i, header[i], 0);
    for (int i = 0; i < PARAM_COUNT; i++)
        put_32(bytes + MODEL_HEADER + 4 * i, float_bits(flat(p)[i]), 0);
    int ok = write_file(path, bytes, MODEL_BYTES);
    free(bytes);
    return ok;
}

static void load_params(const char *path, Params *p)
{
    long size;
    FILE *f = open_input(path, &size);
    if (size != MODEL_BYTES)
        fail("%s: %ld bytes; a model file of this program has %d", path, size, MODEL_BYTES);
    unsigned char *bytes = allocate(MODEL_BYTES, 1);
    read_exact(f, bytes, MODEL_BYTES, path);
    fclose(f);
    if (memcmp(bytes, "MNISTCNN", 8) != 0)
        fail("%s: not a model file of this program (no MNISTCNN header)", path);
    uint32_t expected[5] = {1, C1, C2, C3, CLASSES};
    for (int i = 0; i < 5; i++)
        if (get_le32(bytes + 8 + 4 * i) != expected[i])
            fail("%s: header field %d is %lu, expected %lu (version 1, 32, 64, 128, 10)", path,
                 i, (unsigned long)get_le32(bytes + 8 + 4 * i), (unsigned long)expected[i]);
    for (int i = 0; i < PARAM_COUNT; i++)
        if (!isfinite(flat(p)[i] = bits_float(get_le32(bytes + MODEL_HEADER + 4 * i))))
            fail("%s: parameter %d is not a finite number", path, i);
    float *vars[3] = {p->bn1[VAR], p->bn2[VAR], p->bn3[VAR]};
    int widths[3] = {C1, C2, C3};
    for (int l = 0; l < 3; l++)
        for (int c = 0; c < widths[l]; c++)
            if (vars[l][c] < 0)
                fail("%s: BatchNorm %d's moving variance is negative", path, l + 1);
    free(bytes);
}

/* ---------------------------------------------------------------------------------------- */
/* The layers, each a forward and a backward pass over a batch of `images`                   */

/* Where pixel (y, x) of image b of a side x side x channels map starts. */
static size_t at(int b, int y, int x, int side, int channels)
{
    return (((size_t)b * side + y) * side + x) * channels;
}

/* Convolution, stride 1, no bias: a side x side x in map, a k x k x in x out kernel, `pad`
   zeros around (0: "valid", (k - 1) / 2: "same"). Each output sums its window in the
   kernel's order (row, column, input channel). */
static void conv2d_forward(float *out, const float *x, const float *w, int images, int side,
                           int in, int out_channels, int k, int pad)
{
    int out_side = side + 2 * pad - k + 1;
#pragma omp parallel for
    for (int b = 0; b < images; b++)
        for (int oy = 0; oy < out_side; oy++)
            for (int ox = 0; ox < out_side; ox++) {
                float *o = out + at(b, oy, ox, out_side, out_channels);
                for (int co = 0; co < out_channels; co++)
                    o[co] = 0.0f;
                for (int dy = 0; dy < k; dy++)
                    for (int dx = 0; dx < k; dx++) {
                        int iy = oy + dy - pad, ix = ox + dx - pad;
                        if (iy < 0 || iy >= side || ix < 0 || ix >= side)
                            continue; /* the zero padding adds nothing */
                        const float *xp = x + at(b, iy, ix, side, in);
                        const float *wp = w + (size_t)(dy * k + dx) * in * out_channels;
                        for (int ci = 0; ci < in; ci++)
                            for (int co = 0; co < out_channels; co++)
                                o[co] += xp[ci] * wp[ci * out_channels + co];
                    }
            }
}

/* dw: the kernel's gradient, one thread per kernel row (dy, dx, ci), each weight summing
   over the images in order. dx (NULL: not wanted): the input's, each output position's
   gradient sent back through the kernel into its window, positions in order. */
static void conv2d_backward(float *dx, float *dw, const float *dout, const float *x,
                            const float *w, int images, int side, int in, int out_channels,
                            int k, int pad)
{
    int out_side = side + 2 * pad - k + 1;
#pragma omp parallel for
    for (int row = 0; row < k * k * in; row++) {
        int dy = row / (k * in), dxk = row / in % k, ci = row % in;
        float *g = dw + (size_t)row * out_channels;
        for (int co = 0; co < out_channels; co++)
            g[co] = 0.0f;
        for (int b = 0; b < images; b++)
            for (int oy = 0; oy < out_side; oy++)
                for (int ox = 0; ox < out_side; ox++) {
                    int iy = oy + dy - pad, ix = ox + dxk - pad;
                    if (iy < 0 || iy >= side || ix < 0 || ix >= side)
                        continue;
                    float xv = x[at(b, iy, ix, side, in) + ci];
                    const float *d = dout + at(b, oy, ox, out_side, out_channels);
                    for (int co = 0; co < out_channels; co++)
                        g[co] += xv * d[co];
                }
    }
    if (!dx)
        return;
#pragma omp parallel for
    for (int b = 0; b < images; b++) {
        for (size_t i = at(b, 0, 0, side, in); i < at(b + 1, 0, 0, side, in); i++)
            dx[i] = 0.0f;
        for (int oy = 0; oy < out_side; oy++)
            for (int ox = 0; ox < out_side; ox++)
                for (int dy = 0; dy < k; dy++)
                    for (int dxk = 0; dxk < k; dxk++) {
                        int iy = oy + dy - pad, ix = ox + dxk - pad;
                        if (iy < 0 || iy >= side || ix < 0 || ix >= side)
                            continue;
                        const float *d = dout + at(b, oy, ox, out_side, out_channels);
                        const float *wp = w + (size_t)(dy * k + dxk) * in * out_channels;
                        float *g = dx + at(b, iy, ix, side, in);
                        for (int co = 0; co < out_channels; co++)
                            for (int ci = 0; ci < in; ci++)
                                g[ci] += d[co] * wp[ci * out_channels + co];
                    }
    }
}

/* 2x2 max-pooling, stride 2. `winner` keeps which of the window's four inputs won (0 top
   left, 1 top right, 2 bottom left, 3 bottom right; on a tie the first), for the backward
   pass, which routes the gradient to it alone. */
static void maxpool_forward(float *out, uint8_t *winner, const float *x, int images, int side,
                            int channels)
{
    int half = side / 2;
#pragma omp parallel for
    for (int b = 0; b < images; b++)
        for (int oy = 0; oy < half; oy++)
            for (int ox = 0; ox < half; ox++)
                for (int c = 0; c < channels; c++) {
                    size_t o = at(b, oy, ox, half, channels) + c;
                    for (int q = 0; q < 4; q++) {
                        float v = x[at(b, 2 * oy + q / 2, 2 * ox + q % 2, side, channels) + c];
                        if (q == 0 || v > out[o])
                            out[o] = v, winner[o] = (uint8_t)q;
                    }
                }
}

static void maxpool_backward(float *dx, const float *dout, const uint8_t *winner, int images,
                             int side, int channels)
{
    int half = side / 2;
#pragma omp parallel for
    for (int b = 0; b < images; b++)
        for (int oy = 0; oy < half; oy++)
            for (int ox = 0; ox < half; ox++)
                for (int q = 0; q < 4; q++) /* every input is in one window */
                    for (int c = 0; c < channels; c++) {
                        size_t o = at(b, oy, ox, half, channels) + c;
                        dx[at(b, 2 * oy + q / 2, 2 * ox + q % 2, side, channels) + c] =
                            winner[o] == q ? dout[o] : 0.0f;
                    }
}

/* BatchNorm over `rows` (images x positions) of `channels`. Training: mean and var are
   outputs, the batch's mean and biased variance (summed in double, one thread per channel,
   rows in order), and x-hat is kept for the backward pass. Inference: mean and var are the
   moving statistics, and the output is Keras' x scale + (beta - mean scale). */
static void batchnorm_forward(float *out, float *xhat, float *mean, float *var, const float *x,
                              const float *gamma, const float *beta, int rows, int channels,
                              int training)
{
    if (training) {
#pragma omp parallel for
        for (int c = 0; c < channels; c++) {
            double sum = 0.0, squares = 0.0;
            for (int r = 0; r < rows; r++)
                sum += x[(size_t)r * channels + c];
            mean[c] = (float)(sum / rows);
            for (int r = 0; r < rows; r++) {
                double d = x[(size_t)r * channels + c] - mean[c];
                squares += d * d;
            }
            var[c] = (float)(squares / rows);
        }
    }
#pragma omp parallel for
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < channels; c++) {
            size_t i = (size_t)r * channels + c;
            float inv_std = 1.0f / sqrtf(var[c] + BN_EPSILON);
            if (training) {
                xhat[i] = (x[i] - mean[c]) * inv_std;
                out[i] = xhat[i] * gamma[c] + beta[c];
            } else {
                float scale = inv_std * gamma[c], shift = beta[c] - mean[c] * scale;
                out[i] = x[i] * scale + shift;
            }
        }
}

/* With N rows: dgamma = sum(dout x-hat), dbeta = sum(dout), and
   dx = gamma / sqrt(var + eps) (dout - sum(dout) / N - x-hat sum(dout x-hat) / N),
   var the batch's variance. One thread per channel. */
static void batchnorm_backward(float *dx, float *dgamma, float *dbeta, const float *dout,
                               const float *xhat, const float *gamma, const float *var,
                               int rows, int channels)
{
#pragma omp parallel for
    for (int c = 0; c < channels; c++) {
        double sum_d = 0.0, sum_d_xhat = 0.0;
        for (int r = 0; r < rows; r++) {
            size_t i = (size_t)r * channels + c;
            sum_d += dout[i];
            sum_d_xhat += (double)dout[i] * xhat[i];
        }
        dgamma[c] = (float)sum_d_xhat, dbeta[c] = (float)sum_d;
        float inv_std = 1.0f / sqrtf(var[c] + BN_EPSILON), k = gamma[c] * inv_std;
        float mean_d = (float)(sum_d / rows), mean_d_xhat = (float)(sum_d_xhat / rows);
        for (int r = 0; r < rows; r++) {
            size_t i = (size_t)r * channels + c;
            dx[i] = k * (dout[i] - mean_d - xhat[i] * mean_d_xhat);
        }
    }
}

/* After a training step: moving = 0.99 moving + 0.01 batch, for the `channels` means and
   the `channels` variances after them (the model file's adjacent MEAN and VAR rows). */
static void batchnorm_update_moving(float *moving, const float *batch, int channels)
{
    for (int i = 0; i < 2 * channels; i++)
        moving[i] = moving[i] * BN_MOMENTUM + batch[i] * (1.0f - BN_MOMENTUM);
}

static void relu_forward(float *out, const float *x, size_t n)
{
#pragma omp parallel for
    for (size_t i = 0; i < n; i++)
        out[i] = x[i] > 0.0f ? x[i] : 0.0f;
}

/* Through where the output was positive. */
static void relu_backward(float *dx, const float *dout, const float *out, size_t n)
{
#pragma omp parallel for
    for (size_t i = 0; i < n; i++)
        dx[i] = out[i] > 0.0f ? dout[i] : 0.0f;
}

/* Inverted dropout: unit u of image b is kept when u01(DROPOUT stream, draw * units + u)
   >= 0.3, draw = first_draw + b; kept units are scaled by 1/0.7. */
static void dropout_forward(float *out, uint8_t *mask, const float *x, int images, int units,
                            uint64_t key, uint64_t first_draw)
{
    const float scale = 1.0f / (1.0f - DROPOUT);
#pragma omp parallel for
    for (int b = 0; b < images; b++)
        for (int u = 0; u < units; u++) {
            size_t i = (size_t)b * units + u;
            uint64_t draw = first_draw + (uint64_t)b;
            mask[i] = uniform01(random_bits(key, draw * (uint64_t)units + (uint64_t)u)) >= DROPOUT;
            out[i] = mask[i] ? x[i] * scale : 0.0f;
        }
}

static void dropout_backward(float *dx, const float *dout, const uint8_t *mask, size_t n)
{
    const float scale = 1.0f / (1.0f - DROPOUT);
#pragma omp parallel for
    for (size_t i = 0; i < n; i++)
        dx[i] = mask[i] ? dout[i] * scale : 0.0f;
}

/* out[b] = bias + x[b] W, W [in][out_n]. */
static void dense_forward(float *out, const float *x, const float *w, const float *bias,
                          int images, int in, int out_n)
{
#pragma omp parallel for
    for (int b = 0; b < images; b++) {
        float *o = out + (size_t)b * out_n;
        for (int j = 0; j < out_n; j++)
            o[j] = bias[j];
        for (int u = 0; u < in; u++)
            for (int j = 0; j < out_n; j++)
                o[j] += x[(size_t)b * in + u] * w[u * out_n + j];
    }
}

/* dW[u][j] = sum over images of x[b][u] dout[b][j] (a row u per thread), dbias = sum of
   dout, dx[b] = dout[b] W^T. */
static void dense_backward(float *dx, float *dw, float *dbias, const float *dout,
                           const float *x, const float *w, int images, int in, int out_n)
{
#pragma omp parallel for
    for (int u = 0; u < in; u++) {
        for (int j = 0; j < out_n; j++)
            dw[u * out_n + j] = 0.0f;
        for (int b = 0; b < images; b++)
            for (int j = 0; j < out_n; j++)
                dw[u * out_n + j] += x[(size_t)b * in + u] * dout[(size_t)b * out_n + j];
    }
    for (int j = 0; j < out_n; j++) {
        float sum = 0.0f;
        for (int b = 0; b < images; b++)
            sum += dout[(size_t)b * out_n + j];
        dbias[j] = sum;
    }
#pragma omp parallel for
    for (int b = 0; b < images; b++) {
        float *g = dx + (size_t)b * in;
        for (int u = 0; u < in; u++)
            g[u] = 0.0f;
        for (int j = 0; j < out_n; j++)
            for (int u = 0; u < in; u++)
                g[u] += dout[(size_t)b * out_n + j] * w[u * out_n + j];
    }
}

/* The target of class j: the one-hot label, smoothed towards the uniform distribution. */
static double target(int j, int label, double smoothing)
{
    return (j == label ? 1.0 - smoothing : 0.0) + smoothing / CLASSES;
}

/* Softmax probabilities of each image's logits (in double, shifted by the largest); with
   labels, each image's plain cross-entropy (loss) and its cross-entropy against the
   smoothed targets (objective, what is trained). */
static void softmax_crossentropy_forward(float *probs, double *loss, double *objective,
                                         const float *logits, const uint8_t *labels,
                                         int images, double smoothing)
{
#pragma omp parallel for
    for (int b = 0; b < images; b++) {
        const float *z = logits + (size_t)b * CLASSES;
        float max = z[0];
        for (int j = 1; j < CLASSES; j++)
            max = z[j] > max ? z[j] : max;
        double sum = 0.0;
        for (int j = 0; j < CLASSES; j++)
            sum += exp((double)z[j] - max);
        for (int j = 0; j < CLASSES; j++)
            probs[(size_t)b * CLASSES + j] = (float)(exp((double)z[j] - max) / sum);
        if (!labels)
            continue;
        double log_sum = log(sum), mean_loss = 0.0; /* -log p, of the label, of all classes */
        loss[b] = log_sum - ((double)z[labels[b]] - max);
        for (int j = 0; j < CLASSES; j++)
            mean_loss += log_sum - ((double)z[j] - max);
        objective[b] = (1.0 - smoothing) * loss[b] + smoothing * (mean_loss / CLASSES);
    }
}

/* The gradient of the batch's mean objective: (probabilities - targets) / images. */
static void softmax_crossentropy_backward(float *dlogits, const float *probs,
                                          const uint8_t *labels, int images, double smoothing)
{
    for (int b = 0; b < images; b++)
        for (int j = 0; j < CLASSES; j++) {
            size_t i = (size_t)b * CLASSES + j;
            dlogits[i] = (float)((probs[i] - target(j, labels[b], smoothing)) / images);
        }
}

/* Keras 3's Adam on one array, the step's size and constants from mnist.h's adam_step. */
static void adam_update(float *w, float *m, float *v, const float *g, int n, const AdamStep *s)
{
#pragma omp parallel for
    for (int i = 0; i < n; i++) {
        m[i] += (g[i] - m[i]) * s->one_minus_beta1;
        v[i] += (g[i] * g[i] - v[i]) * s->one_minus_beta2;
        w[i] -= s->lr_t * m[i] / (sqrtf(v[i]) + s->epsilon);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* The model: every activation of a batch and its gradient                                    */

typedef struct {
    float *x;                            /* the input images [B][28][28][1] */
    uint8_t *labels;                     /* [B] */
    float *z1, *p1, *xhat1, *y1, *a1;    /* conv1 24x24x32, pool 12x12x32, BatchNorm, ReLU */
    float *z2, *p2, *xhat2, *y2, *a2;    /* conv2 8x8x64, pool 4x4x64, BatchNorm, ReLU */
    float *z3, *xhat3, *y3, *a3;         /* conv3 4x4x128, BatchNorm, ReLU */
    uint8_t *winner1, *winner2, *mask;   /* the pools' winners, dropout's kept units */
    float *f, *logits, *probs;           /* dropout's output (the 2,048 features), dense */
    double *loss, *objective;            /* per image */
    Params *batch;                       /* BatchNorm's batch mean and variance (MEAN, VAR) */
    float *d_logits, *d_f, *d_a3, *d_y3, *d_z3, *d_a2, *d_y2, *d_p2, *d_z2, *d_a1, *d_y1,
        *d_p1, *d_z1;                    /* the gradients of the loss */
} Model;

static Model make_model(int capacity)
{
    Model m;
    size_t n = (size_t)capacity;
#define BUFFER(name, per_image) m.name = allocate(n * (per_image), sizeof *m.name)
    BUFFER(x, INPUTS), BUFFER(labels, 1);
    BUFFER(z1, 24 * 24 * C1), BUFFER(p1, 12 * 12 * C1), BUFFER(xhat1, 12 * 12 * C1);
    BUFFER(y1, 12 * 12 * C1), BUFFER(a1, 12 * 12 * C1), BUFFER(winner1, 12 * 12 * C1);
    BUFFER(z2, 8 * 8 * C2), BUFFER(p2, 4 * 4 * C2), BUFFER(xhat2, 4 * 4 * C2);
    BUFFER(y2, 4 * 4 * C2), BUFFER(a2, 4 * 4 * C2), BUFFER(winner2, 4 * 4 * C2);
    BUFFER(z3, FEATURES), BUFFER(xhat3, FEATURES), BUFFER(y3, FEATURES), BUFFER(a3, FEATURES);
    BUFFER(mask, FEATURES), BUFFER(f, FEATURES), BUFFER(logits, CLASSES);
    BUFFER(probs, CLASSES), BUFFER(loss, 1), BUFFER(objective, 1);
    BUFFER(d_logits, CLASSES), BUFFER(d_f, FEATURES), BUFFER(d_a3, FEATURES);
    BUFFER(d_y3, FEATURES), BUFFER(d_z3, FEATURES), BUFFER(d_a2, 4 * 4 * C2);
    BUFFER(d_y2, 4 * 4 * C2), BUFFER(d_p2, 4 * 4 * C2), BUFFER(d_z2, 8 * 8 * C2);
    BUFFER(d_a1, 12 * 12 * C1), BUFFER(d_y1, 12 * 12 * C1), BUFFER(d_p1, 12 * 12 * C1);
    BUFFER(d_z1, 24 * 24 * C1);
#undef BUFFER
    m.batch = allocate(1, sizeof(Params));
    memset(m.batch, 0, sizeof(Params));
    return m;
}

/* The forward pass of the B images in m->x, to the probabilities and (with labels) the
   losses. Training: BatchNorm on the batch's statistics (into m->batch), dropout drawn for
   draws first_draw.. first_draw + B - 1; inference: the moving statistics, no dropout. */
static void model_forward(Model *m, Params *p, int B, int training, const uint8_t *labels,
                          double smoothing, uint64_t dropout_key, uint64_t first_draw)
{
    Params *stats = training ? m->batch : p;
    conv2d_forward(m->z1, m->x, p->conv1, B, 28, 1, C1, 5, 0);
    maxpool_forward(m->p1, m->winner1, m->z1, B, 24, C1);
    batchnorm_forward(m->y1, m->xhat1, stats->bn1[MEAN], stats->bn1[VAR], m->p1,
                      p->bn1[GAMMA], p->bn1[BETA], B * 12 * 12, C1, training);
    relu_forward(m->a1, m->y1, (size_t)B * 12 * 12 * C1);

    conv2d_forward(m->z2, m->a1, p->conv2, B, 12, C1, C2, 5, 0);
    maxpool_forward(m->p2, m->winner2, m->z2, B, 8, C2);
    batchnorm_forward(m->y2, m->xhat2, stats->bn2[MEAN], stats->bn2[VAR], m->p2,
                      p->bn2[GAMMA], p->bn2[BETA], B * 4 * 4, C2, training);
    relu_forward(m->a2, m->y2, (size_t)B * 4 * 4 * C2);

    conv2d_forward(m->z3, m->a2, p->conv3, B, 4, C2, C3, 3, 1);
    batchnorm_forward(m->y3, m->xhat3, stats->bn3[MEAN], stats->bn3[VAR], m->z3,
                      p->bn3[GAMMA], p->bn3[BETA], B * 4 * 4, C3, training);
    relu_forward(m->a3, m->y3, (size_t)B * FEATURES);

    if (training)
        dropout_forward(m->f, m->mask, m->a3, B, FEATURES, dropout_key, first_draw);
    else
        memcpy(m->f, m->a3, sizeof(float) * B * FEATURES);
    dense_forward(m->logits, m->f, p->dense, p->dense_bias, B, FEATURES, CLASSES);
    softmax_crossentropy_forward(m->probs, m->loss, m->objective, m->logits, labels, B,
                                 smoothing);
}

/* The backward pass after a training forward pass: every trainable array's gradient into g
   (conv1's input needs none). */
static void model_backward(Model *m, Params *p, Params *g, int B, const uint8_t *labels,
                           double smoothing)
{
    softmax_crossentropy_backward(m->d_logits, m->probs, labels, B, smoothing);
    dense_backward(m->d_f, g->dense, g->dense_bias, m->d_logits, m->f, p->dense, B, FEATURES,
                   CLASSES);
    dropout_backward(m->d_a3, m->d_f, m->mask, (size_t)B * FEATURES);

    relu_backward(m->d_y3, m->d_a3, m->a3, (size_t)B * FEATURES);
    batchnorm_backward(m->d_z3, g->bn3[GAMMA], g->bn3[BETA], m->d_y3, m->xhat3, p->bn3[GAMMA],
                       m->batch->bn3[VAR], B * 4 * 4, C3);
    conv2d_backward(m->d_a2, g->conv3, m->d_z3, m->a2, p->conv3, B, 4, C2, C3, 3, 1);

    relu_backward(m->d_y2, m->d_a2, m->a2, (size_t)B * 4 * 4 * C2);
    batchnorm_backward(m->d_p2, g->bn2[GAMMA], g->bn2[BETA], m->d_y2, m->xhat2, p->bn2[GAMMA],
                       m->batch->bn2[VAR], B * 4 * 4, C2);
    maxpool_backward(m->d_z2, m->d_p2, m->winner2, B, 8, C2);
    conv2d_backward(m->d_a1, g->conv2, m->d_z2, m->a1, p->conv2, B, 12, C1, C2, 5, 0);

    relu_backward(m->d_y1, m->d_a1, m->a1, (size_t)B * 12 * 12 * C1);
    batchnorm_backward(m->d_p1, g->bn1[GAMMA], g->bn1[BETA], m->d_y1, m->xhat1, p->bn1[GAMMA],
                       m->batch->bn1[VAR], B * 12 * 12, C1);
    maxpool_backward(m->d_z1, m->d_p1, m->winner1, B, 24, C1);
    conv2d_backward(NULL, g->conv1, m->d_z1, m->x, p->conv1, B, 28, 1, C1, 5, 0);
}

/* ---------------------------------------------------------------------------------------- */
/* Training and evaluation                                                                    */

/* The images order[0..B-1] and their labels into the model; with `augment`, each warped by
   its draw's affine map (draw = first_draw + place in the batch). */
static void load_batch(Model *m, const float *pixels, const uint8_t *labels, const int *order,
                       int B, const Augment *augment, uint64_t augment_key, uint64_t first_draw)
{
#pragma omp parallel for
    for (int b = 0; b < B; b++) {
        const float *image = pixels + (size_t)order[b] * INPUTS;
        float *x = m->x + (size_t)b * INPUTS;
        if (augment) {
            float map[6];
            affine_map(augment, augment_key, first_draw + (uint64_t)b, map);
            for (int row = 0; row < SIDE; row++)
                for (int col = 0; col < SIDE; col++)
                    x[row * SIDE + col] = warp_pixel(image, map, col, row);
        } else {
            memcpy(x, image, sizeof(float) * INPUTS);
        }
        m->labels[b] = labels[order[b]];
    }
}

static int argmax(const float *v)
{
    int best = 0;
    for (int j = 1; j < CLASSES; j++)
        best = v[j] > v[best] ? j : best;
    return best;
}

/* After each step (decay 0: a copy): avg = decay avg + (1 - decay) p, every parameter. */
static void ema_update(Params *avg, Params *p, float decay)
{
    float *a = flat(avg), *w = flat(p);
#pragma omp parallel for
    for (int i = 0; i < PARAM_COUNT; i++)
        a[i] = decay * a[i] + (1.0f - decay) * w[i];
}

/* Inference on n images, EVAL_BATCH at a time: probabilities (if probs), the mean plain
   cross-entropy and accuracy (if labels). */
static void evaluate(Model *m, Params *p, const float *pixels, int n, const uint8_t *labels,
                     float *probs, double *loss_out, double *accuracy_out)
{
    double loss = 0.0, hits = 0.0;
    for (int first = 0; first < n; first += EVAL_BATCH) {
        int B = min_int(EVAL_BATCH, n - first);
        memcpy(m->x, pixels + (size_t)first * INPUTS, sizeof(float) * INPUTS * B);
        model_forward(m, p, B, 0, labels ? labels + first : NULL, 0.0, 0, 0);
        if (probs)
            memcpy(probs + (size_t)first * CLASSES, m->probs, sizeof(float) * CLASSES * B);
        for (int b = 0; labels && b < B; b++) /* in image order */
            loss += m->loss[b],
                hits += argmax(m->logits + (size_t)b * CLASSES) == labels[first + b];
    }
    if (labels)
        *loss_out = loss / n, *accuracy_out = hits / n;
}

/* Multiply-adds x 2 per image: the forward pass (conv1, conv2, conv3, dense), and a training
   image's forward and backward passes (weights and inputs; conv1 has no input gradient). */
static const double CONV1_MACS = 24.0 * 24 * 25 * C1;
static uint64_t forward_flops(void)
{
    return (uint64_t)(2 * (CONV1_MACS + 8.0 * 8 * 25 * C1 * C2 + 4.0 * 4 * 9 * C2 * C3 +
                           (double)FEATURES * CLASSES));
}
static uint64_t train_flops(void) { return 3 * forward_flops() - (uint64_t)(2 * CONV1_MACS); }
enum { ADAM_FLOPS = 12 }; /* per parameter and step */

static int max_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

static void train(const TrainOptions *o)
{
    int n, val_n = 0;
    float *pixels = load_images(o->images, &n), *val_pixels = NULL;
    uint8_t *labels = load_labels(o->labels, n, o->images), *val_labels = NULL;
    if (o->val_images) {
        val_pixels = load_images(o->val_images, &val_n);
        val_labels = load_labels(o->val_labels, val_n, o->val_images);
    }
    check_writable(o->out);

    const Augment *aug = &o->augment;
    int augmenting = aug->rotation > 0 || aug->shift > 0 || aug->zoom > 0;
    uint64_t dropout_key = stream_key(o->seed, STREAM_DROPOUT);
    uint64_t augment_key = stream_key(o->seed, STREAM_AUGMENT);
    Params *p = allocate(1, sizeof(Params)), *g = allocate(1, sizeof(Params));
    Params *adam_m = allocate(1, sizeof(Params)), *adam_v = allocate(1, sizeof(Params));
    Params *best = allocate(1, sizeof(Params));
    Params *average = o->ema > 0 ? allocate(1, sizeof(Params)) : NULL;
    Params *kept = average ? average : p; /* what is validated, restored and saved */
    init_params(p, o->seed);
    memset(g, 0, sizeof *g), memset(adam_m, 0, sizeof *adam_m), memset(adam_v, 0, sizeof *adam_v);
    Model m = make_model(o->batch_size > EVAL_BATCH ? o->batch_size : EVAL_BATCH);
    int *order = allocate((size_t)n, sizeof(int)), best_epoch = 0, trainable = 0;
    for (int a = 0; a < TRAINABLE_ARRAYS; a++)
        trainable += TRAINABLE[a].length;

    uint64_t steps_per_epoch = ((uint64_t)n + o->batch_size - 1) / o->batch_size;
    uint64_t total_steps = steps_per_epoch * o->epochs, step = 0, flops = 0;
    double best_accuracy = -1.0, start = seconds_now();
    for (int epoch = 0; epoch < o->epochs; epoch++) {
        double epoch_start = seconds_now(), loss_sum = 0.0, hits = 0.0;
        shuffle(order, n, o->seed, epoch);
        for (int first = 0; first < n; first += o->batch_size, step++) {
            int B = min_int(n - first, o->batch_size);
            uint64_t first_draw = step * (uint64_t)o->batch_size;
            load_batch(&m, pixels, labels, order + first, B, augmenting ? aug : NULL,
                       augment_key, first_draw);
            model_forward(&m, p, B, 1, m.labels, o->label_smoothing, dropout_key, first_draw);
            model_backward(&m, p, g, B, m.labels, o->label_smoothing);

            AdamStep s = adam_step(learning_rate_at(o->learning_rate, o->cosine, step,
                                                    total_steps), step);
            for (int a = 0; a < TRAINABLE_ARRAYS; a++) {
                size_t i = TRAINABLE[a].offset;
                adam_update(flat(p) + i, flat(adam_m) + i, flat(adam_v) + i, flat(g) + i,
                            TRAINABLE[a].length, &s);
            }
            batchnorm_update_moving(p->bn1[MEAN], m.batch->bn1[MEAN], C1);
            batchnorm_update_moving(p->bn2[MEAN], m.batch->bn2[MEAN], C2);
            batchnorm_update_moving(p->bn3[MEAN], m.batch->bn3[MEAN], C3);
            if (average)
                ema_update(average, p, step == 0 ? 0.0f : (float)o->ema);

            for (int b = 0; b < B; b++) /* in batch order */
                loss_sum += m.loss[b],
                    hits += argmax(m.logits + (size_t)b * CLASSES) == m.labels[b];
            flops += (uint64_t)B * train_flops() + (uint64_t)ADAM_FLOPS * trainable;
        }
        double val_loss = 0.0, val_accuracy = 0.0;
        if (val_pixels) {
            evaluate(&m, kept, val_pixels, val_n, val_labels, NULL, &val_loss, &val_accuracy);
            flops += (uint64_t)val_n * forward_flops();
            if (o->restore_best && val_accuracy > best_accuracy)
                best_accuracy = val_accuracy, best_epoch = epoch + 1, *best = *kept;
        }
        printf("epoch %d/%d %.1fs loss=%.6f accuracy=%.6f", epoch + 1, o->epochs,
               seconds_now() - epoch_start, loss_sum / n, hits / n);
        if (val_pixels)
            printf(" val_loss=%.6f val_accuracy=%.6f", val_loss, val_accuracy);
        printf("\n");
        fflush(stdout);
    }
    if (o->restore_best && best_epoch != o->epochs) {
        printf("restoring epoch %d: best validation accuracy %.4f\n", best_epoch, best_accuracy);
        *kept = *best;
    }
    double seconds = seconds_now() - start;
    printf("train: images=%d epochs=%d seconds=%.3f executed_gflop=%.3f dense_gflop=%.3f "
           "gflops=%.2f threads=%d\n", n, o->epochs, seconds, (double)flops * 1e-9,
           (double)flops * 1e-9, (double)flops * 1e-9 / seconds, max_threads());
    fflush(stdout);
    for (int i = 0; i < PARAM_COUNT; i++)
        if (!isfinite(flat(kept)[i]))
            fail("training diverged (weights not finite), %s not written: lower "
                 "--learning-rate", o->out);
    if (!save_params(o->out, kept))
        fail("%s: cannot write the model", o->out);
}

/* ---------------------------------------------------------------------------------------- */
/* Commands                                                                                   */

static void command_train(int argc, char **argv)
{
    static const char *const names[] = {
        "--images", "--labels", "--val-images", "--val-labels", "--out", "--epochs",
        "--batch-size", "--learning-rate", "--schedule", "--label-smoothing", "--rotation",
        "--shift", "--zoom", "--restore-best", "--ema", "--seed", "--threads", NULL};
    Flags f = {"train", names, {NULL}};
    parse_flags(&f, argc, argv);
    /* The defaults: params.yaml's train.cnn. */
    static const TrainOptions recipe = {.epochs = 24, .batch_size = 128, .learning_rate = 0.002,
                                        .cosine = 1, .label_smoothing = 0.1,
                                        .augment = {10, 0.1, 0.1}, .seed = 42};
    TrainOptions o = train_options(&f, &recipe, MAX_CNN_BATCH);
    train(&o);
}

static void command_predict(int argc, char **argv)
{
    static const char *const names[] = {"--model", "--images", "--out", "--threads", NULL};
    Flags f = {"predict", names, {NULL}};
    parse_flags(&f, argc, argv);
    const char *model = text_flag(&f, "--model", NULL), *images = text_flag(&f, "--images", NULL);
    const char *out = text_flag(&f, "--out", NULL);
    set_threads(&f);
    Params *p = allocate(1, sizeof(Params));
    load_params(model, p);
    int n;
    float *pixels = load_images(images, &n), *probs = allocate((size_t)n * CLASSES, sizeof(float));
    check_writable(out);
    Model m = make_model(EVAL_BATCH);
    evaluate(&m, p, pixels, n, NULL, probs, NULL, NULL);
    if (!write_idx(out, probs, n, CLASSES, 1))
        fail("%s: cannot write the predictions", out);
}

/* One training-mode forward and backward pass of all the images as one batch, drawn as
   training step 0; writes the gradients (with the batch statistics in the moving ones'
   places) and the dropout mask, and prints the mean objective. */
static void command_grad(int argc, char **argv)
{
    static const char *const names[] = {"--model", "--images", "--labels", "--out", "--mask",
                                        "--seed", "--label-smoothing", "--threads", NULL};
    Flags f = {"grad", names, {NULL}};
    parse_flags(&f, argc, argv);
    const char *model = text_flag(&f, "--model", NULL), *images = text_flag(&f, "--images", NULL);
    const char *labels_path = text_flag(&f, "--labels", NULL), *out = text_flag(&f, "--out", NULL);
    const char *mask_path = text_flag(&f, "--mask", NULL);
    uint64_t seed = int_flag(&f, "--seed", 42, 0, UINT64_MAX);
    double smoothing = real_flag(&f, "--label-smoothing", 0, fraction, "[0, 1)");
    set_threads(&f);
    Params *p = allocate(1, sizeof(Params)), *g = allocate(1, sizeof(Params));
    load_params(model, p);
    int n;
    float *pixels = load_images(images, &n);
    uint8_t *labels = load_labels(labels_path, n, images);
    if (n > MAX_CNN_BATCH)
        fail("%s: %d images; grad takes at most %d (one batch)", images, n, MAX_CNN_BATCH);
    check_writable(out), check_writable(mask_path);

    Model m = make_model(n);
    int *order = allocate((size_t)n, sizeof(int));
    for (int i = 0; i < n; i++)
        order[i] = i;
    load_batch(&m, pixels, labels, order, n, NULL, 0, 0);
    model_forward(&m, p, n, 1, m.labels, smoothing, stream_key(seed, STREAM_DROPOUT), 0);
    memset(g, 0, sizeof *g);
    model_backward(&m, p, g, n, m.labels, smoothing);
    double loss = 0.0;
    for (int b = 0; b < n; b++)
        loss += m.objective[b];
    memcpy(g->bn1[MEAN], m.batch->bn1[MEAN], sizeof(float) * 2 * C1); /* MEAN and VAR rows */
    memcpy(g->bn2[MEAN], m.batch->bn2[MEAN], sizeof(float) * 2 * C2);
    memcpy(g->bn3[MEAN], m.batch->bn3[MEAN], sizeof(float) * 2 * C3);
    if (!save_params(out, g))
        fail("%s: cannot write the gradients", out);
    if (!write_idx(mask_path, m.mask, n, FEATURES, 0)) {
        remove(out);
        fail("%s: cannot write the dropout mask", mask_path);
    }
    printf("loss=%.9g\n", loss / n);
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "train") == 0)
        command_train(argc, argv);
    else if (argc >= 2 && strcmp(argv[1], "predict") == 0)
        command_predict(argc, argv);
    else if (argc >= 2 && strcmp(argv[1], "grad") == 0)
        command_grad(argc, argv);
    else if (argc >= 2)
        fail("unknown command '%s'; expected train, predict or grad", argv[1]);
    else
        fail("usage: mnist_cnn train|predict|grad --flag value ... (see the source's header)");
    return 0;
}
