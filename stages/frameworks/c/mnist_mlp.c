/*
 * mnist_mlp.c: the classic MNIST multilayer perceptron, trained the way Keras 3 trains it, in
 * one C11 file (libc and libm; OpenMP when the compiler has it) and the mnist.h it shares with
 * the convnet (mnist_cnn.c): errors, threads, randomness, idx files, augmentation, flags.
 *
 *     784 pixels -> Dense 128 ReLU -> Dropout 0.2 -> Dense 10 softmax; Adam; cross-entropy
 *
 * Build (with or without -fopenmp; either way the model file has the same bits):
 *     cc -std=c11 -O3 -march=native -ffp-contract=fast -fopenmp -o mnist_mlp \
 *        stages/frameworks/c/mnist_mlp.c -lm
 * (-ffp-contract=fast: a*b+c as one fused multiply-add, which -std=c11 alone forbids.)
 * Run:
 *     mnist_mlp train --images X.idx --labels Y.idx [--val-images VX.idx --val-labels VY.idx]
 *                     --out MODEL.bin [--epochs 5] [--batch-size 32] [--learning-rate 0.001]
 *                     [--schedule constant|cosine] [--label-smoothing 0] [--rotation 0]
 *                     [--shift 0] [--zoom 0] [--restore-best 0|1] [--seed 42] [--threads 1]
 *     mnist_mlp predict --model MODEL.bin --images X.idx --out P.idx [--threads 1]
 *     mnist_mlp grad --model MODEL.bin --images X.idx --labels Y.idx --out G.bin --mask M.idx
 *                    [--seed 42] [--dropout 0.2] [--label-smoothing 0] [--threads 1]
 * grad runs one forward and backward pass of all the images as one batch (dropout on, drawn
 * as in training step 0) and writes the gradients in the model file's layout, the dropout
 * mask (uint8 idx N x 128, 1 = kept) and `loss=L` on stdout, for gradient checks. On any
 * error: one line `mnist_mlp: error: ...` on stderr, exit status 1, no output file.
 *
 * Files. Data are in MNIST's idx format: a big-endian header (two zero bytes, a type byte,
 * 0x08 uint8 or 0x0D float32, the number of dimensions, one uint32 per dimension), then the
 * values in C order, big-endian. Images: magic 0x00000D03, N x 28 x 28 float32 in [0, 1];
 * labels: 0x00000801, N uint8 0..9; predictions: 0x00000D02, N x 10 float32. The model file
 * is little-endian and byte-stable (the same weights always give the same bytes):
 *     bytes 0-7   "MNISTMLP"
 *     uint32 x 4  version 1, inputs 784, hidden 128, outputs 10
 *     float32     W1[784][128] ([input][hidden], Keras' kernel layout), b1[128],
 *                 W2[128][10] ([hidden][output]), b2[10]                 (407,104 bytes)
 *
 * The math is Keras 3's: Glorot-uniform kernels and zero biases; inverted dropout (keep a
 * unit when its uniform draw u >= rate, scale kept ones by 1/(1-rate)); softmax cross-entropy,
 * optionally label-smoothed, averaged over the batch; a fresh Fisher-Yates shuffle per epoch,
 * the last batch shorter; Adam (beta1 0.9, beta2 0.999, epsilon 1e-7) on every parameter every
 * step; a constant or cosine-decayed learning rate; and optional augmentation, a random
 * rotation, zoom and shift folded into one affine map and resampled bilinearly.
 *
 * Randomness is counter-based: each number is hash(seed, stream, counter), splitmix64's mixer
 * applied to a key (from seed and stream) plus the counter; a uniform in [0, 1) is its top 24
 * bits times 2^-24. Streams and counters: INIT, the parameter's index in the model file;
 * SHUFFLE, the epoch (seeding a sequential splitmix64 generator that drives Fisher-Yates);
 * DROPOUT, draw * 128 + unit; AUGMENT, draw * 5 + k for the map's five numbers; where draw =
 * step * batch_size + the image's place in its batch. No number depends on the threads.
 *
 * Threads, and why their number changes no bit. A step is one OpenMP parallel region of up to
 * four phases, with a barrier between phases; each phase splits its work by what it writes:
 *   1. images, when augmenting: each thread warps its share of the batch and lists the warped
 *      images' nonzero pixels (otherwise the lists are made once, before training);
 *   2. hidden units: each thread computes its units of layer 1 (ReLU, dropout) for every image;
 *   3. images: layer 2, softmax, loss and the gradient back to layer 1 (dh), image by image;
 *      and pixels: each thread sorts its range of pixels into the batch's buckets (below);
 *   4. hidden units: each thread sums the gradients of its units' parameters (its columns of W1
 *      and entries of b1, its rows of W2; thread 0 also b2) over the batch in batch order, and
 *      applies Adam to them.
 * Every number is thus computed by one thread, in an order that only the data decide: no sum
 * is split between threads, there are no atomics and no cross-thread reductions, and the model
 * file is the same for any --threads, and without OpenMP. (Compilers and CPUs may differ in the
 * last bits, as -march=native picks the instructions. Never use -ffast-math: it lets the
 * compiler reorder sums.) Units go to threads by panels of 32 (see Params), so phases 2 and 4
 * use at most 4 threads.
 *
 * Speed. About 81% of MNIST's pixels are 0, so an image is kept as the list of its nonzero
 * pixels (index, value). Layer 1 is h = b1 + the sum over those pixels p of x_p * W1[p][:], a
 * loop over contiguous rows that vectorises, and dW1 has rows only for pixels in the batch:
 * phase 3 sorts the batch's nonzeros into one bucket per pixel, and phase 4 sums x_p * dh[b]
 * over a bucket and hands the finished row straight to Adam.
 *
 * Output. train prints after each epoch
 *     epoch E/N S.Ss loss=L accuracy=A[ val_loss=VL val_accuracy=VA]
 * (L: mean plain cross-entropy of the epoch's training images, dropout and augmentation on, no
 * smoothing; A: training hits / N; the validation set runs with dropout off), and at the end
 *     train: images=N epochs=E seconds=T executed_gflop=X dense_gflop=D gflops=G threads=K
 * T: the training loop's wall time (validation included, file loading not). X: the floating-
 * point operations of the forward, backward and Adam passes as performed (validation included;
 * a multiply-add counts 2, an exp, sqrt or divide 1), counted exactly from the nonzero pixels
 * and active units; D: the same passes done densely; G = X / T.
 */
#define PROGRAM "mnist_mlp"
#include "mnist.h"
#include "vector.h"

enum { HIDDEN = 128, OUTPUTS = CLASSES };
enum { PARAM_COUNT = INPUTS * HIDDEN + HIDDEN + HIDDEN * OUTPUTS + OUTPUTS }; /* 101,770 */
enum { MODEL_HEADER = 24, MODEL_BYTES = MODEL_HEADER + 4 * PARAM_COUNT };     /* 407,104 */

/* ---------------------------------------------------------------------------------------- */
/* The model                                                                                  */

/* The parameters; Adam's two moments and the gradients share this layout. W1 is stored in
   panels of PANEL hidden units, w1[q][p][k] = W1[p][q * PANEL + k]: a thread owns whole
   panels, which are contiguous, so no two threads ever touch the same cache line of W1 or of
   its moments. (With plain rows, two threads updating the two halves of every row would
   share cache lines, which then bounce between the cores.) */
enum { PANEL = 32, PANELS = HIDDEN / PANEL };
typedef struct {
    float w1[PANELS][INPUTS][PANEL];
    float b1[HIDDEN];
    float w2[HIDDEN * OUTPUTS]; /* [hidden][output] */
    float b2[OUTPUTS];
} Params;

/* Parameter i in the model file's order (W1 [input][hidden], b1, W2, b2). */
static float *param_at(Params *p, int i)
{
    if (i < INPUTS * HIDDEN)
        return &p->w1[(i % HIDDEN) / PANEL][i / HIDDEN][i % PANEL];
    if ((i -= INPUTS * HIDDEN) < HIDDEN)
        return &p->b1[i];
    if ((i -= HIDDEN) < HIDDEN * OUTPUTS)
        return &p->w2[i];
    return &p->b2[i - HIDDEN * OUTPUTS];
}

/* Glorot-uniform kernels, U(-l, l) with l = sqrt(6 / (fan_in + fan_out)) as Keras' Dense
   layers start, and zero biases; parameter i takes number i of the INIT stream. */
static void init_params(Params *p, uint64_t seed)
{
    double limit1 = sqrt(6.0 / (INPUTS + HIDDEN)), limit2 = sqrt(6.0 / (HIDDEN + OUTPUTS));
    uint64_t key = stream_key(seed, STREAM_INIT);
    memset(p, 0, sizeof *p);
    for (int i = 0; i < PARAM_COUNT; i++) {
        double u = 2.0 * uniform01(random_bits(key, (uint64_t)i)) - 1.0;
        if (i < INPUTS * HIDDEN)
            *param_at(p, i) = (float)(u * limit1);
        else if (i >= INPUTS * HIDDEN + HIDDEN && i < PARAM_COUNT - OUTPUTS)
            *param_at(p, i) = (float)(u * limit2);
    }
}

static int save_params(const char *path, Params *p)
{
    unsigned char *bytes = allocate(MODEL_BYTES, 1);
    memcpy(bytes, "MNISTMLP", 8);
    put_32(bytes + 8, 1, 0), put_32(bytes + 12, INPUTS, 0);
    put_32(bytes + 16, HIDDEN, 0), put_32(bytes + 20, OUTPUTS, 0);
    for (int i = 0; i < PARAM_COUNT; i++)
        put_32(bytes + MODEL_HEADER + 4 * i, float_bits(*param_at(p, i)), 0);
    int ok = write_file(path, bytes, MODEL_BYTES);
    free(bytes);
    return ok;
}

static void load_params(const char *path, Params *p)
{
    long size;
    FILE *f = open_input(path, &size);
    unsigned char *bytes = allocate(MODEL_BYTES, 1);
    if (size >= MODEL_HEADER)
        read_exact(f, bytes, MODEL_HEADER, path);
    if (size < MODEL_HEADER || memcmp(bytes, "MNISTMLP", 8) != 0)
        fail("%s: not a model file of this program (no MNISTMLP header)", path);
    if (get_le32(bytes + 8) != 1 || get_le32(bytes + 12) != INPUTS ||
        get_le32(bytes + 16) != HIDDEN || get_le32(bytes + 20) != OUTPUTS)
        fail("%s: version %lu, sizes %lu/%lu/%lu; expected version 1, sizes 784/128/10", path,
             (unsigned long)get_le32(bytes + 8), (unsigned long)get_le32(bytes + 12),
             (unsigned long)get_le32(bytes + 16), (unsigned long)get_le32(bytes + 20));
    if (size != MODEL_BYTES)
        fail("%s: %ld bytes; a model file has %d", path, size, MODEL_BYTES);
    read_exact(f, bytes + MODEL_HEADER, MODEL_BYTES - MODEL_HEADER, path);
    fclose(f);
    for (int i = 0; i < PARAM_COUNT; i++)
        if (!isfinite(*param_at(p, i) = bits_float(get_le32(bytes + MODEL_HEADER + 4 * i))))
            fail("%s: holds weights that are not finite numbers", path);
    free(bytes);
}

/* ---------------------------------------------------------------------------------------- */
/* Forward pass                                                                               */

typedef struct { /* an image as its nonzero pixels, in ascending pixel order */
    int count;
    const uint16_t *pixel;
    const float *value;
} SparseImage;

/* Lists an image's nonzero pixels. Branch-free (each pixel is written, a zero one then
   overwritten by the next), so pixel[] and value[] need room for one more than the count. */
static int nonzeros(const float *image, uint16_t *pixel, float *value)
{
    int n = 0;
    for (int p = 0; p < INPUTS; p++) {
        pixel[n] = (uint16_t)p, value[n] = image[p];
        n += image[p] != 0.0f;
    }
    return n;
}

/* out[c0:c1] = init[c0:c1] (or 0) + sum over e of weight[e] * T(index[e], c0:c1), summed in e
   order, where T(r, c) = table[r * row_stride + (c / PANEL) * panel_stride + c % PANEL]: W1
   by panel (PANEL, INPUTS * PANEL) or plain 128-wide rows (HIDDEN, PANEL). The heart of layer
   1: its forward pass (W1, rows by pixel) and its weight gradient (dh, rows by image) run
   here. It goes one panel at a time, a width known when compiling, so the panel's sums stay in
   vector registers over the whole list (c0, c1: multiples of PANEL). GCC's -O3 unroll-and-jam
   would pair up e iterations and un-vectorise the j loop, hence the attribute. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-loop-unroll-and-jam")))
#endif
static void sum_scaled_rows(float *restrict out, const float *restrict init,
                            const float *restrict table, size_t row_stride, size_t panel_stride,
                            const uint16_t *restrict index, const float *restrict weight,
                            int count, int c0, int c1)
{
    for (int col = c0; col < c1; col += PANEL) {
        const float *panel = table + (size_t)(col / PANEL) * panel_stride;
        float acc[PANEL];
        for (int j = 0; j < PANEL; j++)
            acc[j] = init ? init[col + j] : 0.0f;
        for (int e = 0; e < count; e++) {
            const float *restrict row = panel + index[e] * row_stride;
            const float x = weight[e];
            for (int j = 0; j < PANEL; j++)
                acc[j] += x * row[j];
        }
        for (int j = 0; j < PANEL; j++)
            out[col + j] = acc[j];
    }
}

/* Layer 1 for hidden units c0..c1-1, before ReLU: b1 + x W1. */
static void layer1(const Params *p, SparseImage x, float *h, int c0, int c1)
{
    sum_scaled_rows(h, p->b1, &p->w1[0][0][0], PANEL, INPUTS * PANEL, x.pixel, x.value, x.count,
                    c0, c1);
}

/* The hidden units that are on (h > 0), ascending. The others are 0 after ReLU or dropout:
   they add nothing to layer 2 and get no gradient, so layer 2 skips them (same results). */
static int active_units(const float *h, uint8_t *units)
{
    int n = 0;
    for (int j = 0; j < HIDDEN; j++) {
        units[n] = (uint8_t)j;
        n += h[j] > 0.0f;
    }
    return n;
}

/* Layer 2, logits = b2 + h W2, then a stable softmax (logits minus their max). Returns
   lse = log(sum of exp(logit - max)) and sets *max: -log p_k = lse - (logit_k - max). */
static double layer2_softmax(const Params *p, const float *h, const uint8_t *units, int n,
                             float *logits, float *probs, float *max)
{
    for (int k = 0; k < OUTPUTS; k++)
        logits[k] = p->b2[k];
    for (int i = 0; i < n; i++)
        for (int k = 0; k < OUTPUTS; k++)
            logits[k] += h[units[i]] * p->w2[units[i] * OUTPUTS + k];
    float m = logits[0], sum = 0.0f;
    for (int k = 1; k < OUTPUTS; k++)
        m = logits[k] > m ? logits[k] : m;
    for (int k = 0; k < OUTPUTS; k++)
        sum += probs[k] = expf(logits[k] - m);
    for (int k = 0; k < OUTPUTS; k++)
        probs[k] /= sum;
    *max = m;
    return log((double)sum);
}

static int argmax(const float *v)
{
    int best = 0;
    for (int k = 1; k < OUTPUTS; k++)
        best = v[k] > v[best] ? k : best;
    return best;
}


/* Augmentation: the nonzero pixels of one randomly warped image (mnist.h's warp). */
static int warp_nonzeros(const float *image, const Augment *aug, uint64_t key, uint64_t draw,
                         uint16_t *pixel, float *value)
{
    float map[6];
    affine_map(aug, key, draw, map);
    int n = 0;
    for (int y = 0; y < SIDE; y++)
        for (int x = 0; x < SIDE; x++) {
            float out = warp_pixel(image, map, x, y);
            if (out != 0.0f)
                pixel[n] = (uint16_t)(y * SIDE + x), value[n++] = out;
        }
    return n;
}

/* ---------------------------------------------------------------------------------------- */
/* Adam                                                                                       */


/* n <= HIDDEN parameters: m += (g - m)(1 - beta1); v += (g^2 - v)(1 - beta2);
   w -= lr_t m / (sqrt(v) + epsilon). */
static void adam_update(float *restrict w, float *restrict m, float *restrict v,
                        const float *restrict g, int n, const AdamStep *s)
{
    float root[HIDDEN];
    for (int i = 0; i < n; i++) {
        m[i] += (g[i] - m[i]) * s->one_minus_beta1;
        v[i] += (g[i] * g[i] - v[i]) * s->one_minus_beta2;
    }
    square_roots(root, v, n);
    for (int i = 0; i < n; i++)
        w[i] -= s->lr_t * m[i] / (root[i] + s->epsilon);
}

/* ---------------------------------------------------------------------------------------- */
/* One training step                                                                          */

typedef struct {
    Params *params, *adam_m, *adam_v; /* the weights and Adam's moments */
    Params *grads;                    /* grad command: gradients are stored here, no update */
    int batch_size;                   /* the recipe's (it numbers the random draws) */
    float dropout_rate, dropout_scale, smoothing;
    uint64_t dropout_key, augment_key;
    const Augment *augment;           /* NULL: off */
    const float *pixels;              /* the training set: dense images (for augmentation), */
    SparseImage *sparse;              /* their nonzero pixels (without), */
    const uint8_t *labels;            /* and labels */
    int capacity;                     /* images per step: min(batch_size, N) */
    /* Per image b of the step: */
    SparseImage *input;               /* its nonzero pixels */
    uint16_t *warped_pixel;           /* [capacity][INPUTS + 1] room for warped images */
    float *warped_value;
    float *hidden;                    /* [capacity][HIDDEN] layer 1 after ReLU and dropout */
    float *dhidden;                   /* [capacity][HIDDEN] d loss / d layer 1 before ReLU */
    float *dlogits;                   /* [capacity][OUTPUTS] d loss / d logits */
    int *active;                      /* units on */
    double *loss, *objective;         /* plain and label-smoothed cross-entropy */
    unsigned char *hit;               /* argmax = label */
    uint8_t *mask;                    /* grad command: [capacity][HIDDEN] dropout mask */
    /* The batch by pixel: bucket p holds the (image, value) pairs of the images with pixel p,
       in batch order (at most one per image, hence capacity slots per pixel). */
    int *bucket_count;                /* [INPUTS] */
    uint16_t *bucket_image;           /* [INPUTS][capacity] */
    float *bucket_value;
    unsigned char *pixel_seen;        /* [INPUTS] pixel p occurred in some batch so far */
    int threads_used;
} Trainer;

/* Phase 1 (augmenting only), image b (dataset image `index`): its warped nonzero pixels. */
static void warp_input(Trainer *t, int index, int b, uint64_t draw)
{
    uint16_t *pixel = t->warped_pixel + (size_t)b * (INPUTS + 1);
    float *value = t->warped_value + (size_t)b * (INPUTS + 1);
    int count = warp_nonzeros(t->pixels + (size_t)index * INPUTS, t->augment, t->augment_key,
                              draw, pixel, value);
    t->input[b] = (SparseImage){count, pixel, value};
}

/* Phase 2, units c0..c1-1 of every image: layer 1, ReLU, inverted dropout. */
static void hidden_units(Trainer *t, int batch, uint64_t first_draw, int c0, int c1)
{
    for (int b = 0; b < batch; b++) {
        float *h = t->hidden + (size_t)b * HIDDEN;
        uint64_t counter = (first_draw + (uint64_t)b) * HIDDEN;
        layer1(t->params, t->input[b], h, c0, c1);
        for (int j = c0; j < c1; j++) {
            int keep = uniform01(random_bits(t->dropout_key, counter + (uint64_t)j)) >=
                       t->dropout_rate;
            h[j] = keep && h[j] > 0.0f ? h[j] * t->dropout_scale : 0.0f;
            if (t->mask)
                t->mask[(size_t)b * HIDDEN + j] = (uint8_t)keep;
        }
    }
}

/* Phase 3, image b (dataset image `index`): layer 2, softmax, loss, and the gradient back to
   layer 1's pre-activation: (p - target) / batch through W2, then dropout and ReLU (a unit
   that is on passes it times the dropout scale, the others pass 0). */
static void output_and_backward(Trainer *t, int index, int b, int batch)
{
    const Params *p = t->params;
    const float *h = t->hidden + (size_t)b * HIDDEN;
    float *dl = t->dlogits + (size_t)b * OUTPUTS, *dh = t->dhidden + (size_t)b * HIDDEN;
    float logits[OUTPUTS], probs[OUTPUTS], max;
    uint8_t units[HIDDEN + 1];
    int label = t->labels[index], on = t->active[b] = active_units(h, units);
    double lse = layer2_softmax(p, h, units, on, logits, probs, &max), objective = lse;
    float target_true = (float)(1.0 - t->smoothing + t->smoothing / OUTPUTS);
    float target_other = (float)(t->smoothing / OUTPUTS);
    for (int k = 0; k < OUTPUTS; k++) {
        float target = k == label ? target_true : target_other;
        objective -= (double)target * ((double)logits[k] - max);
        dl[k] = (probs[k] - target) / (float)batch;
    }
    t->loss[b] = lse - ((double)logits[label] - max);
    t->objective[b] = objective;
    t->hit[b] = argmax(logits) == label;
    memset(dh, 0, HIDDEN * sizeof *dh);
    for (int i = 0; i < on; i++) {
        float sum = 0.0f;
        for (int k = 0; k < OUTPUTS; k++)
            sum += p->w2[units[i] * OUTPUTS + k] * dl[k];
        dh[units[i]] = sum * t->dropout_scale;
    }
}

/* Phase 3, pixels p0..p1-1: fill their buckets. Each image's list is sorted, so its pixels in
   the range are one run, found by binary search. */
static void fill_buckets(Trainer *t, int batch, int p0, int p1)
{
    for (int px = p0; px < p1; px++)
        t->bucket_count[px] = 0;
    for (int b = 0; b < batch; b++) {
        SparseImage x = t->input[b];
        int lo = 0, hi = x.count; /* first entry >= p0 */
        while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (x.pixel[mid] < p0)
                lo = mid + 1;
            else
                hi = mid;
        }
        for (int e = lo; e < x.count && x.pixel[e] < p1; e++) {
            size_t slot = (size_t)x.pixel[e] * t->capacity + t->bucket_count[x.pixel[e]]++;
            t->bucket_image[slot] = (uint16_t)b;
            t->bucket_value[slot] = x.value[e];
        }
    }
    for (int px = p0; px < p1; px++)
        t->pixel_seen[px] |= t->bucket_count[px] > 0;
}

/* Hands n gradients of the parameters at w to Adam, or stores them (grad command). Moments
   and gradients have the weights' layout: the same byte offset in their own Params. */
static float *same_place(const Params *from, const float *w, Params *to)
{
    return (float *)((char *)to + ((const char *)w - (const char *)from));
}

static void apply(Trainer *t, float *w, const float *g, int n, const AdamStep *s)
{
    if (t->grads)
        memcpy(same_place(t->params, w, t->grads), g, (size_t)n * sizeof *g);
    else
        adam_update(w, same_place(t->params, w, t->adam_m), same_place(t->params, w, t->adam_v),
                    g, n, s);
}

/* g[j0:j1] = sum over the batch, in batch order, of rows[b][j0:j1] (row length `width`). */
static void sum_over_batch(float *g, const float *rows, int width, int batch, int j0, int j1)
{
    for (int j = j0; j < j1; j++)
        g[j] = 0.0f;
    for (int b = 0; b < batch; b++)
        for (int j = j0; j < j1; j++)
            g[j] += rows[(size_t)b * width + j];
}

/* Phase 4, units c0..c1-1: the gradients of their parameters, each a sum over the batch in
   batch order, then Adam. */
static void update_units(Trainer *t, int batch, int c0, int c1, int thread, const AdamStep *s)
{
    Params *p = t->params;
    float g[HIDDEN];
    for (int px = 0; px < INPUTS; px++) { /* dW1[p] = sum over p's bucket of x_p dh[b] */
        /* Until pixel p first occurs its row's gradient, m and v are all exactly 0, and Adam
           leaves the row as it is, bit for bit: skipping it is dense Adam, done faster. */
        if (!t->pixel_seen[px] && !t->grads)
            continue;
        size_t first = (size_t)px * t->capacity;
        sum_scaled_rows(g, NULL, t->dhidden, HIDDEN, PANEL, t->bucket_image + first,
                        t->bucket_value + first, t->bucket_count[px], c0, c1);
        for (int col = c0; col < c1; col += PANEL)
            apply(t, p->w1[col / PANEL][px], g + col, PANEL, s);
    }
    sum_over_batch(g, t->dhidden, HIDDEN, batch, c0, c1); /* db1 */
    apply(t, p->b1 + c0, g + c0, c1 - c0, s);
    for (int j = c0; j < c1; j++) { /* dW2[j] = sum of hidden[b][j] dlogits[b] */
        for (int k = 0; k < OUTPUTS; k++)
            g[k] = 0.0f;
        for (int b = 0; b < batch; b++)
            for (int k = 0; k < OUTPUTS; k++)
                g[k] += t->hidden[(size_t)b * HIDDEN + j] * t->dlogits[(size_t)b * OUTPUTS + k];
        apply(t, p->w2 + j * OUTPUTS, g, OUTPUTS, s);
    }
    if (thread == 0) { /* db2 */
        sum_over_batch(g, t->dlogits, OUTPUTS, batch, 0, OUTPUTS);
        apply(t, p->b2, g, OUTPUTS, s);
    }
}

/* One step on the batch images[0..batch-1] (dataset indices); `step` counts from 0. Without
   augmentation, phase 1 is copying pointers: the main thread does it, saving a barrier. */
static void train_step(Trainer *t, const int *images, int batch, uint64_t step,
                       const AdamStep *s)
{
    uint64_t first_draw = step * (uint64_t)t->batch_size;
    for (int b = 0; !t->augment && b < batch; b++) /* phase 1 without augmentation */
        t->input[b] = t->sparse[images[b]];
    OMP("omp parallel")
    {
        int thread = thread_index(), threads = thread_count(), b0, b1, c0, c1, p0, p1;
        share(batch, threads, thread, &b0, &b1);   /* images */
        share(PANELS, threads, thread, &c0, &c1);  /* hidden units, by whole panels */
        c0 *= PANEL, c1 *= PANEL;
        share(INPUTS, threads, thread, &p0, &p1);  /* pixels */
        if (t->augment) {
            for (int b = b0; b < b1; b++)
                warp_input(t, images[b], b, first_draw + (uint64_t)b);
            OMP("omp barrier")
        }
        hidden_units(t, batch, first_draw, c0, c1);
        OMP("omp barrier")
        for (int b = b0; b < b1; b++)
            output_and_backward(t, images[b], b, batch);
        fill_buckets(t, batch, p0, p1);
        OMP("omp barrier")
        update_units(t, batch, c0, c1, thread, s);
        if (thread == 0)
            t->threads_used = threads;
    }
}

static Trainer make_trainer(Params *params, const float *pixels, const uint8_t *labels, int n,
                            int batch_size, uint64_t seed, double dropout, double smoothing,
                            const Augment *augment)
{
    Trainer t;
    memset(&t, 0, sizeof t);
    t.params = params, t.pixels = pixels, t.labels = labels, t.augment = augment;
    t.batch_size = batch_size, t.smoothing = (float)smoothing;
    t.dropout_rate = (float)dropout, t.dropout_scale = (float)(1.0 / (1.0 - dropout));
    t.dropout_key = stream_key(seed, STREAM_DROPOUT);
    t.augment_key = stream_key(seed, STREAM_AUGMENT);
    size_t cap = (size_t)(t.capacity = batch_size < n ? batch_size : n);
    if (augment) {
        t.warped_pixel = allocate(cap * (INPUTS + 1), sizeof(uint16_t));
        t.warped_value = allocate(cap * (INPUTS + 1), sizeof(float));
    } else { /* every image's nonzero pixels, once: count them, then list them */
        size_t *start = allocate((size_t)n + 1, sizeof(size_t));
        OMP("omp parallel for schedule(static)")
        for (int i = 0; i < n; i++) {
            size_t count = 0;
            for (int px = 0; px < INPUTS; px++)
                count += pixels[(size_t)i * INPUTS + px] != 0.0f;
            start[i + 1] = count;
        }
        start[0] = 0;
        for (int i = 0; i < n; i++) /* + 1: the slot nonzeros() may write past a list */
            start[i + 1] += start[i] + 1;
        uint16_t *pixel = allocate(start[n], sizeof *pixel);
        float *value = allocate(start[n], sizeof *value);
        t.sparse = allocate((size_t)n, sizeof *t.sparse);
        OMP("omp parallel for schedule(static)")
        for (int i = 0; i < n; i++) {
            int count = nonzeros(pixels + (size_t)i * INPUTS, pixel + start[i], value + start[i]);
            t.sparse[i] = (SparseImage){count, pixel + start[i], value + start[i]};
        }
        free(start);
    }
    t.input = allocate(cap, sizeof *t.input);
    t.hidden = allocate(cap * HIDDEN, sizeof(float));
    t.dhidden = allocate(cap * HIDDEN, sizeof(float));
    t.dlogits = allocate(cap * OUTPUTS, sizeof(float));
    t.active = allocate(cap, sizeof(int));
    t.loss = allocate(cap, sizeof(double));
    t.objective = allocate(cap, sizeof(double));
    t.hit = allocate(cap, 1);
    t.bucket_count = allocate(INPUTS, sizeof(int));
    t.bucket_image = allocate(INPUTS * cap, sizeof(uint16_t));
    t.bucket_value = allocate(INPUTS * cap, sizeof(float));
    t.pixel_seen = calloc(INPUTS, 1);
    if (!t.pixel_seen)
        fail("out of memory");
    return t;
}

/* ---------------------------------------------------------------------------------------- */
/* Evaluation and the training loop                                                           */

/* Floating-point operations (a multiply-add counts 2) of one image with nnz nonzero pixels
   and `on` active hidden units; dense passes take nnz = 784, on = 128. */
static uint64_t forward_flops(uint64_t nnz, uint64_t on)
{
    return 2 * nnz * HIDDEN + 2 * on * OUTPUTS + 4 * OUTPUTS; /* layers 1 and 2, softmax */
}

static uint64_t train_flops(uint64_t nnz, uint64_t on)
{
    return forward_flops(nnz, on) + HIDDEN        /* with dropout */
           + 2 * OUTPUTS + 2 * on * OUTPUTS + on  /* dlogits, back through W2 and dropout */
           + 2 * HIDDEN * OUTPUTS + OUTPUTS + HIDDEN /* the image's terms of dW2, db2, db1 */
           + 2 * nnz * HIDDEN;                    /* and of dW1 */
}

enum { ADAM_FLOPS = 12 }; /* per parameter and step: 3 for m, 4 for v, 5 for w */

/* Class probabilities (if probs), mean plain cross-entropy and accuracy (if labels) of n
   images, dropout off; returns the flops. Images are independent: any thread may take any. */
static uint64_t evaluate(const Params *p, const float *pixels, int n, const uint8_t *labels,
                         float *probs, double *loss_out, double *accuracy_out)
{
    double *loss = allocate((size_t)n, sizeof(double));
    int *hit = allocate((size_t)n, sizeof(int));
    uint64_t *flops = allocate((size_t)n, sizeof(uint64_t)), total_flops = 0;
    OMP("omp parallel for schedule(static)")
    for (int i = 0; i < n; i++) {
        uint16_t pixel[INPUTS + 1];
        uint8_t units[HIDDEN + 1];
        float value[INPUTS + 1], h[HIDDEN], logits[OUTPUTS], pr[OUTPUTS], max;
        SparseImage x = {nonzeros(pixels + (size_t)i * INPUTS, pixel, value), pixel, value};
        layer1(p, x, h, 0, HIDDEN);
        for (int j = 0; j < HIDDEN; j++)
            h[j] = h[j] > 0.0f ? h[j] : 0.0f;
        int on = active_units(h, units);
        double lse = layer2_softmax(p, h, units, on, logits, pr, &max);
        if (probs)
            memcpy(probs + (size_t)i * OUTPUTS, pr, sizeof pr);
        if (labels)
            loss[i] = lse - ((double)logits[labels[i]] - max), hit[i] = argmax(logits) == labels[i];
        flops[i] = forward_flops((uint64_t)x.count, (uint64_t)on);
    }
    double loss_sum = 0.0, hits = 0.0;
    for (int i = 0; i < n; i++) { /* in image order, whatever the threads */
        if (labels)
            loss_sum += loss[i], hits += hit[i];
        total_flops += flops[i];
    }
    if (labels)
        *loss_out = loss_sum / n, *accuracy_out = hits / n;
    free(loss), free(hit), free(flops);
    return total_flops;
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
    Params *params = allocate(1, sizeof(Params)), *best = allocate(1, sizeof(Params));
    Params *m = calloc(1, sizeof(Params)), *v = calloc(1, sizeof(Params));
    if (!m || !v)
        fail("out of memory");
    init_params(params, o->seed);
    Trainer t = make_trainer(params, pixels, labels, n, o->batch_size, o->seed, 0.2,
                             o->label_smoothing, augmenting ? aug : NULL);
    t.adam_m = m, t.adam_v = v;
    if (!augmenting) /* the nonzero lists are all that training reads */
        free(pixels), t.pixels = NULL;
    int *order = allocate((size_t)n, sizeof(int)), best_epoch = 0;
    uint64_t steps_per_epoch = ((uint64_t)n + o->batch_size - 1) / o->batch_size;
    uint64_t total_steps = steps_per_epoch * o->epochs, step = 0, executed = 0, dense = 0;
    double best_accuracy = -1.0, start = seconds_now();
    for (int epoch = 0; epoch < o->epochs; epoch++) {
        double epoch_start = seconds_now(), loss_sum = 0.0, hits = 0.0;
        shuffle(order, n, o->seed, epoch);
        for (int first = 0; first < n; first += o->batch_size, step++) {
            int batch = n - first < o->batch_size ? n - first : o->batch_size;
            AdamStep s = adam_step(learning_rate_at(o->learning_rate, o->cosine, step,
                                                    total_steps), step);
            train_step(&t, order + first, batch, step, &s);
            for (int b = 0; b < batch; b++) { /* in batch order, so these sums are fixed too */
                loss_sum += t.loss[b], hits += t.hit[b];
                executed += train_flops((uint64_t)t.input[b].count, (uint64_t)t.active[b]);
                dense += train_flops(INPUTS, HIDDEN);
            }
            uint64_t updated = PARAM_COUNT; /* all but the rows of pixels not seen yet */
            for (int px = 0; px < INPUTS; px++)
                updated -= t.pixel_seen[px] ? 0 : HIDDEN;
            executed += ADAM_FLOPS * updated, dense += ADAM_FLOPS * PARAM_COUNT;
        }
        double val_loss = 0.0, val_accuracy = 0.0;
        if (val_pixels) {
            executed += evaluate(params, val_pixels, val_n, val_labels, NULL, &val_loss,
                                 &val_accuracy);
            dense += (uint64_t)val_n * forward_flops(INPUTS, HIDDEN);
            if (o->restore_best && val_accuracy > best_accuracy)
                best_accuracy = val_accuracy, best_epoch = epoch + 1, *best = *params;
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
        *params = *best;
    }
    double seconds = seconds_now() - start;
    printf("train: images=%d epochs=%d seconds=%.3f executed_gflop=%.3f dense_gflop=%.3f "
           "gflops=%.2f threads=%d\n", n, o->epochs, seconds, (double)executed * 1e-9,
           (double)dense * 1e-9, (double)executed * 1e-9 / seconds, t.threads_used);
    fflush(stdout);
    for (int i = 0; i < PARAM_COUNT; i++)
        if (!isfinite(*param_at(params, i)))
            fail("training diverged (weights not finite), %s not written: lower "
                 "--learning-rate", o->out);
    if (!save_params(o->out, params))
        fail("%s: cannot write the model", o->out);
}

/* ---------------------------------------------------------------------------------------- */
/* Commands and flags                                                                         */


static void command_train(int argc, char **argv)
{
    static const char *const names[] = {
        "--images", "--labels", "--val-images", "--val-labels", "--out", "--epochs",
        "--batch-size", "--learning-rate", "--schedule", "--label-smoothing", "--rotation",
        "--shift", "--zoom", "--restore-best", "--seed", "--threads", NULL};
    Flags f = {"train", names, {NULL}};
    parse_flags(&f, argc, argv);
    /* The defaults: params.yaml's train.mlp (Keras' own defaults). */
    static const TrainOptions recipe = {.epochs = 5, .batch_size = 32, .learning_rate = 0.001,
                                        .seed = 42};
    TrainOptions o = train_options(&f, &recipe, MAX_BATCH);
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
    float *pixels = load_images(images, &n), *probs = allocate((size_t)n * OUTPUTS, sizeof(float));
    check_writable(out);
    evaluate(p, pixels, n, NULL, probs, NULL, NULL);
    if (!write_idx(out, probs, n, OUTPUTS, 1))
        fail("%s: cannot write the predictions", out);
}

static void command_grad(int argc, char **argv)
{
    static const char *const names[] = {"--model", "--images", "--labels", "--out", "--mask",
                                        "--seed", "--dropout", "--label-smoothing", "--threads",
                                        NULL};
    Flags f = {"grad", names, {NULL}};
    parse_flags(&f, argc, argv);
    const char *model = text_flag(&f, "--model", NULL), *images = text_flag(&f, "--images", NULL);
    const char *labels_path = text_flag(&f, "--labels", NULL), *out = text_flag(&f, "--out", NULL);
    const char *mask_path = text_flag(&f, "--mask", NULL);
    uint64_t seed = int_flag(&f, "--seed", 42, 0, UINT64_MAX);
    double dropout = real_flag(&f, "--dropout", 0.2, fraction, "[0, 1)");
    double smoothing = real_flag(&f, "--label-smoothing", 0, fraction, "[0, 1)");
    set_threads(&f);
    Params *p = allocate(1, sizeof(Params)), *grads = allocate(1, sizeof(Params));
    load_params(model, p);
    int n;
    float *pixels = load_images(images, &n);
    uint8_t *labels = load_labels(labels_path, n, images);
    if (n > MAX_BATCH)
        fail("%s: %d images; grad takes at most %d (one batch)", images, n, MAX_BATCH);
    check_writable(out), check_writable(mask_path);

    /* All n images as one batch of size n, drawn as training step 0. */
    Trainer t = make_trainer(p, pixels, labels, n, n, seed, dropout, smoothing, NULL);
    t.grads = grads, t.mask = allocate((size_t)n * HIDDEN, 1);
    int *order = allocate((size_t)n, sizeof(int));
    for (int i = 0; i < n; i++)
        order[i] = i;
    AdamStep unused = adam_step(0.001, 0);
    train_step(&t, order, n, 0, &unused);
    double loss = 0.0;
    for (int b = 0; b < n; b++)
        loss += t.objective[b];
    if (!save_params(out, grads))
        fail("%s: cannot write the gradients", out);
    if (!write_idx(mask_path, t.mask, n, HIDDEN, 0)) {
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
        fail("usage: mnist_mlp train|predict|grad --flag value ... (see the source's header)");
    return 0;
}
