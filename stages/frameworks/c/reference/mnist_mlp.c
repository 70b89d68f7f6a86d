/*
 * reference/mnist_mlp.c: the MNIST multilayer perceptron in plain C11, written to be read
 * top to bottom: one forward and one backward function per kind of layer, the model built
 * from them, a training loop, and the commands. The fast program, ../mnist_mlp.c, does the
 * same arithmetic with sparse pixel lists and a hand-scheduled OpenMP region, and the tests
 * run both and compare them. Each sum here adds its terms in the fast program's order (the
 * zero pixels it skips add exact zeros here), so the two usually agree to the last bit; a
 * compiler may still round an operation differently in one of them (its fused multiply-adds).
 *
 *     784 pixels -> Dense 128 ReLU -> Dropout 0.2 -> Dense 10 softmax; Adam; cross-entropy
 *
 * Build (with or without -fopenmp; either way the model file has the same bits):
 *     cc -std=c11 -O3 -march=native -ffp-contract=fast -fopenmp -I stages/frameworks/c \
 *        -o mnist_mlp stages/frameworks/c/reference/mnist_mlp.c -lm
 * (-ffp-contract=fast: a*b+c as one fused multiply-add. Never -ffast-math: it reorders sums.)
 * Run (the fast program's command line, files, output lines and random numbers; its header
 * comment describes them in full):
 *     mnist_mlp train --images X.idx --labels Y.idx [--val-images VX.idx --val-labels VY.idx]
 *                     --out MODEL.bin [--epochs 5] [--batch-size 32] [--learning-rate 0.001]
 *                     [--schedule constant|cosine] [--label-smoothing 0] [--rotation 0]
 *                     [--shift 0] [--zoom 0] [--restore-best 0|1] [--seed 42] [--threads 1]
 *     mnist_mlp predict --model MODEL.bin --images X.idx --out P.idx [--threads 1]
 *     mnist_mlp grad --model MODEL.bin --images X.idx --labels Y.idx --out G.bin --mask M.idx
 *                    [--seed 42] [--dropout 0.2] [--label-smoothing 0] [--threads 1]
 * Model file (little-endian): "MNISTMLP", uint32 version 1, 784, 128, 10, then float32
 * W1[784][128], b1[128], W2[128][10], b2[10] (407,104 bytes). Data: idx files (mnist.h).
 *
 * Threads: every loop marked `omp parallel for` runs over outputs that do not depend on each
 * other (images, rows of a gradient, parameters), and each output's sum runs on one thread in
 * an order that only the shapes decide, so --threads changes no bit.
 */
#define PROGRAM "mnist_mlp"
#include "mnist.h"

enum { HIDDEN = 128, OUTPUTS = CLASSES };
enum { W1_SIZE = INPUTS * HIDDEN, W2_SIZE = HIDDEN * OUTPUTS };
enum { PARAM_COUNT = W1_SIZE + HIDDEN + W2_SIZE + OUTPUTS };              /* 101,770 */
enum { MODEL_HEADER = 24, MODEL_BYTES = MODEL_HEADER + 4 * PARAM_COUNT }; /* 407,104 */
enum { EVAL_BATCH = 1024 }; /* images per forward pass when only evaluating */
static const double DROPOUT_RATE = 0.2;

/* ---------------------------------------------------------------------------------------- */
/* Layers: each forward and backward function works for any batch size B and widths C. The   */
/* loops of the dense layer all take one form, out[o] += a * b with o innermost: each term    */
/* is one fused multiply-add in every build. (A dot-product loop, sum += a[o] * b[o], may be  */
/* compiled with separate multiplies and adds in one build and fused in another.)             */

/* out[b][o] = bias[o] + sum over i of in[b][i] * w[i][o]  (w is [C_in][C_out]). */
static void dense_forward(float *out, const float *in, const float *w, const float *bias,
                          int B, int C_in, int C_out)
{
#pragma omp parallel for
    for (int b = 0; b < B; b++) {
        const float *x = in + (size_t)b * C_in;
        float *y = out + (size_t)b * C_out;
        for (int o = 0; o < C_out; o++)
            y[o] = bias[o];
        for (int i = 0; i < C_in; i++) /* each y[o] sums its terms in i order */
            for (int o = 0; o < C_out; o++)
                y[o] += x[i] * w[(size_t)i * C_out + o];
    }
}

/* From dout = d loss / d out: the gradients of the weights and biases (set, not added to)
   dw[i][o] = sum over b of in[b][i] * dout[b][o],  dbias[o] = sum over b of dout[b][o]
   (both in batch order), and, unless din is NULL, d loss / d in:
   din[b][i] = sum over o of w[i][o] * dout[b][o]. */
static void dense_backward(float *din, float *dw, float *dbias, const float *dout,
                           const float *in, const float *w, int B, int C_in, int C_out)
{
#pragma omp parallel for
    for (int i = 0; i < C_in; i++) { /* one row of dw per iteration */
        float *g = dw + (size_t)i * C_out;
        for (int o = 0; o < C_out; o++)
            g[o] = 0.0f;
        for (int b = 0; b < B; b++)
            for (int o = 0; o < C_out; o++)
                g[o] += in[(size_t)b * C_in + i] * dout[(size_t)b * C_out + o];
    }
    for (int o = 0; o < C_out; o++)
        dbias[o] = 0.0f;
    for (int b = 0; b < B; b++)
        for (int o = 0; o < C_out; o++)
            dbias[o] += dout[(size_t)b * C_out + o];
    if (!din)
        return;
#pragma omp parallel for
    for (int b = 0; b < B; b++) {
        float *dx = din + (size_t)b * C_in;
        for (int i = 0; i < C_in; i++)
            dx[i] = 0.0f;
        for (int o = 0; o < C_out; o++) /* each dx[i] sums its terms in o order */
            for (int i = 0; i < C_in; i++)
                dx[i] += w[(size_t)i * C_out + o] * dout[(size_t)b * C_out + o];
    }
}

static void relu_forward(float *out, const float *in, int n)
{
    for (int i = 0; i < n; i++)
        out[i] = in[i] > 0.0f ? in[i] : 0.0f;
}

static void relu_backward(float *din, const float *dout, const float *in, int n)
{
    for (int i = 0; i < n; i++)
        din[i] = in[i] > 0.0f ? dout[i] : 0.0f;
}

/* Inverted dropout, as Keras does it: unit j of image b is kept when its uniform draw is >=
   rate, and a kept unit is scaled by scale = 1 / (1 - rate), so the expected output is the
   input. The draw is number (first_draw + b) * C + j of the DROPOUT stream (`key`). */
static void dropout_forward(float *out, uint8_t *keep, const float *in, float rate,
                            float scale, uint64_t key, uint64_t first_draw, int B, int C)
{
    for (int b = 0; b < B; b++)
        for (int j = 0; j < C; j++) {
            size_t i = (size_t)b * C + j;
            keep[i] = uniform01(random_bits(key, (first_draw + (uint64_t)b) * C + j)) >= rate;
            out[i] = keep[i] ? in[i] * scale : 0.0f;
        }
}

static void dropout_backward(float *din, const float *dout, const uint8_t *keep, float scale,
                             int n)
{
    for (int i = 0; i < n; i++)
        din[i] = keep[i] ? dout[i] * scale : 0.0f;
}

/* The targets of label smoothing s: 1 - s + s/C for the true class, s/C for the others (s is
   a float, as the fast program keeps it). */
static float target_of(int k, int label, float s, int C)
{
    return k == label ? (float)(1.0 - s + s / C) : (float)(s / C);
}

/* Softmax of each row of logits, made stable by subtracting the row's max, and when labels
   are given, per image: loss[b] = -log p[label] (plain cross-entropy, what train reports) and
   objective[b] = -sum over k of target_k log p_k (label-smoothed, what the gradient is of),
   both in double, from -log p_k = log(sum of exp(logit - max)) - (logit_k - max). */
static void softmax_crossentropy_forward(float *probs, double *loss, double *objective,
                                         const float *logits, const uint8_t *labels,
                                         float smoothing, int B, int C)
{
    for (int b = 0; b < B; b++) {
        const float *z = logits + (size_t)b * C;
        float *p = probs + (size_t)b * C, max = z[0], sum = 0.0f;
        for (int k = 1; k < C; k++)
            max = z[k] > max ? z[k] : max;
        for (int k = 0; k < C; k++)
            sum += p[k] = expf(z[k] - max);
        for (int k = 0; k < C; k++)
            p[k] /= sum;
        if (!labels)
            continue;
        double lse = log((double)sum), obj = lse;
        for (int k = 0; k < C; k++)
            obj -= (double)target_of(k, labels[b], smoothing, C) * ((double)z[k] - max);
        loss[b] = lse - ((double)z[labels[b]] - max);
        objective[b] = obj;
    }
}

/* d (mean objective over the batch) / d logits = (p - target) / B. */
static void softmax_crossentropy_backward(float *dlogits, const float *probs,
                                          const uint8_t *labels, float smoothing, int B, int C)
{
    for (int b = 0; b < B; b++)
        for (int k = 0; k < C; k++) {
            size_t i = (size_t)b * C + k;
            dlogits[i] = (probs[i] - target_of(k, labels[b], smoothing, C)) / (float)B;
        }
}

/* Adam, Keras 3's form, on n parameters: s holds this step's lr_t (mnist.h's adam_step). */
static void adam_update(float *w, const float *g, float *m, float *v, int n, AdamStep s)
{
#pragma omp parallel for
    for (int i = 0; i < n; i++) {
        m[i] += (g[i] - m[i]) * s.one_minus_beta1;
        v[i] += (g[i] * g[i] - v[i]) * s.one_minus_beta2;
        w[i] -= s.lr_t * m[i] / (sqrtf(v[i]) + s.epsilon);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* The model                                                                                  */

/* Parameters, their gradients and Adam's moments are each one block of PARAM_COUNT floats in
   the model file's order; these are the four tensors in such a block. */
typedef struct { float *w1, *b1, *w2, *b2; } Tensors;

static Tensors tensors(float *block)
{
    Tensors t = {block, block + W1_SIZE, block + W1_SIZE + HIDDEN,
                 block + W1_SIZE + HIDDEN + W2_SIZE};
    return t;
}

typedef struct {
    float *params, *grads, *m, *v; /* m, v: Adam's moments (train only) */
    float dropout_rate, dropout_scale, smoothing;
    uint64_t dropout_key;
} Model;

/* What the forward pass computes for a batch of up to `capacity` images, and its gradients. */
typedef struct {
    int capacity;
    float *input;             /* [B][INPUTS] the images */
    uint8_t *labels;          /* [B] */
    float *hidden, *relu;     /* [B][HIDDEN] layer 1 (x W1 + b1), then after ReLU */
    uint8_t *keep;            /* [B][HIDDEN] dropout's mask, 1 = kept */
    float *dropped;           /* [B][HIDDEN] after dropout: layer 2's input when training */
    float *logits, *probs;    /* [B][OUTPUTS] */
    double *loss, *objective; /* [B] plain and label-smoothed cross-entropy */
    float *dlogits, *ddropped, *drelu, *dhidden; /* d objective / d each of the above */
} Activations;

static Activations make_activations(int capacity)
{
    size_t n = (size_t)capacity;
    size_t f = sizeof(float), h = n * HIDDEN;
    Activations a = {.capacity = capacity,
                     .input = allocate(n * INPUTS, f), .labels = allocate(n, 1),
                     .hidden = allocate(h, f), .relu = allocate(h, f), .keep = allocate(h, 1),
                     .dropped = allocate(h, f), .logits = allocate(n * OUTPUTS, f),
                     .probs = allocate(n * OUTPUTS, f), .loss = allocate(n, sizeof(double)),
                     .objective = allocate(n, sizeof(double)),
                     .dlogits = allocate(n * OUTPUTS, f), .ddropped = allocate(h, f),
                     .drelu = allocate(h, f), .dhidden = allocate(h, f)};
    return a;
}

/* The forward pass of a->input (B images); dropout only when training, with the draws of
   images first_draw, first_draw + 1, ... */
static void model_forward(const Model *model, Activations *a, int B, int training,
                          uint64_t first_draw)
{
    Tensors p = tensors(model->params);
    dense_forward(a->hidden, a->input, p.w1, p.b1, B, INPUTS, HIDDEN);
    relu_forward(a->relu, a->hidden, B * HIDDEN);
    const float *h = a->relu;
    if (training) {
        dropout_forward(a->dropped, a->keep, a->relu, model->dropout_rate,
                        model->dropout_scale, model->dropout_key, first_draw, B, HIDDEN);
        h = a->dropped;
    }
    dense_forward(a->logits, h, p.w2, p.b2, B, HIDDEN, OUTPUTS);
    softmax_crossentropy_forward(a->probs, a->loss, a->objective, a->logits, a->labels,
                                 model->smoothing, B, OUTPUTS);
}

/* The backward pass of the training forward pass just run: model->grads = d (mean objective
   over the batch) / d parameters. */
static void model_backward(Model *model, Activations *a, int B)
{
    Tensors p = tensors(model->params), g = tensors(model->grads);
    softmax_crossentropy_backward(a->dlogits, a->probs, a->labels, model->smoothing, B,
                                  OUTPUTS);
    dense_backward(a->ddropped, g.w2, g.b2, a->dlogits, a->dropped, p.w2, B, HIDDEN, OUTPUTS);
    dropout_backward(a->drelu, a->ddropped, a->keep, model->dropout_scale, B * HIDDEN);
    relu_backward(a->dhidden, a->drelu, a->hidden, B * HIDDEN);
    dense_backward(NULL, g.w1, g.b1, a->dhidden, a->input, p.w1, B, INPUTS, HIDDEN);
}

static int argmax(const float *v, int n)
{
    int best = 0;
    for (int k = 1; k < n; k++)
        best = v[k] > v[best] ? k : best;
    return best;
}

/* Glorot-uniform kernels, U(-l, l) with l = sqrt(6 / (fan_in + fan_out)), and zero biases;
   parameter i (in the model file's order) takes number i of the INIT stream. */
static void init_params(float *params, uint64_t seed)
{
    double limit1 = sqrt(6.0 / (INPUTS + HIDDEN)), limit2 = sqrt(6.0 / (HIDDEN + OUTPUTS));
    uint64_t key = stream_key(seed, STREAM_INIT);
    for (int i = 0; i < PARAM_COUNT; i++) {
        double u = 2.0 * uniform01(random_bits(key, (uint64_t)i)) - 1.0;
        int in_w1 = i < W1_SIZE, in_w2 = i >= W1_SIZE + HIDDEN && i < PARAM_COUNT - OUTPUTS;
        params[i] = in_w1 ? (float)(u * limit1) : in_w2 ? (float)(u * limit2) : 0.0f;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Model files                                                                                */

static int save_params(const char *path, const float *params)
{
    unsigned char *bytes = allocate(MODEL_BYTES, 1);
    memcpy(bytes, "MNISTMLP", 8);
    put_32(bytes + 8, 1, 0), put_32(bytes + 12, INPUTS, 0);
    put_32(bytes + 16, HIDDEN, 0), put_32(bytes + 20, OUTPUTS, 0);
    for (int i = 0; i < PARAM_COUNT; i++)
        put_32(bytes + MODEL_HEADER + 4 * i, float_bits(params[i]), 0);
    int ok = write_file(path, bytes, MODEL_BYTES);
    free(bytes);
    return ok;
}

static void load_params(const char *path, float *params)
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
        if (!isfinite(params[i] = bits_float(get_le32(bytes + MODEL_HEADER + 4 * i))))
            fail("%s: holds weights that are not finite numbers", path);
    free(bytes);
}

/* ---------------------------------------------------------------------------------------- */
/* Training                                                                                   */

/* Floating-point operations of one image's dense passes, counted as the fast program counts
   them (a multiply-add 2; an exp, divide or square root 1): layers 1 and 2 and the softmax;
   and for training, dropout, the gradients of the logits, back through W2 and dropout, the
   image's terms of dW2, db2 and db1, and of dW1. Adam: 12 per parameter and step. */
enum { FORWARD_FLOPS = 2 * INPUTS * HIDDEN + 2 * HIDDEN * OUTPUTS + 4 * OUTPUTS,
       TRAIN_FLOPS = FORWARD_FLOPS + HIDDEN + 2 * OUTPUTS + 2 * HIDDEN * OUTPUTS + HIDDEN
                     + 2 * HIDDEN * OUTPUTS + OUTPUTS + HIDDEN + 2 * INPUTS * HIDDEN,
       ADAM_FLOPS = 12 };

/* The batch: dataset images order[0..B-1] and their labels, each image warped by its own
   random map when augmenting (AUGMENT stream, draw first_draw + its place in the batch). */
static void load_batch(Activations *a, const float *pixels, const uint8_t *labels,
                       const int *order, int B, const Augment *augment, uint64_t augment_key,
                       uint64_t first_draw)
{
#pragma omp parallel for
    for (int b = 0; b < B; b++) {
        const float *image = pixels + (size_t)order[b] * INPUTS;
        float *x = a->input + (size_t)b * INPUTS, map[6];
        a->labels[b] = labels[order[b]];
        if (!augment) {
            memcpy(x, image, INPUTS * sizeof(float));
            continue;
        }
        affine_map(augment, augment_key, first_draw + (uint64_t)b, map);
        for (int y = 0; y < SIDE; y++)
            for (int col = 0; col < SIDE; col++)
                x[y * SIDE + col] = warp_pixel(image, map, col, y);
    }
}

/* Class probabilities (into probs, unless NULL), and with labels the mean plain cross-entropy
   and accuracy of n images, dropout off, a->capacity images at a time. */
static void evaluate(const Model *model, Activations *a, const float *pixels,
                     const uint8_t *labels, int n, float *probs, double *loss, double *accuracy)
{
    double loss_sum = 0.0, hits = 0.0;
    for (int first = 0; first < n; first += a->capacity) {
        int B = n - first < a->capacity ? n - first : a->capacity;
        memcpy(a->input, pixels + (size_t)first * INPUTS, (size_t)B * INPUTS * sizeof(float));
        for (int b = 0; b < B; b++) /* predict has no labels: its losses go unused */
            a->labels[b] = labels ? labels[first + b] : 0;
        model_forward(model, a, B, 0, 0);
        if (probs)
            memcpy(probs + (size_t)first * OUTPUTS, a->probs, (size_t)B * OUTPUTS * sizeof(float));
        for (int b = 0; labels && b < B; b++) /* in image order */
            loss_sum += a->loss[b],
            hits += argmax(a->logits + b * OUTPUTS, OUTPUTS) == a->labels[b];
    }
    if (labels)
        *loss = loss_sum / n, *accuracy = hits / n;
}

static int threads_used(void)
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

    Model model = {.params = allocate(PARAM_COUNT, sizeof(float)),
                   .grads = allocate(PARAM_COUNT, sizeof(float)),
                   .m = calloc(PARAM_COUNT, sizeof(float)), /* Adam starts from zero moments */
                   .v = calloc(PARAM_COUNT, sizeof(float)),
                   .dropout_rate = (float)DROPOUT_RATE,
                   .dropout_scale = (float)(1.0 / (1.0 - DROPOUT_RATE)),
                   .smoothing = (float)o->label_smoothing,
                   .dropout_key = stream_key(o->seed, STREAM_DROPOUT)};
    float *best = allocate(PARAM_COUNT, sizeof(float));
    if (!model.m || !model.v)
        fail("out of memory");
    init_params(model.params, o->seed);
    const Augment *augment = o->augment.rotation > 0 || o->augment.shift > 0 ||
                             o->augment.zoom > 0 ? &o->augment : NULL;
    uint64_t augment_key = stream_key(o->seed, STREAM_AUGMENT);
    Activations acts = make_activations(o->batch_size < n ? o->batch_size : n), val_acts = {0};
    if (val_pixels)
        val_acts = make_activations(val_n < EVAL_BATCH ? val_n : EVAL_BATCH);
    int *order = allocate((size_t)n, sizeof(int)), best_epoch = 0;
    uint64_t steps_per_epoch = ((uint64_t)n + o->batch_size - 1) / o->batch_size;
    uint64_t total_steps = steps_per_epoch * o->epochs, step = 0, flops = 0;
    double best_accuracy = -1.0, start = seconds_now();

    for (int epoch = 0; epoch < o->epochs; epoch++) {
        double epoch_start = seconds_now(), loss_sum = 0.0, hits = 0.0;
        shuffle(order, n, o->seed, epoch);
        for (int first = 0; first < n; first += o->batch_size, step++) {
            int B = n - first < o->batch_size ? n - first : o->batch_size;
            uint64_t first_draw = step * (uint64_t)o->batch_size;
            load_batch(&acts, pixels, labels, order + first, B, augment, augment_key,
                       first_draw);
            model_forward(&model, &acts, B, 1, first_draw);
            model_backward(&model, &acts, B);
            double rate = learning_rate_at(o->learning_rate, o->cosine, step, total_steps);
            adam_update(model.params, model.grads, model.m, model.v, PARAM_COUNT,
                        adam_step(rate, step));
            for (int b = 0; b < B; b++) /* in batch order */
                loss_sum += acts.loss[b],
                hits += argmax(acts.logits + b * OUTPUTS, OUTPUTS) == acts.labels[b];
            flops += (uint64_t)B * TRAIN_FLOPS + (uint64_t)ADAM_FLOPS * PARAM_COUNT;
        }
        double val_loss = 0.0, val_accuracy = 0.0;
        if (val_pixels) {
            evaluate(&model, &val_acts, val_pixels, val_labels, val_n, NULL, &val_loss,
                     &val_accuracy);
            flops += (uint64_t)val_n * FORWARD_FLOPS;
            if (o->restore_best && val_accuracy > best_accuracy) {
                best_accuracy = val_accuracy, best_epoch = epoch + 1;
                memcpy(best, model.params, PARAM_COUNT * sizeof(float));
            }
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
        memcpy(model.params, best, PARAM_COUNT * sizeof(float));
    }
    double seconds = seconds_now() - start, gflop = (double)flops * 1e-9;
    printf("train: images=%d epochs=%d seconds=%.3f executed_gflop=%.3f dense_gflop=%.3f "
           "gflops=%.2f threads=%d\n", n, o->epochs, seconds, gflop, gflop, gflop / seconds,
           threads_used());
    fflush(stdout);
    for (int i = 0; i < PARAM_COUNT; i++)
        if (!isfinite(model.params[i]))
            fail("training diverged (weights not finite), %s not written: lower "
                 "--learning-rate", o->out);
    if (!save_params(o->out, model.params))
        fail("%s: cannot write the model", o->out);
}

/* ---------------------------------------------------------------------------------------- */
/* Commands                                                                                   */

static void command_train(int argc, char **argv)
{
    static const char *const names[] = {
        "--images", "--labels", "--val-images", "--val-labels", "--out", "--epochs",
        "--batch-size", "--learning-rate", "--schedule", "--label-smoothing", "--rotation",
        "--shift", "--zoom", "--restore-best", "--seed", "--threads", NULL};
    Flags f = {"train", names, {NULL}};
    parse_flags(&f, argc, argv);
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
    const char *model_path = text_flag(&f, "--model", NULL);
    const char *images = text_flag(&f, "--images", NULL), *out = text_flag(&f, "--out", NULL);
    set_threads(&f);
    Model model = {.params = allocate(PARAM_COUNT, sizeof(float))};
    load_params(model_path, model.params);
    int n;
    float *pixels = load_images(images, &n), *probs = allocate((size_t)n * OUTPUTS, sizeof(float));
    check_writable(out);
    Activations acts = make_activations(n < EVAL_BATCH ? n : EVAL_BATCH);
    evaluate(&model, &acts, pixels, NULL, n, probs, NULL, NULL);
    if (!write_idx(out, probs, n, OUTPUTS, 1))
        fail("%s: cannot write the predictions", out);
}

/* One forward and backward pass of all the images as one batch, dropout on and drawn as in
   training step 0: writes the gradients (in a model file's layout) and the dropout mask. */
static void command_grad(int argc, char **argv)
{
    static const char *const names[] = {"--model", "--images", "--labels", "--out", "--mask",
                                        "--seed", "--dropout", "--label-smoothing", "--threads",
                                        NULL};
    Flags f = {"grad", names, {NULL}};
    parse_flags(&f, argc, argv);
    const char *model_path = text_flag(&f, "--model", NULL);
    const char *images = text_flag(&f, "--images", NULL);
    const char *labels_path = text_flag(&f, "--labels", NULL), *out = text_flag(&f, "--out", NULL);
    const char *mask_path = text_flag(&f, "--mask", NULL);
    uint64_t seed = int_flag(&f, "--seed", 42, 0, UINT64_MAX);
    double dropout = real_flag(&f, "--dropout", 0.2, fraction, "[0, 1)");
    double smoothing = real_flag(&f, "--label-smoothing", 0, fraction, "[0, 1)");
    set_threads(&f);
    Model model = {.params = allocate(PARAM_COUNT, sizeof(float)),
                   .grads = allocate(PARAM_COUNT, sizeof(float)),
                   .dropout_rate = (float)dropout, .dropout_scale = (float)(1.0 / (1.0 - dropout)),
                   .smoothing = (float)smoothing, .dropout_key = stream_key(seed, STREAM_DROPOUT)};
    load_params(model_path, model.params);
    int n;
    float *pixels = load_images(images, &n);
    uint8_t *labels = load_labels(labels_path, n, images);
    if (n > MAX_BATCH)
        fail("%s: %d images; grad takes at most %d (one batch)", images, n, MAX_BATCH);
    check_writable(out), check_writable(mask_path);

    Activations acts = make_activations(n);
    memcpy(acts.input, pixels, (size_t)n * INPUTS * sizeof(float));
    memcpy(acts.labels, labels, (size_t)n);
    model_forward(&model, &acts, n, 1, 0);
    model_backward(&model, &acts, n);
    double loss = 0.0;
    for (int b = 0; b < n; b++)
        loss += acts.objective[b];
    if (!save_params(out, model.grads))
        fail("%s: cannot write the gradients", out);
    if (!write_idx(mask_path, acts.keep, n, HIDDEN, 0)) {
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
