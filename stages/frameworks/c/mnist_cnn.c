/*
 * mnist_cnn.c: the pipeline's default convnet, trained the way Keras 3 trains it, in one C11
 * file (libc and libm; OpenMP when the compiler has it) and the mnist.h it shares with the mlp.
 *
 *     28x28x1 -> Conv 5x5 32 -> MaxPool 2 -> BatchNorm -> ReLU        (24x24 -> 12x12x32)
 *             -> Conv 5x5 64 -> MaxPool 2 -> BatchNorm -> ReLU        ( 8x8  ->  4x4x64)
 *             -> Conv 3x3 128, padded ("same") -> BatchNorm -> ReLU   (          4x4x128)
 *             -> Flatten (2,048) -> Dropout 0.3 -> Dense 10 softmax
 *
 * The convolutions have no bias (BatchNorm's beta shifts). About 4.94M multiply-adds per image.
 *
 * Build (with or without -fopenmp; either way the model file has the same bits):
 *     cc -std=c11 -O3 -march=native -ffp-contract=fast -fopenmp -o mnist_cnn \
 *        stages/frameworks/c/mnist_cnn.c -lm
 * Run:
 *     mnist_cnn train --images X.idx --labels Y.idx [--val-images VX.idx --val-labels VY.idx]
 *                     --out MODEL.bin [--epochs 24] [--batch-size 128] [--learning-rate 0.002]
 *                     [--schedule constant|cosine (cosine)] [--label-smoothing 0.1]
 *                     [--rotation 10] [--shift 0.1] [--zoom 0.1] [--restore-best 0|1 (0)]
 *                     [--ema 0] [--seed 42] [--threads 1]
 * (the defaults: the pipeline's shipped cnn recipe, params.yaml's train.cnn). --ema d > 0
 * keeps an exponential moving average of every parameter, BatchNorm's moving statistics
 * included (avg = d avg + (1 - d) p after each step; the first step copies), and validates,
 * restores and saves the average instead of the trained weights.
 *     mnist_cnn predict --model MODEL.bin --images X.idx --out P.idx [--threads 1]
 *     mnist_cnn grad --model MODEL.bin --images X.idx --labels Y.idx --out G.bin --mask M.idx
 *                    [--seed 42] [--label-smoothing 0] [--threads 1]
 * grad runs one training-mode forward and backward pass of all the images as one batch
 * (BatchNorm on the batch's statistics, dropout drawn as in training step 0) and writes, in
 * the model file's layout, the loss's gradient of every trainable array and, in each
 * BatchNorm's moving mean and variance, the batch mean and (biased) variance it used; the
 * dropout mask (uint8 idx N x 2048, 1 = kept) and `loss=L` on stdout, for gradient checks.
 * On any error: one line `mnist_cnn: error: ...` on stderr, exit status 1, no output file.
 *
 * Files. Data: MNIST's idx format as for the mlp (mnist.h). The model file is little-endian
 * and byte-stable; its arrays are Keras' cnn().get_weights(), in that order and layout:
 *     bytes 0-7   "MNISTCNN"
 *     uint32 x 5  version 1, channels 32, 64, 128, classes 10
 *     float32     conv1 [5][5][1][32] ([row][column][in][out]), bn1 gamma, beta, moving mean,
 *                 moving variance [32 each], conv2 [5][5][32][64], bn2 x 4 [64],
 *                 conv3 [3][3][64][128], bn3 x 4 [128], dense [2048][10] ([in][out], in =
 *                 (row * 4 + column) * 128 + channel), dense bias [10]     (588,484 bytes)
 *
 * The math is Keras 3's: Glorot-uniform kernels (fan in and out over the kernel's window),
 * zero bias, BatchNorm gamma 1 and beta 0 with moving statistics 0 and 1; BatchNorm in
 * training normalises by the batch's mean and biased variance over images and positions,
 * epsilon 1e-3, and moves its statistics by momentum 0.99 (new = 0.99 old + 0.01 batch); in
 * inference it uses the moving ones. Inverted dropout (keep a unit when its uniform draw
 * u >= 0.3, scale kept ones by 1/0.7); softmax cross-entropy, optionally label-smoothed,
 * averaged over the batch; a fresh Fisher-Yates shuffle per epoch, the last batch shorter;
 * Adam (beta1 0.9, beta2 0.999, epsilon 1e-7) on every trainable array every step; a
 * constant or cosine-decayed learning rate; and optional augmentation, a random rotation,
 * zoom and shift folded into one affine map and resampled bilinearly (mnist.h).
 *
 * Randomness is mnist.h's counter-based hash(seed, stream, counter). INIT: the parameter's
 * index in the model file; SHUFFLE: the epoch; DROPOUT: draw * 2048 + unit; AUGMENT:
 * draw * 5 + k; draw = step * batch_size + the image's place in its batch.
 *
 * Layout and speed. Activations are NHWC, a batch at a time: images x rows x columns x
 * channels, channels contiguous. conv2 and conv3 are each one matrix product over the whole
 * batch: as im2col rows, every output position's input window is a row (k = (row * K +
 * column) * in + channel, the kernel's own order), so with M = images x positions
 *     forward      Z [M x out]   = X [M x K] W [K x out]
 *     weights      dW^T [out x K] = dZ^T [out x M] X [M x K]   (a sum over the whole batch)
 *     inputs       dX [M x K]    = dZ [M x out] W^T [out x K], then folded back (col2im).
 * conv3 writes X out (im2col). conv2, whose X would be 25 times its input map, reads its
 * windows in the map itself, through tables of where each window and each term starts
 * (conv2_tables): its forward pass runs the micro-kernel on them in place (conv2_forward),
 * and its weight gradient packs them straight from the map.
 * All go through one register-tiled micro-kernel (gemm below): a tile of MR rows by NR = 2
 * vectors of columns (MR = 8 with AVX-512's 32 vector registers, else 6) is held in registers
 * while it runs down the shared dimension, one broadcast and two fused multiply-adds per row
 * and term, in GCC/Clang vector extensions (128-bit with SSE or NEON, 256-bit with AVX2,
 * 512-bit with AVX-512). Terms come in blocks of KC, rows in blocks of MC, so each block of A
 * stays in L2 and each panel of B in L1 while it is reused. The tile's shape orders no sum:
 * each element adds its terms in ascending order whatever the tile.
 * conv1 (25-pixel windows of one channel, and no input gradient) runs the same arithmetic on
 * the image in place: a direct forward kernel, MR positions of a row by two vectors of
 * channels, and a direct kernel for its weight gradient (conv1_forward, conv1_weight_grad).
 *
 * Threads, and why their number changes no bit. Every parallel loop hands out whole outputs:
 * a block of a product's rows (forward, dX) or a panel of its columns (dW^T), an image (im2col,
 * col2im, pooling, BatchNorm's normalising, dropout, softmax, the augmentation warp), a row of
 * the dense kernel's gradient, a range of parameters (Adam). Each output is computed by one
 * thread, in an order that only the shapes decide: every element of a product sums its terms
 * in ascending order, term by term into one fused multiply-add chain, whether a block boundary
 * falls between two terms or not (the partial sum goes to memory as a float and comes back as
 * the same float), and the edge tile of a product (rows beyond a multiple of MR) runs the same
 * kernel on zero-padded copies. The two reductions over the batch are fixed the same way:
 *   - a weight gradient is a product whose shared dimension is the batch (dW^T = dZ^T X above,
 *     and the dense kernel's, a row per thread): each element sums the images in order;
 *   - BatchNorm's statistics (mean, variance, and in the backward pass the sums of dY and of
 *     dY x-hat) are summed per image (one thread per image, positions in order), then over
 *     the images in image order, in double, by one thread.
 * No sum is split between threads, there are no atomics and no OpenMP reductions, and the
 * model file is the same for any --threads, and without OpenMP. (Compilers and CPUs may differ
 * in the last bits, as -march=native picks the instructions and the vector width. Never use
 * -ffast-math: it lets the compiler reorder sums.)
 *
 * Output. train prints after each epoch
 *     epoch E/N S.Ss loss=L accuracy=A[ val_loss=VL val_accuracy=VA]
 * (L: mean plain cross-entropy of the epoch's training images, dropout and augmentation on, no
 * smoothing; A: training hits / N; validation runs in inference mode), then one line per layer
 *     layer NAME forward_gflop=F forward_seconds=S backward_gflop=G backward_seconds=T
 * (the training steps' multiply-adds x 2 and wall time of each layer's forward and backward
 * passes; pooling, BatchNorm, ReLU and dropout go with the convolution before them), and
 *     train: images=N epochs=E seconds=T executed_gflop=X dense_gflop=X gflops=G threads=K
 * T: the training loop's wall time (validation included, file loading not); X: the multiply-
 * adds x 2 of the forward and backward passes (conv1 has no input gradient), of validation and
 * Adam's 12 operations per parameter and step; the elementwise work is left out; G = X / T.
 */
#define PROGRAM "mnist_cnn"
#include "mnist.h"
#include "vector.h"
#include <stddef.h>

enum {
    C1 = 32, C2 = 64, C3 = 128,              /* channels of the three convolutions */
    S1 = 24, P1 = 12, S2 = 8, P2 = 4, S3 = 4, /* sides: conv1, pool1, conv2, pool2, conv3 */
    K1 = 5 * 5, K2 = 5 * 5 * C1, K3 = 3 * 3 * C2, /* window lengths */
    FEATURES = S3 * S3 * C3,                  /* 2,048 */
    MAX_CNN_BATCH = 2048,                     /* buffers: about 0.6 MB per image */
    EVAL_BATCH = 256,
};
static const float DROPOUT = 0.3f, BN_EPSILON = 1e-3f, BN_MOMENTUM = 0.99f;

/* ---------------------------------------------------------------------------------------- */
/* The model                                                                                  */

/* The parameters in the model file's order; Adam's moments and the gradients share it. */
typedef struct {
    float conv1[K1 * C1], bn1[4][C1]; /* bn: gamma, beta, moving mean, moving variance */
    float conv2[K2 * C2], bn2[4][C2];
    float conv3[K3 * C3], bn3[4][C3];
    float dense[FEATURES * CLASSES], dense_bias[CLASSES];
} Params;
enum { GAMMA, BETA, MEAN, VAR };
enum { PARAM_COUNT = sizeof(Params) / sizeof(float) };              /* 147,114 */
enum { MODEL_HEADER = 28, MODEL_BYTES = MODEL_HEADER + 4 * PARAM_COUNT }; /* 588,484 */

static float *flat(Params *p) { return (float *)p; }

/* Glorot-uniform limit of a kernel with `window` inputs per output and `in`/`out` channels. */
static double glorot(int window, int in, int out) { return sqrt(6.0 / (window * (in + out))); }

static void init_params(Params *p, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    uint64_t key = stream_key(seed, STREAM_INIT);
    struct { float *w; int n; double limit; } kernels[] = {
        {p->conv1, K1 * C1, glorot(25, 1, C1)}, {p->conv2, K2 * C2, glorot(25, C1, C2)},
        {p->conv3, K3 * C3, glorot(9, C2, C3)}, {p->dense, FEATURES * CLASSES,
                                                  glorot(1, FEATURES, CLASSES)}};
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
/* Matrix products: one register-tiled micro-kernel                                           */

#if defined(__AVX512F__)
enum { VL = 16 };
#elif defined(__AVX__)
enum { VL = 8 };
#else
enum { VL = 4 };
#endif
/* VL floats, loadable from any float address (aligned(4)), aliasing float (may_alias). */
typedef float vec __attribute__((vector_size(4 * VL), aligned(4), may_alias));
/* The tile: MR rows by NR columns. AVX-512 has 32 vector registers: 16 accumulators, two of
   B and the broadcast fit; AVX2 has 16: 12 accumulators. */
#if defined(__AVX512F__)
enum { MR = 8 };
#else
enum { MR = 6 };
#endif
enum { NR = 2 * VL, KC = 256, MC = 96 };

/* c[i][j] (+)= sum over p < kc of a[i][p * ap] * b[p * bp + j], for i < MR, j < NR: the
   tile's accumulators stay in registers; each term one fused multiply-add per vector. A row
   of A is any pointer (a packed panel's, a matrix row, or a window of an activation map read
   in place), so the kernel never asks that its rows be evenly spaced. */
static inline void micro_kernel(int kc, const float *const a[MR], ptrdiff_t ap,
                                const float *restrict b, ptrdiff_t bp, float *restrict c,
                                ptrdiff_t ci, int add)
{
    vec acc[MR][2];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 2; j++)
            acc[i][j] = add ? *(const vec *)(c + i * ci + j * VL) : (vec){0};
    for (int p = 0; p < kc; p++) {
        vec b0 = *(const vec *)(b + p * bp), b1 = *(const vec *)(b + p * bp + VL);
        for (int i = 0; i < MR; i++) {
            float x = a[i][p * ap];
            acc[i][0] += x * b0;
            acc[i][1] += x * b1;
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 2; j++)
            *(vec *)(c + i * ci + j * VL) = acc[i][j];
}

/* The rows of a tile whose rows are evenly spaced: a, a + ai, a + 2 ai, ... */
static inline void spaced_rows(const float *rows[MR], const float *a, ptrdiff_t ai)
{
    for (int i = 0; i < MR; i++)
        rows[i] = a + i * ai;
}

/* The kernel on a tile of which only the first `rows` rows of c exist (the last rows of a
   product): through a full tile's copy, so the arithmetic is the full tile's. */
static void partial_tile(int kc, const float *const a[MR], ptrdiff_t ap, const float *b,
                         ptrdiff_t bp, float *c, ptrdiff_t ci, int rows, int add)
{
    float c_pad[MR * NR];
    for (int i = 0; i < rows; i++)
        memcpy(c_pad + i * NR, c + i * ci, sizeof(float) * NR);
    micro_kernel(kc, a, ap, b, bp, c_pad, NR, add);
    for (int i = 0; i < rows; i++)
        memcpy(c + i * ci, c_pad + i * NR, sizeof(float) * NR);
}

static int min_int(int a, int b) { return a < b ? a : b; }

/* A matrix operand read in place: element (r, q) is at[r * row + q * col], or, where a table
   is given, at[rows[r] + ...] and at[... + cols[q]] (the windows of an activation map, read
   as the rows or columns of an im2col matrix that is never written out). */
typedef struct { const float *at; ptrdiff_t row, col; const int *rows, *cols; } Operand;

static inline const float *element(Operand a, int r, int q)
{
    return a.at + (a.rows ? a.rows[r] : r * a.row) + (a.cols ? a.cols[q] : q * a.col);
}

/* Packs rows [r0, r0 + rows) x terms [p0, p0 + kc) of A into micro-panels of MR rows,
   term-major ([tile][p][MR], rows beyond `rows` zero), as the kernel reads them. */
static void pack_a(float *restrict out, Operand a, int r0, int rows, int p0, int kc)
{
    for (int t = 0; t < rows; t += MR) {
        int n = min_int(MR, rows - t);
        float *to = out + (size_t)t * kc;
        /* a tile's rows adjacent (the row table rises by one at each row there): MR floats a
           term */
        if (n == MR && (a.rows ? a.rows[r0 + t + MR - 1] - a.rows[r0 + t] == MR - 1
                               : a.row == 1)) {
            for (int p = 0; p < kc; p++) {
                const float *from = element(a, r0 + t, p0 + p);
                for (int i = 0; i < MR; i++)
                    to[p * MR + i] = from[i];
            }
        } else {
            for (int p = 0; p < kc; p++)
                for (int i = 0; i < MR; i++)
                    to[p * MR + i] = i < n ? *element(a, r0 + t + i, p0 + p) : 0.0f;
        }
    }
}

/* Packs B (k x n) into panels of NR columns, each term-major ([panel][p][NR]): a panel's
   block of KC terms is then KC x NR contiguous floats that stay in L1 while it is used. */
static void pack_b(float *restrict out, Operand b, int k, int n)
{
    OMP("omp parallel for schedule(static)")
    for (int jr = 0; jr < n / NR; jr++)
        for (int p = 0; p < k; p++)
            for (int j = 0; j < NR; j++)
                out[((size_t)jr * k + p) * NR + j] = b.at[p * b.row + (jr * NR + j) * b.col];
}

typedef struct {
    float *packed_b, *partial; /* scratch: k x n, and (PARTS - 1) x m x n floats */
} Scratch;

/* B is read in place, unpacked, when its rows are contiguous and at most two panels wide
   (then a panel's block of terms is KC short rows that the caches already hold well). */
static int reads_b_in_place(Operand b, int n) { return b.col == 1 && n / NR <= 2; }

enum { PARTS = 4 }; /* ranges of terms a weight gradient's product is split into */

/* C [m x n] = A [m x k] B [k x n], C row-major (ldc), n a multiple of NR, B read through
   strides only.
   The terms go in `parts` (1 or PARTS) fixed consecutive ranges: each element sums each range
   in ascending order and then the ranges' sums in order; so a product with few rows and many
   terms (a weight gradient, whose terms are the batch) still splits between threads. Threads
   take (block of MC rows, range) pairs, range by range, so that with the batch's images split
   between threads as everywhere else a thread reads the images it computed itself (a cache
   line another core holds costs a transfer, and writing it later an invalidation); every
   element of a pair is that thread's alone, and the shapes alone decide every sum's order. */
static void gemm(Scratch *scratch, int m, int n, int k, Operand a, Operand b, float *c,
                 ptrdiff_t ldc, int parts)
{
    int panels = n / NR, blocks = (m + MC - 1) / MC;
    int direct_b = reads_b_in_place(b, n);
    if (!direct_b)
        pack_b(scratch->packed_b, b, k, n);
    OMP("omp parallel for schedule(static)")
    for (int item = 0; item < blocks * parts; item++) {
        int block = item % blocks, part = item / blocks, r0 = block * MC;
        int rows = min_int(MC, m - r0), first, end;
        share(k, parts, part, &first, &end);
        float *out = part == 0 ? c : scratch->partial + (size_t)(part - 1) * m * n;
        ptrdiff_t ld = part == 0 ? ldc : n;
        /* Packing A pays when its tiles serve many panels; rows whose terms are already
           contiguous are read in place when they serve four or fewer (the forward products
           of conv1 and conv2: MR row streams the prefetcher follows). */
        int direct = a.col == 1 && !a.rows && !a.cols && panels <= 4;
        _Alignas(64) float a_packed[MC * KC];
        for (int p0 = first; p0 < end; p0 += KC) {
            int kc = min_int(KC, end - p0), add = p0 > first;
            if (!direct)
                pack_a(a_packed, a, r0, rows, p0, kc);
            else if (rows % MR)
                pack_a(a_packed, a, r0 + rows / MR * MR, rows % MR, p0, kc);
            for (int jr = 0; jr < panels; jr++) {
                const float *bp = direct_b ? b.at + (ptrdiff_t)p0 * b.row + jr * NR
                                           : scratch->packed_b + ((size_t)jr * k + p0) * NR;
                ptrdiff_t bs = direct_b ? b.row : NR;
                for (int t = 0; t < rows; t += MR) {
                    float *ct = out + (size_t)(r0 + t) * ld + jr * NR;
                    const float *tile[MR];
                    if (t + MR <= rows && direct) {
                        spaced_rows(tile, a.at + (ptrdiff_t)(r0 + t) * a.row + p0, a.row);
                        micro_kernel(kc, tile, 1, bp, bs, ct, ld, add);
                    } else if (t + MR <= rows) {
                        spaced_rows(tile, a_packed + (size_t)t * kc, 1);
                        micro_kernel(kc, tile, MR, bp, bs, ct, ld, add);
                    } else { /* the last rows of C */
                        spaced_rows(tile, a_packed + (direct ? 0 : (size_t)t * kc), 1);
                        partial_tile(kc, tile, MR, bp, bs, ct, ld, rows - t, add);
                    }
                }
            }
        }
    }
    if (parts > 1) { /* C += the other ranges' sums, in order */
        OMP("omp parallel for schedule(static)")
        for (int i = 0; i < m; i++)
            for (int part = 1; part < parts; part++)
                for (int j = 0; j < n; j++)
                    c[(size_t)i * ldc + j] +=
                        scratch->partial[((size_t)(part - 1) * m + i) * n + j];
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Layers, forward and backward side by side                                                  */

/* conv1 works on the image itself, with no im2col: its windows are 25 pixels of one channel,
   too short a product for the micro-kernel to pay, and the windows laid out as rows would
   be 25 times the image. Both kernels below are the micro-kernel's arithmetic with the
   window's pixels read in place: each output sums its 25 terms (row-major in the window) in
   ascending order in one fused multiply-add chain, as a product of the im2col rows would. */

/* conv1's forward pass on one image: z [24 x 24][32] = the 5x5 windows of x times W
   [25][32]. A tile is MR adjacent positions of a row by two vectors of channels, held in
   registers across all 25 terms (micro_kernel itself, called a row of the window at a time,
   would store and reload each tile five times). */
static void conv1_forward(const float *restrict x, const float *restrict w,
                          float *restrict z)
{
    for (int y = 0; y < S1; y++)
        for (int x0 = 0; x0 < S1; x0 += MR) /* 24: a multiple of MR */
            for (int j = 0; j < C1; j += 2 * VL) {
                vec acc[MR][2] = {{(vec){0}}};
                for (int dy = 0; dy < 5; dy++)
                    for (int dx = 0; dx < 5; dx++) {
                        const float *wp = w + (dy * 5 + dx) * C1 + j;
                        vec b0 = *(const vec *)wp, b1 = *(const vec *)(wp + VL);
                        const float *pixels = x + (y + dy) * SIDE + x0 + dx;
                        for (int i = 0; i < MR; i++) {
                            acc[i][0] += pixels[i] * b0;
                            acc[i][1] += pixels[i] * b1;
                        }
                    }
                for (int i = 0; i < MR; i++) {
                    float *out = z + ((size_t)y * S1 + x0 + i) * C1 + j;
                    *(vec *)out = acc[i][0];
                    *(vec *)(out + VL) = acc[i][1];
                }
            }
}

/* Back through 2x2 max-pooling, one input position's channels: the gradient of the pooled
   output where this position (q, 0-3 in the 2x2 window) won, else 0. */
static inline void unpool_row(int C, const float *restrict d_out, const uint8_t *restrict which,
                              int q, float *restrict dz)
{
    for (int c = 0; c < C; c++)
        dz[c] = which[c] == q ? d_out[c] : 0.0f;
}

enum { CONV1_CHUNK = 128 }; /* positions whose dZ rows (16 KB) stay in L1 while reused */

/* conv1's kernel gradient over a batch: dW [25][32] = the sum over every position m of the
   batch (images, rows, columns in order) of its window's pixels times dZ [m] [32], dZ coming
   back through the max-pooling from the pooled map's gradient d_pooled (and the winners,
   `which`) a chunk of positions at a time, so it is never written out whole. As the other
   weight gradients (gemm's `parts`), the positions go in PARTS fixed consecutive ranges a
   thread each: each element sums each range in ascending order, then the ranges' sums in
   order. A pass holds one row of the window (5 terms) by two vectors of channels in
   registers over a chunk of positions; between chunks the sums wait in memory as floats. */
static void conv1_weight_grad(const float *restrict x, const float *restrict d_pooled,
                              const uint8_t *restrict which, int images, float *restrict grad)
{
    int m_all = images * S1 * S1;
    float sums[PARTS][K1 * C1];
    OMP("omp parallel for schedule(static)")
    for (int part = 0; part < PARTS; part++) {
        int first, end;
        share(m_all, PARTS, part, &first, &end);
        float *sum = sums[part];
        for (int m0 = first; m0 < end; m0 += CONV1_CHUNK) {
            int m1 = min_int(m0 + CONV1_CHUNK, end);
            int window[CONV1_CHUNK]; /* where each position's window starts in x */
            _Alignas(64) float d_z[CONV1_CHUNK * C1];
            for (int m = m0; m < m1; m++) {
                int b = m / (S1 * S1), y = m % (S1 * S1) / S1, xx = m % S1;
                window[m - m0] = b * INPUTS + y * SIDE + xx;
                size_t pooled = (((size_t)b * P1 + y / 2) * P1 + xx / 2) * C1;
                unpool_row(C1, d_pooled + pooled, which + pooled, (y & 1) * 2 + (xx & 1),
                           d_z + (m - m0) * C1);
            }
            for (int dy = 0; dy < 5; dy++)
                for (int j = 0; j < C1; j += 2 * VL) {
                    vec acc[5][2];
                    for (int dx = 0; dx < 5; dx++)
                        for (int v = 0; v < 2; v++)
                            acc[dx][v] = m0 > first
                                             ? *(const vec *)(sum + (dy * 5 + dx) * C1 + j + v * VL)
                                             : (vec){0};
                    for (int m = m0; m < m1; m++) {
                        const float *pixels = x + window[m - m0] + dy * SIDE;
                        const float *d = d_z + (m - m0) * C1 + j;
                        vec d0 = *(const vec *)d, d1 = *(const vec *)(d + VL);
                        for (int dx = 0; dx < 5; dx++) {
                            acc[dx][0] += pixels[dx] * d0;
                            acc[dx][1] += pixels[dx] * d1;
                        }
                    }
                    for (int dx = 0; dx < 5; dx++)
                        for (int v = 0; v < 2; v++)
                            *(vec *)(sum + (dy * 5 + dx) * C1 + j + v * VL) = acc[dx][v];
                }
        }
    }
    for (int i = 0; i < K1 * C1; i++) {
        float total = sums[0][i];
        for (int part = 1; part < PARTS; part++)
            total += sums[part][i];
        grad[i] = total;
    }
}

/* conv2 reads its windows in place: a window of the 12x12x32 map is five rows of five pixels
   by 32 channels, each row a run of 160 contiguous floats. As an im2col row, position m's
   term k (the kernel's order: k = (row * 5 + column) * 32 + channel) is at
       map + windows[m] + terms[k],   windows[m] = image * 4608 + (y * 12 + x) * 32,
                                      terms[k]   = k / 160 * 384 + k % 160. */
enum { RUN2 = 5 * C1 };

static void conv2_tables(int images, int *windows, int *terms)
{
    for (int m = 0; m < images * S2 * S2; m++) {
        int b = m / (S2 * S2), at = m % (S2 * S2);
        windows[m] = b * P1 * P1 * C1 + (at / S2 * P1 + at % S2) * C1;
    }
    for (int k = 0; k < K2; k++)
        terms[k] = k / RUN2 * P1 * C1 + k % RUN2;
}

/* conv2's forward pass over the batch: z [M][64] = the windows [M][800] times W [800][64],
   the windows read in the map itself. A tile is MR positions by two vectors of channels, run
   once per row of the window (160 terms); between rows its sums wait in memory as floats, so
   each output still sums its 800 terms in the kernel's order in one fused multiply-add chain,
   as gemm does on im2col rows. Threads take blocks of MC positions. */
static void conv2_forward(const float *map, const int *windows, int m, const float *w,
                          float *z)
{
    int blocks = (m + MC - 1) / MC;
    OMP("omp parallel for schedule(static)")
    for (int block = 0; block < blocks; block++) {
        int r0 = block * MC, rows = min_int(MC, m - r0);
        for (int jr = 0; jr < C2 / NR; jr++)
            for (int dy = 0; dy < 5; dy++) {
                const float *b = w + (size_t)dy * RUN2 * C2 + jr * NR;
                for (int t = 0; t < rows; t += MR) {
                    int n = min_int(MR, rows - t);
                    const float *tile[MR]; /* past the last position: the last one again */
                    for (int i = 0; i < MR; i++)
                        tile[i] = map + windows[r0 + t + min_int(i, n - 1)] + dy * P1 * C1;
                    float *ct = z + (size_t)(r0 + t) * C2 + jr * NR;
                    if (n == MR)
                        micro_kernel(RUN2, tile, 1, b, C2, ct, C2, dy > 0);
                    else /* the last positions */
                        partial_tile(RUN2, tile, 1, b, C2, ct, C2, n, dy > 0);
                }
            }
    }
}

/* col2im: the gradient of conv2's windows added back into the 12x12x32 map, in window order. */
static void col2im2(const float *restrict col, float *restrict dx)
{
    memset(dx, 0, sizeof(float) * P1 * P1 * C1);
    for (int y = 0; y < S2; y++)
        for (int xx = 0; xx < S2; xx++, col += K2)
            for (int dy = 0; dy < 5; dy++) {
                float *to = dx + ((y + dy) * P1 + xx) * C1;
                for (int k = 0; k < 5 * C1; k++)
                    to[k] += col[dy * 5 * C1 + k];
            }
}

/* im2col of one image for conv3: 3x3 windows of the 4x4x64 map, zero outside ("same"). */
static void im2col3(const float *restrict x, float *restrict col)
{
    for (int y = 0; y < S3; y++)
        for (int xx = 0; xx < S3; xx++, col += K3)
            for (int dy = 0; dy < 3; dy++)
                for (int dx = 0; dx < 3; dx++) {
                    int sy = y + dy - 1, sx = xx + dx - 1;
                    float *to = col + (dy * 3 + dx) * C2;
                    if (sy >= 0 && sy < P2 && sx >= 0 && sx < P2)
                        memcpy(to, x + (sy * P2 + sx) * C2, sizeof(float) * C2);
                    else
                        memset(to, 0, sizeof(float) * C2);
                }
}

static void col2im3(const float *restrict col, float *restrict d_x)
{
    memset(d_x, 0, sizeof(float) * P2 * P2 * C2);
    for (int y = 0; y < S3; y++)
        for (int xx = 0; xx < S3; xx++, col += K3)
            for (int dy = 0; dy < 3; dy++)
                for (int dx = 0; dx < 3; dx++) {
                    int sy = y + dy - 1, sx = xx + dx - 1;
                    if (sy < 0 || sy >= P2 || sx < 0 || sx >= P2)
                        continue;
                    float *to = d_x + (sy * P2 + sx) * C2;
                    const float *from = col + (dy * 3 + dx) * C2;
                    for (int c = 0; c < C2; c++)
                        to[c] += from[c];
                }
}

/* 2x2 max-pooling of one side x side x channels map; `which` keeps the winner (0-3) of each
   output for the backward pass, which routes the gradient to it alone. */
static void pool_forward(const float *restrict z, int side, int channels, float *restrict out,
                         uint8_t *restrict which)
{
    int half = side / 2;
    for (int y = 0; y < half; y++)
        for (int x = 0; x < half; x++)
            for (int c = 0; c < channels; c++) {
                int o = (y * half + x) * channels + c;
                float best = z[((2 * y) * side + 2 * x) * channels + c];
                uint8_t w = 0;
                for (uint8_t q = 1; q < 4; q++) {
                    float v = z[((2 * y + (q >> 1)) * side + 2 * x + (q & 1)) * channels + c];
                    if (v > best)
                        best = v, w = q;
                }
                out[o] = best, which[o] = w;
            }
}

static void pool_backward(const float *restrict d_out, const uint8_t *restrict which, int side,
                          int channels, float *restrict dz)
{
    int half = side / 2;
    for (int y = 0; y < half; y++)
        for (int x = 0; x < half; x++)
            for (int q = 0; q < 4; q++) { /* every input written once: no clearing pass */
                unpool_row(channels, d_out + (y * half + x) * channels,
                           which + (y * half + x) * channels, q,
                           dz + ((2 * y + (q >> 1)) * side + 2 * x + (q & 1)) * channels);
            }
}

/* BatchNorm + ReLU over `images` x `positions` rows of `channels`. Training: the batch's mean
   and biased variance (written to mean/var), x-hat kept; inference: mean/var are the moving
   statistics. Sums: per image in float, then over images in order in double (the header). */
typedef struct {
    int channels, positions;
    const float *gamma, *beta;
    float *mean, *var, *inv_std; /* [channels] */
    double *partial;             /* [images][channels], scratch */
} Norm;

static void norm_sums(const Norm *n, int images, const float *z, const float *center,
                      double *total)
{
    int C = n->channels, P = n->positions;
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < images; b++) {
        float s[C3] = {0};
        const float *row = z + (size_t)b * P * C;
        for (int q = 0; q < P; q++, row += C)
            if (center)
                for (int c = 0; c < C; c++)
                    s[c] += (row[c] - center[c]) * (row[c] - center[c]);
            else
                for (int c = 0; c < C; c++)
                    s[c] += row[c];
        for (int c = 0; c < C; c++)
            n->partial[(size_t)b * C + c] = s[c];
    }
    for (int c = 0; c < C; c++)
        total[c] = 0.0;
    for (int b = 0; b < images; b++)
        for (int c = 0; c < C; c++)
            total[c] += n->partial[(size_t)b * C + c];
}

/* One position's channels: x-hat = (z - mean) inv_std, out = ReLU(x-hat gamma + beta). */
static inline void normalize_row(int C, const float *restrict z, const float *restrict mean,
                                 const float *restrict inv_std, const float *restrict gamma,
                                 const float *restrict beta, float *restrict xhat,
                                 float *restrict out)
{
    for (int c = 0; c < C; c++) {
        float x = (z[c] - mean[c]) * inv_std[c], y = x * gamma[c] + beta[c];
        xhat[c] = x;
        out[c] = y > 0.0f ? y : 0.0f;
    }
}

/* Inference: out = ReLU(z scale + shift). */
static inline void scale_row(int C, const float *restrict z, const float *restrict scale,
                             const float *restrict shift, float *restrict out)
{
    for (int c = 0; c < C; c++) {
        float y = z[c] * scale[c] + shift[c];
        out[c] = y > 0.0f ? y : 0.0f;
    }
}

static void norm_forward(const Norm *n, int images, const float *z, int training,
                         float *restrict xhat, float *restrict out)
{
    int C = n->channels, P = n->positions;
    double total[C3], count = (double)images * P;
    if (training) {
        norm_sums(n, images, z, NULL, total);
        for (int c = 0; c < C; c++)
            n->mean[c] = (float)(total[c] / count);
        norm_sums(n, images, z, n->mean, total);
        for (int c = 0; c < C; c++)
            n->var[c] = (float)(total[c] / count);
    }
    /* the per-channel values as local arrays, read through restrict pointers: the rows'
       loops then run in vectors (through the Norm's pointers the compiler would have to
       assume that a store may change them) */
    float mean[C3], inv_std[C3], gamma[C3], beta[C3], scale[C3], shift[C3];
    for (int c = 0; c < C; c++) {
        n->inv_std[c] = 1.0f / sqrtf(n->var[c] + BN_EPSILON);
        mean[c] = n->mean[c], inv_std[c] = n->inv_std[c], gamma[c] = n->gamma[c];
        beta[c] = n->beta[c];
        scale[c] = inv_std[c] * gamma[c];     /* Keras: x inv + (beta - mean inv) */
        shift[c] = beta[c] - mean[c] * scale[c];
    }
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < images; b++) {
        size_t first = (size_t)b * P * C;
        for (int q = 0; q < P; q++) {
            size_t at = first + (size_t)q * C;
            if (training)
                normalize_row(C, z + at, mean, inv_std, gamma, beta, xhat + at, out + at);
            else
                scale_row(C, z + at, scale, shift, out + at);
        }
    }
}

/* Inverted dropout of n units: kept = x / (1 - DROPOUT) where the mask keeps the unit, else 0
   (the backward pass applies the same to the gradient). */
static inline void dropout(int n, const float *restrict x, const uint8_t *restrict mask,
                           float *restrict kept)
{
    const float scale = 1.0f / (1.0f - DROPOUT);
    for (int u = 0; u < n; u++)
        kept[u] = mask[u] ? x[u] * scale : 0.0f;
}

/* One position's channels, back through ReLU: d = d where the output was positive, else 0;
   s += d and sx += d x-hat (the sums over positions, in position order). */
static inline void relu_grad_row(int C, const float *restrict out, const float *restrict xhat,
                                 float *restrict d, float *restrict s, float *restrict sx)
{
    for (int c = 0; c < C; c++) {
        float dy = out[c] > 0.0f ? d[c] : 0.0f;
        d[c] = dy;
        s[c] += dy, sx[c] += dy * xhat[c];
    }
}

/* One position's channels, back through BatchNorm: d = k (d - mean(dy) - x-hat mean(dy x-hat)). */
static inline void norm_grad_row(int C, const float *restrict xhat, const float *restrict k,
                                 const float *restrict mean_dy, const float *restrict mean_dyx,
                                 float *restrict d)
{
    for (int c = 0; c < C; c++)
        d[c] = k[c] * (d[c] - mean_dy[c] - xhat[c] * mean_dyx[c]);
}

/* Back through ReLU and BatchNorm, in place: d, the gradient of the ReLU's output, becomes
   dz, and the gradients of gamma and beta are written. dy = d where the output was positive;
   with N rows, dz = gamma inv_std (dy - sum(dy) / N - x-hat sum(dy x-hat) / N). */
static void norm_backward(const Norm *n, int images, const float *out, const float *xhat,
                          float *d, float *d_gamma, float *d_beta)
{
    int C = n->channels, P = n->positions;
    double sum_dy[C3], sum_dyx[C3], count = (double)images * P;
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < images; b++) {
        size_t first = (size_t)b * P * C;
        float s[C3] = {0}, sx[C3] = {0};
        for (int q = 0; q < P; q++) {
            size_t at = first + (size_t)q * C;
            relu_grad_row(C, out + at, xhat + at, d + at, s, sx);
        }
        for (int c = 0; c < C; c++)
            n->partial[(size_t)b * 2 * C + c] = s[c], n->partial[(size_t)b * 2 * C + C + c] = sx[c];
    }
    for (int c = 0; c < C; c++)
        sum_dy[c] = sum_dyx[c] = 0.0;
    for (int b = 0; b < images; b++)
        for (int c = 0; c < C; c++)
            sum_dy[c] += n->partial[(size_t)b * 2 * C + c],
                sum_dyx[c] += n->partial[(size_t)b * 2 * C + C + c];
    float k[C3], mean_dy[C3], mean_dyx[C3];
    for (int c = 0; c < C; c++) {
        d_gamma[c] = (float)sum_dyx[c], d_beta[c] = (float)sum_dy[c];
        k[c] = n->gamma[c] * n->inv_std[c];
        mean_dy[c] = (float)(sum_dy[c] / count), mean_dyx[c] = (float)(sum_dyx[c] / count);
    }
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < images; b++) {
        size_t first = (size_t)b * P * C;
        for (int q = 0; q < P; q++) {
            size_t at = first + (size_t)q * C;
            norm_grad_row(C, xhat + at, k, mean_dy, mean_dyx, d + at);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* The network on a batch                                                                     */

enum { CONV1, CONV2, CONV3, DENSE, LAYERS };
static const char *const LAYER_NAMES[LAYERS] = {"conv1", "conv2", "conv3", "dense"};
/* Multiply-adds per image of each layer's forward pass. */
static const double LAYER_MACS[LAYERS] = {(double)S1 * S1 * K1 * C1, (double)S2 * S2 * K2 * C2,
                                          (double)S3 * S3 * K3 * C3, (double)FEATURES * CLASSES};

typedef struct {
    float *x, *z1, *p1, *xhat1, *a1, *z2, *p2, *xhat2, *a2, *col3, *z3, *xhat3,
        *a3, *kept, *logits;              /* activations, batch-wide, NHWC */
    uint8_t *which1, *which2, *mask;
    int *windows2, terms2[K2];            /* conv2's windows in a1 (conv2_tables) */
    float *d_a3, *d_col3, *d_a2, *d_z2, *d_col2, *d_a1, *d_logits; /* gradients */
    Scratch scratch;                      /* the products' packed operands */
    float *dense_t;                       /* the dense kernel (or its gradient) transposed */
    Norm norm[3];
    double *partial;
    double seconds[LAYERS][2];            /* forward, backward wall time */
} Net;

static Net make_net(int capacity)
{
    Net t;
    memset(&t, 0, sizeof t);
    size_t n = (size_t)capacity;
#define BUFFER(name, per_image) t.name = allocate(n * (per_image), sizeof *t.name)
    BUFFER(x, INPUTS);
    BUFFER(z1, S1 * S1 * C1), BUFFER(p1, P1 * P1 * C1);
    BUFFER(xhat1, P1 * P1 * C1), BUFFER(a1, P1 * P1 * C1), BUFFER(which1, P1 * P1 * C1);
    BUFFER(z2, S2 * S2 * C2), BUFFER(p2, P2 * P2 * C2);
    BUFFER(windows2, S2 * S2);
    BUFFER(xhat2, P2 * P2 * C2), BUFFER(a2, P2 * P2 * C2), BUFFER(which2, P2 * P2 * C2);
    BUFFER(col3, S3 * S3 * K3), BUFFER(z3, FEATURES), BUFFER(xhat3, FEATURES);
    BUFFER(a3, FEATURES), BUFFER(kept, FEATURES), BUFFER(mask, FEATURES);
    BUFFER(logits, CLASSES), BUFFER(d_logits, CLASSES);
    BUFFER(d_a3, FEATURES), BUFFER(d_col3, S3 * S3 * K3);
    BUFFER(d_a2, P2 * P2 * C2), BUFFER(d_z2, S2 * S2 * C2), BUFFER(d_col2, S2 * S2 * K2);
    BUFFER(d_a1, P1 * P1 * C1);
    BUFFER(partial, 2 * C3);
#undef BUFFER
    conv2_tables(capacity, t.windows2, t.terms2);
    /* The widest B packed: conv2's dZ, or a kernel. */
    size_t widest = n * S2 * S2 * C2 > K3 * C3 ? n * S2 * S2 * C2 : K3 * C3;
    t.scratch.packed_b = allocate(widest, sizeof(float));
    t.scratch.partial = allocate((PARTS - 1) * K3 * C3, sizeof(float)); /* conv3's dW */
    t.dense_t = allocate(FEATURES * CLASSES, sizeof(float));
    int channels[3] = {C1, C2, C3}, positions[3] = {P1 * P1, P2 * P2, S3 * S3};
    for (int l = 0; l < 3; l++) {
        t.norm[l].channels = channels[l], t.norm[l].positions = positions[l];
        t.norm[l].partial = t.partial;
        t.norm[l].inv_std = allocate(C3, sizeof(float));
    }
    return t;
}

static void bind_norms(Net *t, Params *p, Params *batch_stats)
{
    float *g[3] = {p->bn1[GAMMA], p->bn2[GAMMA], p->bn3[GAMMA]};
    float *be[3] = {p->bn1[BETA], p->bn2[BETA], p->bn3[BETA]};
    float *mean[3] = {batch_stats->bn1[MEAN], batch_stats->bn2[MEAN], batch_stats->bn3[MEAN]};
    float *var[3] = {batch_stats->bn1[VAR], batch_stats->bn2[VAR], batch_stats->bn3[VAR]};
    for (int l = 0; l < 3; l++)
        t->norm[l].gamma = g[l], t->norm[l].beta = be[l], t->norm[l].mean = mean[l],
        t->norm[l].var = var[l];
}

/* Forward pass of the `images` in t->x. Training: BatchNorm on the batch's statistics (into
   `stats`' mean and variance slots), dropout with the mask in t->mask; inference: BatchNorm
   on p's moving statistics (stats == p), no dropout. Leaves the logits in t->logits. */
static void forward(Net *t, Params *p, Params *stats, int images, int training)
{
    int B = images;
    double start = seconds_now();
    bind_norms(t, p, stats);
    /* conv1 -> pool -> BatchNorm -> ReLU */
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < B; b++) {
        conv1_forward(t->x + (size_t)b * INPUTS, p->conv1, t->z1 + (size_t)b * S1 * S1 * C1);
        pool_forward(t->z1 + (size_t)b * S1 * S1 * C1, S1, C1, t->p1 + (size_t)b * P1 * P1 * C1,
                     t->which1 + (size_t)b * P1 * P1 * C1);
    }
    norm_forward(&t->norm[0], B, t->p1, training, t->xhat1, t->a1);
    double now = seconds_now();
    t->seconds[CONV1][0] += now - start, start = now;

    /* conv2 -> pool -> BatchNorm -> ReLU */
    conv2_forward(t->a1, t->windows2, B * S2 * S2, p->conv2, t->z2);
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < B; b++)
        pool_forward(t->z2 + (size_t)b * S2 * S2 * C2, S2, C2, t->p2 + (size_t)b * P2 * P2 * C2,
                     t->which2 + (size_t)b * P2 * P2 * C2);
    norm_forward(&t->norm[1], B, t->p2, training, t->xhat2, t->a2);
    now = seconds_now();
    t->seconds[CONV2][0] += now - start, start = now;

    /* conv3 (padded) -> BatchNorm -> ReLU -> dropout */
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < B; b++)
        im2col3(t->a2 + (size_t)b * P2 * P2 * C2, t->col3 + (size_t)b * S3 * S3 * K3);
    gemm(&t->scratch, B * S3 * S3, C3, K3, (Operand){t->col3, K3, 1}, (Operand){p->conv3, C3, 1},
         t->z3, C3, 1);
    norm_forward(&t->norm[2], B, t->z3, training, t->xhat3, t->a3);
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < B; b++) {
        size_t at = (size_t)b * FEATURES;
        if (training)
            dropout(FEATURES, t->a3 + at, t->mask + at, t->kept + at);
        else
            memcpy(t->kept + at, t->a3 + at, sizeof(float) * FEATURES);
    }
    now = seconds_now();
    t->seconds[CONV3][0] += now - start, start = now;

    /* dense -> logits */
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < B; b++) {
        float acc[CLASSES];
        memcpy(acc, p->dense_bias, sizeof acc);
        const float *f = t->kept + (size_t)b * FEATURES;
        for (int u = 0; u < FEATURES; u++)
            for (int j = 0; j < CLASSES; j++)
                acc[j] += f[u] * p->dense[u * CLASSES + j];
        memcpy(t->logits + (size_t)b * CLASSES, acc, sizeof acc);
    }
    t->seconds[DENSE][0] += seconds_now() - start;
}

/* Softmax probabilities of one image's logits; returns log(sum(exp(logits - max))). */
static double softmax(const float *logits, float *probs, float *max_out)
{
    float max = logits[0];
    for (int j = 1; j < CLASSES; j++)
        max = logits[j] > max ? logits[j] : max;
    double sum = 0.0;
    for (int j = 0; j < CLASSES; j++)
        sum += exp((double)logits[j] - max);
    for (int j = 0; j < CLASSES; j++)
        probs[j] = (float)(exp((double)logits[j] - max) / sum);
    *max_out = max;
    return log(sum);
}

static int argmax(const float *v)
{
    int best = 0;
    for (int j = 1; j < CLASSES; j++)
        best = v[j] > v[best] ? j : best;
    return best;
}

/* The backward pass from t->d_logits (already divided by the batch size) to every trainable
   array's gradient in g. */
static void backward(Net *t, Params *p, Params *g, int images)
{
    int B = images;
    double start = seconds_now();
    /* dense: dW[u][j] = sum over images of kept[b][u] d_logits[b][j], summed as its
       transpose dW^T[j][u] (contiguous in u, so it vectorises); a thread owns a block of 64
       u's, each element summing the images in order */
    float *dw_t = t->dense_t;
    OMP("omp parallel for schedule(static)")
    for (int u0 = 0; u0 < FEATURES; u0 += 64) {
        for (int j = 0; j < CLASSES; j++)
            memset(dw_t + j * FEATURES + u0, 0, sizeof(float) * 64);
        for (int b = 0; b < B; b++) {
            const float *f = t->kept + (size_t)b * FEATURES + u0;
            const float *d = t->d_logits + (size_t)b * CLASSES;
            for (int j = 0; j < CLASSES; j++)
                for (int u = 0; u < 64; u++)
                    dw_t[j * FEATURES + u0 + u] += f[u] * d[j];
        }
        for (int u = u0; u < u0 + 64; u++)
            for (int j = 0; j < CLASSES; j++)
                g->dense[u * CLASSES + j] = dw_t[j * FEATURES + u];
    }
    for (int j = 0; j < CLASSES; j++) {
        float acc = 0.0f;
        for (int b = 0; b < B; b++)
            acc += t->d_logits[(size_t)b * CLASSES + j];
        g->dense_bias[j] = acc;
    }
    /* d kept = d_logits W^T (W^T's rows contiguous in u), then back through dropout */
    for (int u = 0; u < FEATURES; u++)
        for (int j = 0; j < CLASSES; j++)
            t->dense_t[j * FEATURES + u] = p->dense[u * CLASSES + j];
    const float scale = 1.0f / (1.0f - DROPOUT);
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < B; b++) {
        const float *d = t->d_logits + (size_t)b * CLASSES;
        float *out = t->d_a3 + (size_t)b * FEATURES;
        const uint8_t *mask = t->mask + (size_t)b * FEATURES;
        for (int u = 0; u < FEATURES; u++)
            out[u] = 0.0f;
        for (int j = 0; j < CLASSES; j++)
            for (int u = 0; u < FEATURES; u++)
                out[u] += d[j] * t->dense_t[j * FEATURES + u];
        for (int u = 0; u < FEATURES; u++)
            out[u] = mask[u] ? out[u] * scale : 0.0f;
    }
    double now = seconds_now();
    t->seconds[DENSE][1] += now - start, start = now;

    /* conv3 */
    norm_backward(&t->norm[2], B, t->a3, t->xhat3, t->d_a3, g->bn3[GAMMA], g->bn3[BETA]);
    const float *d_z3 = t->d_a3; /* now the gradient of conv3's output */
    int M = B * S3 * S3;
    gemm(&t->scratch, K3, C3, M, (Operand){t->col3, 1, K3}, (Operand){d_z3, C3, 1}, g->conv3,
         C3, PARTS);                                                      /* dW = X^T dZ */
    gemm(&t->scratch, M, K3, C3, (Operand){d_z3, C3, 1}, (Operand){p->conv3, 1, C3},
         t->d_col3, K3, 1);                                               /* dX = dZ W^T */
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < B; b++)
        col2im3(t->d_col3 + (size_t)b * S3 * S3 * K3, t->d_a2 + (size_t)b * P2 * P2 * C2);
    now = seconds_now();
    t->seconds[CONV3][1] += now - start, start = now;

    /* conv2 */
    norm_backward(&t->norm[1], B, t->a2, t->xhat2, t->d_a2, g->bn2[GAMMA], g->bn2[BETA]);
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < B; b++)
        pool_backward(t->d_a2 + (size_t)b * P2 * P2 * C2, t->which2 + (size_t)b * P2 * P2 * C2,
                      S2, C2, t->d_z2 + (size_t)b * S2 * S2 * C2);
    M = B * S2 * S2;
    gemm(&t->scratch, K2, C2, M, (Operand){t->a1, .rows = t->terms2, .cols = t->windows2},
         (Operand){t->d_z2, C2, 1}, g->conv2, C2, PARTS);           /* dW = X^T dZ */
    gemm(&t->scratch, M, K2, C2, (Operand){t->d_z2, C2, 1}, (Operand){p->conv2, 1, C2},
         t->d_col2, K2, 1);                                           /* dX = dZ W^T */
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < B; b++)
        col2im2(t->d_col2 + (size_t)b * S2 * S2 * K2, t->d_a1 + (size_t)b * P1 * P1 * C1);
    now = seconds_now();
    t->seconds[CONV2][1] += now - start, start = now;

    /* conv1: the kernel's gradient only */
    norm_backward(&t->norm[0], B, t->a1, t->xhat1, t->d_a1, g->bn1[GAMMA], g->bn1[BETA]);
    conv1_weight_grad(t->x, t->d_a1, t->which1, B, g->conv1);
    t->seconds[CONV1][1] += seconds_now() - start;
}

/* ---------------------------------------------------------------------------------------- */
/* Training and evaluation                                                                    */

typedef struct {
    const float *pixels;
    const uint8_t *labels;
    int batch_size;
    double label_smoothing;
    uint64_t dropout_key, augment_key;
    const Augment *augment; /* NULL: off */
    Params *p, *grads, *stats, *adam_m, *adam_v;
    Net net;
    double *loss, *objective; /* per image of the batch: plain and smoothed cross-entropy */
    int *hit;
} Trainer;

/* The trainable arrays as [first, end) ranges of the flat parameters (not the moving stats). */
static int trainable_ranges(int ranges[][2])
{
#define RANGE(member, count) ranges[n][0] = (int)(offsetof(Params, member) / sizeof(float)), \
                             ranges[n][1] = ranges[n][0] + (count), n++
    int n = 0; /* gamma and beta are adjacent rows, the dense kernel and bias adjacent arrays */
    RANGE(conv1, K1 * C1), RANGE(bn1, 2 * C1), RANGE(conv2, K2 * C2), RANGE(bn2, 2 * C2);
    RANGE(conv3, K3 * C3), RANGE(bn3, 2 * C3), RANGE(dense, FEATURES * CLASSES + CLASSES);
#undef RANGE
    return n;
}

static void adam(Trainer *t, const AdamStep *s)
{
    int ranges[8][2], count = trainable_ranges(ranges);
    float *w = flat(t->p), *g = flat(t->grads), *m = flat(t->adam_m), *v = flat(t->adam_v);
    for (int r = 0; r < count; r++) {
        int first = ranges[r][0], n = ranges[r][1] - first;
        OMP("omp parallel for schedule(static)")
        for (int chunk = 0; chunk < (n + 1023) / 1024; chunk++) {
            int i0 = first + chunk * 1024, len = min_int(1024, first + n - i0);
            float root[1024];
            for (int i = i0; i < i0 + len; i++) {
                m[i] += (g[i] - m[i]) * s->one_minus_beta1;
                v[i] += (g[i] * g[i] - v[i]) * s->one_minus_beta2;
            }
            square_roots(root, v + i0, len);
            for (int i = 0; i < len; i++)
                w[i0 + i] -= s->lr_t * m[i0 + i] / (root[i] + s->epsilon);
        }
    }
}

/* `ema`: avg = decay avg + (1 - decay) p over every parameter (decay 0: a copy). */
static void average_into(Params *avg, const Params *p, float decay)
{
    float *a = flat(avg);
    const float *w = flat((Params *)p);
    OMP("omp parallel for schedule(static)")
    for (int i = 0; i < PARAM_COUNT; i++)
        a[i] = decay * a[i] + (1.0f - decay) * w[i];
}

/* The moving statistics move towards the batch's. */
static void move_statistics(Params *p, const Params *batch)
{
    float *moving[3][2] = {{p->bn1[MEAN], p->bn1[VAR]}, {p->bn2[MEAN], p->bn2[VAR]},
                           {p->bn3[MEAN], p->bn3[VAR]}};
    const float *now[3][2] = {{batch->bn1[MEAN], batch->bn1[VAR]},
                              {batch->bn2[MEAN], batch->bn2[VAR]},
                              {batch->bn3[MEAN], batch->bn3[VAR]}};
    int widths[3] = {C1, C2, C3};
    for (int l = 0; l < 3; l++)
        for (int s = 0; s < 2; s++)
            for (int c = 0; c < widths[l]; c++)
                moving[l][s][c] =
                    moving[l][s][c] * BN_MOMENTUM + now[l][s][c] * (1.0f - BN_MOMENTUM);
}

/* One step on the images order[0..batch-1]: the batch in, forward, loss, backward; Adam
   when s is given (grad passes NULL). */
static void train_step(Trainer *t, const int *order, int batch, uint64_t step, const AdamStep *s)
{
    Net *net = &t->net;
    double smooth = t->label_smoothing;
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < batch; b++) {
        uint64_t draw = step * (uint64_t)t->batch_size + (uint64_t)b;
        const float *image = t->pixels + (size_t)order[b] * INPUTS;
        float *x = net->x + (size_t)b * INPUTS;
        if (t->augment) {
            float map[6];
            affine_map(t->augment, t->augment_key, draw, map);
            for (int y = 0; y < SIDE; y++)
                for (int xx = 0; xx < SIDE; xx++)
                    x[y * SIDE + xx] = warp_pixel(image, map, xx, y);
        } else {
            memcpy(x, image, sizeof(float) * INPUTS);
        }
        uint8_t *mask = net->mask + (size_t)b * FEATURES;
        for (int u = 0; u < FEATURES; u++)
            mask[u] = uniform01(random_bits(t->dropout_key, draw * FEATURES + (uint64_t)u)) >=
                      DROPOUT;
    }
    forward(net, t->p, t->stats, batch, 1);
    OMP("omp parallel for schedule(static)")
    for (int b = 0; b < batch; b++) {
        const float *logits = net->logits + (size_t)b * CLASSES;
        float probs[CLASSES], max;
        double lse = softmax(logits, probs, &max);
        int label = t->labels[order[b]];
        double objective = 0.0;
        for (int j = 0; j < CLASSES; j++) {
            double target = (j == label ? 1.0 - smooth : 0.0) + smooth / CLASSES;
            objective -= target * ((double)logits[j] - max - lse);
            net->d_logits[(size_t)b * CLASSES + j] = (float)((probs[j] - target) / batch);
        }
        t->loss[b] = lse - ((double)logits[label] - max), t->objective[b] = objective;
        t->hit[b] = argmax(logits) == label;
    }
    backward(net, t->p, t->grads, batch);
    if (s) {
        adam(t, s);
        move_statistics(t->p, t->stats);
    }
}

static uint64_t forward_flops(void)
{
    double macs = 0;
    for (int l = 0; l < LAYERS; l++)
        macs += LAYER_MACS[l];
    return (uint64_t)(2 * macs);
}

/* Multiply-adds x 2 of one training image: forward, and backward (weights and inputs; conv1
   has no input gradient). */
static uint64_t train_flops(void)
{
    return 3 * forward_flops() - (uint64_t)(2 * LAYER_MACS[CONV1]);
}

enum { ADAM_FLOPS = 12 };

/* Probabilities (if probs), mean plain cross-entropy and accuracy (if labels) of n images in
   inference mode, EVAL_BATCH at a time. */
static void evaluate(Net *net, Params *p, const float *pixels, int n, const uint8_t *labels,
                     float *probs, double *loss_out, double *accuracy_out)
{
    double loss = 0.0, hits = 0.0;
    for (int first = 0; first < n; first += EVAL_BATCH) {
        int batch = min_int(EVAL_BATCH, n - first);
        memcpy(net->x, pixels + (size_t)first * INPUTS, sizeof(float) * INPUTS * batch);
        forward(net, p, p, batch, 0);
        for (int b = 0; b < batch; b++) { /* in image order */
            float pr[CLASSES], max;
            const float *logits = net->logits + (size_t)b * CLASSES;
            double lse = softmax(logits, pr, &max);
            if (probs)
                memcpy(probs + (size_t)(first + b) * CLASSES, pr, sizeof pr);
            if (labels)
                loss += lse - ((double)logits[labels[first + b]] - max),
                    hits += argmax(logits) == labels[first + b];
        }
    }
    if (labels)
        *loss_out = loss / n, *accuracy_out = hits / n;
}

static Trainer make_trainer(Params *p, const float *pixels, const uint8_t *labels,
                            int batch_size, uint64_t seed, double smoothing, const Augment *aug)
{
    Trainer t;
    memset(&t, 0, sizeof t);
    t.p = p, t.pixels = pixels, t.labels = labels, t.batch_size = batch_size;
    t.label_smoothing = smoothing, t.augment = aug;
    t.dropout_key = stream_key(seed, STREAM_DROPOUT);
    t.augment_key = stream_key(seed, STREAM_AUGMENT);
    t.grads = calloc(1, sizeof(Params)), t.stats = calloc(1, sizeof(Params));
    t.loss = allocate((size_t)batch_size, sizeof(double));
    t.objective = allocate((size_t)batch_size, sizeof(double));
    t.hit = allocate((size_t)batch_size, sizeof(int));
    if (!t.grads || !t.stats)
        fail("out of memory");
    t.net = make_net(batch_size > EVAL_BATCH ? batch_size : EVAL_BATCH);
    return t;
}

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
    Params *params = allocate(1, sizeof(Params)), *best = allocate(1, sizeof(Params));
    Params *average = o->ema > 0 ? allocate(1, sizeof(Params)) : NULL;
    Params *kept = average ? average : params; /* what is validated, restored and saved */
    init_params(params, o->seed);
    Trainer t = make_trainer(params, pixels, labels, o->batch_size, o->seed,
                             o->label_smoothing, augmenting ? aug : NULL);
    t.adam_m = calloc(1, sizeof(Params)), t.adam_v = calloc(1, sizeof(Params));
    if (!t.adam_m || !t.adam_v)
        fail("out of memory");
    int *order = allocate((size_t)n, sizeof(int)), best_epoch = 0, ranges[8][2];
    int trainable = 0, range_count = trainable_ranges(ranges);
    for (int r = 0; r < range_count; r++)
        trainable += ranges[r][1] - ranges[r][0];
    uint64_t steps_per_epoch = ((uint64_t)n + o->batch_size - 1) / o->batch_size;
    uint64_t total_steps = steps_per_epoch * o->epochs, step = 0, flops = 0;
    double best_accuracy = -1.0, start = seconds_now();
    for (int epoch = 0; epoch < o->epochs; epoch++) {
        double epoch_start = seconds_now(), loss_sum = 0.0, hits = 0.0;
        shuffle(order, n, o->seed, epoch);
        for (int first = 0; first < n; first += o->batch_size, step++) {
            int batch = min_int(n - first, o->batch_size);
            AdamStep s = adam_step(learning_rate_at(o->learning_rate, o->cosine, step,
                                                    total_steps), step);
            train_step(&t, order + first, batch, step, &s);
            if (average)
                average_into(average, params, step == 0 ? 0.0f : (float)o->ema);
            for (int b = 0; b < batch; b++) /* in batch order, so these sums are fixed too */
                loss_sum += t.loss[b], hits += t.hit[b];
            flops += (uint64_t)batch * train_flops() + (uint64_t)ADAM_FLOPS * trainable;
        }
        double val_loss = 0.0, val_accuracy = 0.0;
        if (val_pixels) {
            evaluate(&t.net, kept, val_pixels, val_n, val_labels, NULL, &val_loss,
                     &val_accuracy);
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
    double images = (double)n * o->epochs;
    for (int l = 0; l < LAYERS; l++) {
        double backward_macs = l == CONV1 ? LAYER_MACS[l] : 2 * LAYER_MACS[l];
        printf("layer %s forward_gflop=%.3f forward_seconds=%.3f backward_gflop=%.3f "
               "backward_seconds=%.3f\n", LAYER_NAMES[l], 2e-9 * LAYER_MACS[l] * images,
               t.net.seconds[l][0], 2e-9 * backward_macs * images, t.net.seconds[l][1]);
    }
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
    /* The defaults: params.yaml's train.cnn (its validation split is the stage's). */
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
    Net net = make_net(EVAL_BATCH);
    evaluate(&net, p, pixels, n, NULL, probs, NULL, NULL);
    if (!write_idx(out, probs, n, CLASSES, 1))
        fail("%s: cannot write the predictions", out);
}

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
    Params *p = allocate(1, sizeof(Params));
    load_params(model, p);
    int n;
    float *pixels = load_images(images, &n);
    uint8_t *labels = load_labels(labels_path, n, images);
    if (n > MAX_CNN_BATCH)
        fail("%s: %d images; grad takes at most %d (one batch)", images, n, MAX_CNN_BATCH);
    check_writable(out), check_writable(mask_path);

    /* All n images as one batch of size n, drawn as training step 0. */
    Trainer t = make_trainer(p, pixels, labels, n, seed, smoothing, NULL);
    int *order = allocate((size_t)n, sizeof(int));
    for (int i = 0; i < n; i++)
        order[i] = i;
    train_step(&t, order, n, 0, NULL);
    double loss = 0.0;
    for (int b = 0; b < n; b++)
        loss += t.objective[b];
    /* The batch statistics go where the moving ones are. */
    memcpy(t.grads->bn1[MEAN], t.stats->bn1[MEAN], sizeof(float) * 2 * C1);
    memcpy(t.grads->bn2[MEAN], t.stats->bn2[MEAN], sizeof(float) * 2 * C2);
    memcpy(t.grads->bn3[MEAN], t.stats->bn3[MEAN], sizeof(float) * 2 * C3);
    if (!save_params(out, t.grads))
        fail("%s: cannot write the gradients", out);
    if (!write_idx(mask_path, t.net.mask, n, FEATURES, 0)) {
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
