/*
 * mnist_mlp.c: the classic MNIST multilayer perceptron, trained as Keras 3 trains it, in one
 * C11 file (libc and libm; OpenMP if the compiler has it).
 *
 *     784 pixels -> Dense 128 ReLU -> Dropout 0.2 -> Dense 10 softmax, Adam, cross-entropy
 *
 * Build (with or without -fopenmp; the model file is the same bits either way):
 *     cc -std=c11 -O3 -march=native -fopenmp -o mnist_mlp stages/c/mnist_mlp.c -lm
 *
 * Run:
 *     mnist_mlp train --images X.idx --labels Y.idx [--val-images VX.idx --val-labels VY.idx]
 *                     --out MODEL.bin [--epochs 5] [--batch-size 32] [--learning-rate 0.001]
 *                     [--schedule constant|cosine] [--label-smoothing 0] [--rotation 0]
 *                     [--shift 0] [--zoom 0] [--restore-best 0|1] [--seed 42] [--threads 1]
 *     mnist_mlp predict --model MODEL.bin --images X.idx --out P.idx [--threads 1]
 *     mnist_mlp grad --model MODEL.bin --images X.idx --labels Y.idx --out G.bin --mask M.idx
 *                    [--seed 42] [--dropout 0.2] [--label-smoothing 0] [--threads 1]
 * `grad` does one forward and backward pass of all the images as one batch (dropout on, as in
 * training step 0) and writes the gradients in the model file's layout, the dropout mask
 * (uint8 idx N x 128, 1 = kept) and `loss=...` on stdout: the raw material of a gradient check.
 * Any error prints one line `mnist_mlp: error: ...` on stderr, exits with status 1 and leaves
 * no output file behind.
 *
 * Files. Data are MNIST's own idx format: a big-endian header (two zero bytes, a type byte,
 * 0x08 uint8 or 0x0D float32, the number of dimensions, one uint32 per dimension), then the
 * values in C order, big-endian. Images: 0x00000D03, N x 28 x 28 float32 in [0, 1]. Labels:
 * 0x00000801, N uint8 in 0..9. `predict` writes 0x00000D02, N x 10 float32 probabilities.
 * The model file is little-endian, and the same weights always give the same bytes:
 *     bytes 0-7   "MNISTMLP"
 *     uint32 x 4  version 1, inputs 784, hidden 128, outputs 10
 *     float32     W1[784][128]  ([input][hidden], Keras' Dense kernel layout), b1[128],
 *                 W2[128][10]   ([hidden][output]), b2[10]          (407,104 bytes in all)
 *
 * The math is Keras 3's: Glorot-uniform kernels and zero biases; inverted dropout (keep a
 * unit when its uniform draw u >= rate, scale kept ones by 1/(1-rate)); softmax cross-entropy
 * with optional label smoothing, averaged over the batch; a fresh Fisher-Yates shuffle each
 * epoch with a shorter last batch; Adam (beta1 0.9, beta2 0.999, epsilon 1e-7) applied to
 * every parameter every step; a constant or cosine-decayed learning rate; and optional
 * augmentation: a random rotation, zoom and shift folded into one affine map, resampled
 * bilinearly with zero padding.
 *
 * Randomness is counter-based: every random number is a pure function of (seed, stream,
 * counter), the splitmix64 mixer applied to a key made from seed and stream plus the counter.
 * Streams and counters: INIT, the parameter's index in the model file; SHUFFLE, the epoch
 * (seeding a sequential splitmix64 generator that drives Fisher-Yates); DROPOUT,
 * draw * 128 + hidden unit; AUGMENT, draw * 5 + k for the map's five draws; where draw =
 * step * batch_size + the image's place in its batch. A uniform in [0, 1) is the top 24 bits
 * times 2^-24. No number depends on which thread draws it or in which order.
 *
 * Threads, and why their number never changes a bit. Each step is one OpenMP parallel region
 * of two phases split by one barrier. Phase A gives each thread whole images: the forward and
 * backward pass of an image through to the gradient at layer 1's output touch nothing of the
 * other images. Phase B gives each thread whole rows of parameters (rows of W1 by input pixel,
 * rows of W2 by hidden unit; thread 0 also takes b1 and b2): it sums each gradient entry over
 * the batch's images in batch order and applies Adam to its rows. So every number is computed
 * by exactly one thread, in an order fixed by the data, never by the thread count: no sum is
 * split between threads, there are no atomics, no cross-thread reductions, and the model file
 * is identical for any --threads. (Bits may differ between compilers or CPUs, as -march=native
 * picks the instructions; do not build with -ffast-math, which lets the compiler reorder sums.)
 *
 * Speed. About 81% of MNIST's pixels are 0, so an image is kept as its list of nonzero pixels
 * (index, value), built once (or per step for augmented images). Layer 1's forward pass is
 * then h = b1 + sum over nonzero pixels p of x_p * W1[p][:] (W1's rows are contiguous, so the
 * inner loop over 128 hidden units vectorises), and its weight gradient only has nonzero rows
 * for pixels some image of the batch has: phase B regroups the batch's lists by pixel
 * ("buckets") and sums x_p * dh[b][:] per pixel, feeding each row straight into Adam.
 *
 * Output. train prints after each epoch
 *     epoch E/N S.Ss loss=L accuracy=A[ val_loss=VL val_accuracy=VA]
 * (loss: mean plain cross-entropy of the epoch's training images, with dropout and
 * augmentation on, no smoothing; accuracy: training hits / N; validation with dropout off)
 * and at the end
 *     train: images=N epochs=E seconds=T executed_gflop=X dense_gflop=D gflops=G threads=K
 * T is the training loop's wall time (validation included, file loading not). X counts the
 * floating-point operations of the forward, backward and Adam passes the program performed
 * (validation forwards included; a multiply-add is 2, exp/sqrt/divide 1), exactly, from the
 * nonzero counts; D is what the same passes take on dense 784-pixel images; G = X / T.
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__) || defined(__SSE2__)
#include <immintrin.h>
#endif

enum { SIDE = 28, INPUTS = SIDE * SIDE, HIDDEN = 128, OUTPUTS = 10 };
enum { MAX_IMAGES = 1000000, MAX_THREADS = 256 };
#define PARAM_COUNT (INPUTS * HIDDEN + HIDDEN + HIDDEN * OUTPUTS + OUTPUTS) /* 101,770 */
#define MODEL_HEADER_BYTES 24
#define MODEL_FILE_BYTES (MODEL_HEADER_BYTES + 4 * PARAM_COUNT) /* 407,104 */
static const double PI = 3.14159265358979323846;

/* ---------------------------------------------------------------------------------------- */
/* Errors, memory, clocks                                                                     */

static _Noreturn void fail(const char *format, ...)
{
    va_list args;
    fflush(stdout);
    fputs("mnist_mlp: error: ", stderr);
    va_start(args, format);
    vfprintf(stderr, format, args);
    va_end(args);
    fputc('\n', stderr);
    exit(1);
}

/* count * size bytes aligned to a cache line (so rows of 128 floats never straddle two). */
static void *allocate(size_t count, size_t size)
{
    if (size != 0 && count > SIZE_MAX / size - 64)
        fail("out of memory (%zu x %zu bytes)", count, size);
    size_t bytes = (count * size + 63) / 64 * 64;
    void *p = aligned_alloc(64, bytes ? bytes : 64);
    if (!p)
        fail("out of memory (%zu bytes)", bytes);
    return p;
}

static double seconds_now(void)
{
    struct timespec t;
    timespec_get(&t, TIME_UTC);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static int thread_index(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int thread_count(void)
{
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* Part `part` of `parts` equal contiguous shares of 0..n-1. */
static void share(int n, int parts, int part, int *begin, int *end)
{
    *begin = (int)((int64_t)n * part / parts);
    *end = (int)((int64_t)n * (part + 1) / parts);
}

/* ---------------------------------------------------------------------------------------- */
/* Randomness: pure functions of (seed, stream, counter)                                     */

enum { STREAM_INIT = 1, STREAM_SHUFFLE = 2, STREAM_DROPOUT = 3, STREAM_AUGMENT = 4 };
#define GOLDEN 0x9E3779B97F4A7C15u

static uint64_t mix64(uint64_t z) /* splitmix64's finaliser */
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

/* The counter-th output of a splitmix64 sequence whose start is keyed by seed and stream.
   Inlined, the key is loop-invariant, so a loop over counters costs one mix per number. */
static inline uint64_t random_bits(uint64_t seed, uint64_t stream, uint64_t counter)
{
    uint64_t key = mix64(mix64(seed + GOLDEN) ^ stream);
    return mix64(key + (counter + 1) * GOLDEN);
}

static inline float uniform01(uint64_t bits) { return (float)(bits >> 40) * 0x1p-24f; }

/* Epoch `epoch`'s order of the n training images: Fisher-Yates driven by a sequential
   splitmix64 generator (the modulo's bias is below n / 2^64). */
static void shuffle(int *order, int n, uint64_t seed, int epoch)
{
    uint64_t state = random_bits(seed, STREAM_SHUFFLE, (uint64_t)epoch);
    for (int i = 0; i < n; i++)
        order[i] = i;
    for (int i = n - 1; i > 0; i--) {
        state += GOLDEN;
        int j = (int)(mix64(state) % (uint64_t)(i + 1));
        int t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Files: idx data and the model                                                              */

static uint32_t get_be32(const unsigned char *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static void put_be32(unsigned char *b, uint32_t v)
{
    b[0] = (unsigned char)(v >> 24), b[1] = (unsigned char)(v >> 16);
    b[2] = (unsigned char)(v >> 8), b[3] = (unsigned char)v;
}

static uint32_t get_le32(const unsigned char *b)
{
    return (uint32_t)b[3] << 24 | (uint32_t)b[2] << 16 | (uint32_t)b[1] << 8 | b[0];
}

static void put_le32(unsigned char *b, uint32_t v)
{
    b[0] = (unsigned char)v, b[1] = (unsigned char)(v >> 8);
    b[2] = (unsigned char)(v >> 16), b[3] = (unsigned char)(v >> 24);
}

static uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Opens a file for reading and returns its size, checked before anything is allocated. */
static FILE *open_input(const char *path, long *size)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        fail("%s: cannot open (%s)", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0 || (*size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0)
        fail("%s: cannot read its size (not a regular file?)", path);
    return f;
}

static void read_exact(FILE *f, void *buffer, size_t bytes, const char *path)
{
    if (fread(buffer, 1, bytes, f) != bytes)
        fail("%s: read error", path);
}

/* Reads an idx file of `dims` dimensions whose first is N (1..MAX_IMAGES) and whose others
   must equal tail[]; checks the magic and that the file is exactly as long as the header
   implies. Returns the payload (N * item_bytes bytes per tail element) and sets *count. */
static unsigned char *read_idx(const char *path, uint32_t magic, const char *what, int dims,
                               const uint32_t *tail, size_t item_bytes, int *count)
{
    long size;
    FILE *f = open_input(path, &size);
    unsigned char head[16];
    size_t head_bytes = 4 + 4 * (size_t)dims;
    if (size < (long)head_bytes)
        fail("%s: %ld bytes, too short for an idx header", path, size);
    read_exact(f, head, head_bytes, path);
    if (get_be32(head) != magic)
        fail("%s: bad idx magic 0x%08lX, expected 0x%08lX (%s)", path,
             (unsigned long)get_be32(head), (unsigned long)magic, what);
    uint32_t n = get_be32(head + 4);
    if (n < 1 || n > MAX_IMAGES)
        fail("%s: header says %lu items; expected 1 to %d", path, (unsigned long)n, MAX_IMAGES);
    uint64_t payload = n * (uint64_t)item_bytes;
    for (int d = 1; d < dims; d++) {
        if (get_be32(head + 4 + 4 * d) != tail[d - 1])
            fail("%s: dimension %d is %lu, expected %lu (%s)", path, d + 1,
                 (unsigned long)get_be32(head + 4 + 4 * d), (unsigned long)tail[d - 1], what);
        payload *= tail[d - 1];
    }
    if ((uint64_t)size != head_bytes + payload)
        fail("%s: %ld bytes, but its header implies %llu", path, size,
             (unsigned long long)(head_bytes + payload));
    unsigned char *data = allocate((size_t)payload, 1);
    read_exact(f, data, (size_t)payload, path);
    fclose(f);
    *count = (int)n;
    return data;
}

/* N x 28 x 28 float32 images -> N * 784 host floats, all finite. */
static float *load_images(const char *path, int *count)
{
    static const uint32_t tail[2] = {SIDE, SIDE};
    float *pixels = (float *)read_idx(path, 0x00000D03, "float32 images N x 28 x 28", 3, tail,
                                      4, count);
    unsigned char *raw = (unsigned char *)pixels; /* converted in place, 4 bytes at a time */
    for (size_t i = 0; i < (size_t)*count * INPUTS; i++) {
        pixels[i] = bits_float(get_be32(raw + 4 * i));
        if (!isfinite(pixels[i]))
            fail("%s: pixel %zu of image %zu is not a finite number", path, i % INPUTS,
                 i / INPUTS);
    }
    return pixels;
}

static uint8_t *load_labels(const char *path, int expected_count, const char *images_path)
{
    int count;
    uint8_t *labels = read_idx(path, 0x00000801, "uint8 labels", 1, NULL, 1, &count);
    if (count != expected_count)
        fail("%s: %d labels for the %d images of %s", path, count, expected_count, images_path);
    for (int i = 0; i < count; i++)
        if (labels[i] > 9)
            fail("%s: label %d of image %d; labels are 0 to 9", path, labels[i], i);
    return labels;
}

/* Fails early (before any training) if `path` cannot be written, without truncating it. */
static void check_writable(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f) {
        fclose(f);
        if (!(f = fopen(path, "r+b")))
            fail("%s: cannot write (%s)", path, strerror(errno));
        fclose(f);
    } else {
        if (!(f = fopen(path, "wb")))
            fail("%s: cannot write (%s)", path, strerror(errno));
        fclose(f);
        remove(path);
    }
}

/* Writes bytes to path; on any failure removes what was written and returns 0. */
static int write_file(const char *path, const unsigned char *bytes, size_t size)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return 0;
    int ok = fwrite(bytes, 1, size, f) == size;
    ok = (fclose(f) == 0) && ok;
    if (!ok)
        remove(path);
    return ok;
}

/* An idx file of n rows of `width` values: float32 (big-endian) or uint8. */
static unsigned char *encode_idx(const void *values, int n, int width, int is_float, size_t *size)
{
    size_t count = (size_t)n * width, item = is_float ? 4 : 1;
    unsigned char *out = allocate(12 + count * item, 1);
    put_be32(out, is_float ? 0x00000D02 : 0x00000802);
    put_be32(out + 4, (uint32_t)n);
    put_be32(out + 8, (uint32_t)width);
    for (size_t i = 0; i < count; i++) {
        if (is_float)
            put_be32(out + 12 + 4 * i, float_bits(((const float *)values)[i]));
        else
            out[12 + i] = ((const uint8_t *)values)[i];
    }
    *size = 12 + count * item;
    return out;
}

/* The network's parameters (also the layout of Adam's moments and of the gradients). */
typedef struct {
    float w1[INPUTS * HIDDEN];  /* [input][hidden] */
    float b1[HIDDEN];
    float w2[HIDDEN * OUTPUTS]; /* [hidden][output] */
    float b2[OUTPUTS];
} Params;

/* The four arrays in file order. */
static int param_arrays(Params *p, float **arrays, int *sizes)
{
    arrays[0] = p->w1, sizes[0] = INPUTS * HIDDEN;
    arrays[1] = p->b1, sizes[1] = HIDDEN;
    arrays[2] = p->w2, sizes[2] = HIDDEN * OUTPUTS;
    arrays[3] = p->b2, sizes[3] = OUTPUTS;
    return 4;
}

static int save_params(const char *path, Params *p)
{
    unsigned char *bytes = allocate(MODEL_FILE_BYTES, 1), *at = bytes + MODEL_HEADER_BYTES;
    memcpy(bytes, "MNISTMLP", 8);
    put_le32(bytes + 8, 1), put_le32(bytes + 12, INPUTS);
    put_le32(bytes + 16, HIDDEN), put_le32(bytes + 20, OUTPUTS);
    float *arrays[4];
    int sizes[4];
    for (int a = 0, n = param_arrays(p, arrays, sizes); a < n; a++)
        for (int i = 0; i < sizes[a]; i++, at += 4)
            put_le32(at, float_bits(arrays[a][i]));
    int ok = write_file(path, bytes, MODEL_FILE_BYTES);
    free(bytes);
    return ok;
}

static void load_params(const char *path, Params *p)
{
    long size;
    FILE *f = open_input(path, &size);
    unsigned char head[MODEL_HEADER_BYTES];
    if (size >= MODEL_HEADER_BYTES)
        read_exact(f, head, MODEL_HEADER_BYTES, path);
    if (size < MODEL_HEADER_BYTES || memcmp(head, "MNISTMLP", 8) != 0)
        fail("%s: not a model file of this program (no MNISTMLP header)", path);
    if (get_le32(head + 8) != 1 || get_le32(head + 12) != INPUTS ||
        get_le32(head + 16) != HIDDEN || get_le32(head + 20) != OUTPUTS)
        fail("%s: version %lu, sizes %lu/%lu/%lu; expected version 1, sizes 784/128/10", path,
             (unsigned long)get_le32(head + 8), (unsigned long)get_le32(head + 12),
             (unsigned long)get_le32(head + 16), (unsigned long)get_le32(head + 20));
    if (size != MODEL_FILE_BYTES)
        fail("%s: %ld bytes; a model file has %d", path, size, MODEL_FILE_BYTES);
    unsigned char *bytes = allocate(4 * PARAM_COUNT, 1), *at = bytes;
    read_exact(f, bytes, 4 * PARAM_COUNT, path);
    fclose(f);
    float *arrays[4];
    int sizes[4];
    for (int a = 0, n = param_arrays(p, arrays, sizes); a < n; a++)
        for (int i = 0; i < sizes[a]; i++, at += 4)
            if (!isfinite(arrays[a][i] = bits_float(get_le32(at))))
                fail("%s: holds weights that are not finite numbers", path);
    free(bytes);
}

/* ---------------------------------------------------------------------------------------- */
/* The model                                                                                  */

/* Glorot uniform, U(-l, l) with l = sqrt(6 / (fan_in + fan_out)), as Keras' Dense kernels. */
static void glorot_uniform(float *w, int fan_in, int fan_out, uint64_t seed, uint64_t first)
{
    double limit = sqrt(6.0 / (fan_in + fan_out));
    for (int i = 0; i < fan_in * fan_out; i++) {
        double u = uniform01(random_bits(seed, STREAM_INIT, first + (uint64_t)i));
        w[i] = (float)((2.0 * u - 1.0) * limit);
    }
}

static void init_params(Params *p, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    glorot_uniform(p->w1, INPUTS, HIDDEN, seed, 0);
    glorot_uniform(p->w2, HIDDEN, OUTPUTS, seed, INPUTS * HIDDEN + HIDDEN);
}

/* One image as its nonzero pixels, in ascending pixel order. */
typedef struct {
    int count;
    const uint16_t *pixel;
    const float *value;
} SparseImage;

static int nonzeros(const float *image, uint16_t *pixel, float *value)
{
    int n = 0;
    for (int p = 0; p < INPUTS; p++)
        if (image[p] != 0.0f)
            pixel[n] = (uint16_t)p, value[n++] = image[p];
    return n;
}

/* out[0:128] = init[0:128] (or 0) + sum over e of weight[e] * table[index[e]][0:128], summed
   in e order. The heart of layer 1: the forward pass (table W1, indexed by pixel) and the
   weight gradient (table dh, indexed by image) both run here. It works on BLOCK columns at a
   time so their accumulators stay in vector registers across the whole sum. GCC's -O3
   "unroll-and-jam" would fuse pairs of e iterations and so un-vectorise the j loop (4-7x
   slower here), hence the attribute. */
enum { BLOCK = 64 };
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-loop-unroll-and-jam")))
#endif
static void sum_scaled_rows(float *restrict out, const float *restrict init,
                            const float *restrict table, const uint16_t *restrict index,
                            const float *restrict weight, int count)
{
    for (int col = 0; col < HIDDEN; col += BLOCK) {
        float acc[BLOCK];
        for (int j = 0; j < BLOCK; j++)
            acc[j] = init ? init[col + j] : 0.0f;
        for (int e = 0; e < count; e++) {
            const float *restrict row = table + (size_t)index[e] * HIDDEN + col;
            const float x = weight[e];
            for (int j = 0; j < BLOCK; j++)
                acc[j] += x * row[j];
        }
        for (int j = 0; j < BLOCK; j++)
            out[col + j] = acc[j];
    }
}

/* Layer 1 and ReLU: hidden = max(0, b1 + x W1), x sparse. */
static void forward_hidden(const Params *p, SparseImage x, float *hidden)
{
    sum_scaled_rows(hidden, p->b1, p->w1, x.pixel, x.value, x.count);
    for (int j = 0; j < HIDDEN; j++)
        hidden[j] = hidden[j] > 0.0f ? hidden[j] : 0.0f;
}

/* Layer 2: logits = b2 + hidden W2. */
static void forward_logits(const Params *p, const float *hidden, float *logits)
{
    for (int k = 0; k < OUTPUTS; k++)
        logits[k] = p->b2[k];
    for (int j = 0; j < HIDDEN; j++)
        for (int k = 0; k < OUTPUTS; k++)
            logits[k] += hidden[j] * p->w2[j * OUTPUTS + k];
}

/* Softmax, computed stably (logits minus their max); returns log(sum exp(logit - max)) and
   sets *max, so that -log p_k = lse - (logit_k - max). */
static double softmax(const float *logits, float *probs, float *max)
{
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
        if (v[k] > v[best])
            best = k;
    return best;
}

/* ---------------------------------------------------------------------------------------- */
/* Augmentation: a random rotation, zoom and shift as one affine map, resampled bilinearly   */

typedef struct { double rotation, shift, zoom; } Augment;

/* The nonzero pixels of one warped image. Output pixel (x column, y row) samples the input
   at (a0 x + a1 y + a2, b0 x + b1 y + b2); each of the four neighbours outside the image
   counts as 0. */
static int warp_nonzeros(const float *image, const Augment *aug, uint64_t seed, uint64_t draw,
                         uint16_t *pixel, float *value)
{
    double u[5];
    for (int k = 0; k < 5; k++)
        u[k] = 2.0 * uniform01(random_bits(seed, STREAM_AUGMENT, draw * 5 + (uint64_t)k)) - 1.0;
    double angle = u[0] * aug->rotation * PI / 180.0;
    double sx = 1.0 + u[1] * aug->zoom, sy = 1.0 + u[2] * aug->zoom;
    double mx = u[3] * aug->shift * SIDE, my = u[4] * aug->shift * SIDE;
    double c = cos(angle), s = sin(angle), centre = (SIDE - 1) / 2.0;
    double a0 = c / sx, a1 = -s / sx, b0 = s / sy, b1 = c / sy;
    float fa0 = (float)a0, fa1 = (float)a1, fa2 = (float)(centre - (a0 + a1) * centre - mx);
    float fb0 = (float)b0, fb1 = (float)b1, fb2 = (float)(centre - (b0 + b1) * centre - my);
    int n = 0;
    for (int y = 0; y < SIDE; y++) {
        for (int x = 0; x < SIDE; x++) {
            float px = fa0 * (float)x + fa1 * (float)y + fa2;
            float py = fb0 * (float)x + fb1 * (float)y + fb2;
            if (!(px > -1.0f && px < (float)SIDE && py > -1.0f && py < (float)SIDE))
                continue; /* all four neighbours outside (or NaN) */
            float fx0 = floorf(px), fy0 = floorf(py), fx = px - fx0, fy = py - fy0;
            int x0 = (int)fx0, y0 = (int)fy0;
            float v[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* (x0,y0) (x0+1,y0) (x0,y0+1) (x0+1,y0+1) */
            for (int i = 0; i < 4; i++) {
                int xi = x0 + (i & 1), yi = y0 + (i >> 1);
                if (xi >= 0 && xi < SIDE && yi >= 0 && yi < SIDE)
                    v[i] = image[yi * SIDE + xi];
            }
            float top = (1.0f - fx) * v[0] + fx * v[1], bottom = (1.0f - fx) * v[2] + fx * v[3];
            float out = (1.0f - fy) * top + fy * bottom;
            if (out != 0.0f)
                pixel[n] = (uint16_t)(y * SIDE + x), value[n++] = out;
        }
    }
    return n;
}

/* ---------------------------------------------------------------------------------------- */
/* Adam                                                                                       */

typedef struct { float lr_t, one_minus_beta1, one_minus_beta2, epsilon; } AdamStep;

/* Keras 3's Adam for step `step` (0-based): lr_t = lr(step) sqrt(1 - beta2^t) / (1 - beta1^t),
   t = step + 1, in double and rounded once. */
static AdamStep adam_step(double learning_rate, uint64_t step)
{
    double t = (double)step + 1.0;
    AdamStep s;
    s.lr_t = (float)(learning_rate * sqrt(1.0 - pow(0.999, t)) / (1.0 - pow(0.9, t)));
    s.one_minus_beta1 = (float)(1.0 - 0.9), s.one_minus_beta2 = (float)(1.0 - 0.999);
    s.epsilon = 1e-7f;
    return s;
}

/* out[i] = sqrt(in[i]). A plain sqrtf() loop is the reference, but under ISO C sqrtf() may set
   errno, so GCC will not vectorise it (-fno-math-errno would); the vector instructions are the
   same correctly rounded square root, so every path gives the same bits. */
static void square_roots(float *restrict out, const float *restrict in, int n)
{
    int i = 0;
#if defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_sqrt_ps(_mm256_loadu_ps(in + i)));
#elif defined(__SSE2__)
    for (; i + 4 <= n; i += 4)
        _mm_storeu_ps(out + i, _mm_sqrt_ps(_mm_loadu_ps(in + i)));
#endif
    for (; i < n; i++)
        out[i] = sqrtf(in[i]);
}

/* m += (g - m)(1 - beta1); v += (g^2 - v)(1 - beta2); w -= lr_t m / (sqrt(v) + epsilon). */
enum { ADAM_CHUNK = 128 };
static void adam_update(float *restrict w, float *restrict m, float *restrict v,
                        const float *restrict g, int n, const AdamStep *s)
{
    float root[ADAM_CHUNK];
    for (int start = 0; start < n; start += ADAM_CHUNK) {
        int len = n - start < ADAM_CHUNK ? n - start : ADAM_CHUNK;
        float *restrict wc = w + start, *restrict mc = m + start, *restrict vc = v + start;
        const float *restrict gc = g + start;
        for (int i = 0; i < len; i++) {
            mc[i] += (gc[i] - mc[i]) * s->one_minus_beta1;
            vc[i] += (gc[i] * gc[i] - vc[i]) * s->one_minus_beta2;
        }
        square_roots(root, vc, len);
        for (int i = 0; i < len; i++)
            wc[i] -= s->lr_t * mc[i] / (root[i] + s->epsilon);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* One training step: phase A (threads own images), barrier, phase B (threads own rows)      */

typedef struct {
    Params *params, *adam_m, *adam_v; /* weights and Adam's moments */
    Params *grads;                    /* grad command: the gradients go here, no update */
    uint64_t seed;
    int batch_size;                   /* the recipe's, which numbers the random draws */
    float dropout_rate, dropout_scale, smoothing;
    const Augment *augment;           /* NULL: off */
    const float *pixels;              /* the training images, dense (for augmentation) */
    SparseImage *sparse;              /* and as nonzero lists (no augmentation) */
    const uint8_t *labels;
    int capacity;                     /* images a step can hold: min(batch_size, N) */
    /* per step, image b's ... */
    SparseImage *input;               /* input (its nonzero pixels) */
    uint16_t *warped_pixel;           /* [capacity][INPUTS] storage of warped inputs */
    float *warped_value;
    float *hidden;                    /* [capacity][HIDDEN] layer 1's output after dropout */
    float *dhidden;                   /* [capacity][HIDDEN] d loss / d layer 1's pre-ReLU */
    float *dlogits;                   /* [capacity][OUTPUTS] d loss / d logits */
    double *loss, *objective;         /* plain and label-smoothed cross-entropy */
    unsigned char *hit;               /* 1 if argmax = label */
    uint8_t *mask;                    /* grad command: [capacity][HIDDEN] dropout mask */
    /* the batch regrouped by pixel: bucket p lists (image, value) of the images having p */
    int *bucket_count;                /* [INPUTS] */
    uint16_t *bucket_image;           /* [INPUTS][capacity] */
    float *bucket_value;
    int threads_used;
} Trainer;

/* Phase A for image b of the batch (dataset image `index`, random draw number `draw`):
   forward with dropout, loss, and backward as far as layer 1's pre-activation gradient. */
static void image_forward_backward(Trainer *t, int index, int b, int batch, uint64_t draw)
{
    const Params *p = t->params;
    SparseImage x = t->sparse ? t->sparse[index] : (SparseImage){0, NULL, NULL};
    if (t->augment) {
        uint16_t *pixel = t->warped_pixel + (size_t)b * INPUTS;
        float *value = t->warped_value + (size_t)b * INPUTS;
        x.count = warp_nonzeros(t->pixels + (size_t)index * INPUTS, t->augment, t->seed, draw,
                                pixel, value);
        x.pixel = pixel, x.value = value;
    }
    t->input[b] = x;

    float *h = t->hidden + (size_t)b * HIDDEN;
    forward_hidden(p, x, h);
    for (int j = 0; j < HIDDEN; j++) { /* inverted dropout */
        float u = uniform01(random_bits(t->seed, STREAM_DROPOUT, draw * HIDDEN + (uint64_t)j));
        int keep = u >= t->dropout_rate;
        h[j] = keep ? h[j] * t->dropout_scale : 0.0f;
        if (t->mask)
            t->mask[(size_t)b * HIDDEN + j] = (uint8_t)keep;
    }

    float logits[OUTPUTS], probs[OUTPUTS], max;
    forward_logits(p, h, logits);
    double lse = softmax(logits, probs, &max);
    int label = t->labels[index];
    float on = (float)(1.0 - t->smoothing + t->smoothing / OUTPUTS);
    float off = (float)(t->smoothing / OUTPUTS);
    double objective = lse;
    float *dl = t->dlogits + (size_t)b * OUTPUTS;
    for (int k = 0; k < OUTPUTS; k++) {
        float target = k == label ? on : off;
        objective -= (double)target * ((double)logits[k] - max);
        dl[k] = (probs[k] - target) / (float)batch;
    }
    t->loss[b] = lse - ((double)logits[label] - max);
    t->objective[b] = objective;
    t->hit[b] = argmax(logits) == label;

    /* Back through layer 2, dropout and ReLU: a kept unit with a positive output has
       h > 0, so h > 0 is exactly where the gradient passes (times the dropout scale). */
    float *dh = t->dhidden + (size_t)b * HIDDEN;
    for (int j = 0; j < HIDDEN; j++) {
        float sum = 0.0f;
        for (int k = 0; k < OUTPUTS; k++)
            sum += p->w2[j * OUTPUTS + k] * dl[k];
        dh[j] = h[j] > 0.0f ? sum * t->dropout_scale : 0.0f;
    }
}

static int lower_bound(const uint16_t *v, int n, int key)
{
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (v[mid] < key) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Hands one row of gradients (w: where the row sits in the weights) to Adam, or, for the
   grad command, stores it. The moments and the gradients have the weights' layout, so the
   row sits at the same byte offset in each. */
static float *same_place(const Params *from, const float *row, Params *to)
{
    return (float *)((char *)to + ((const char *)row - (const char *)from));
}

static void apply_row(Trainer *t, float *w, const float *g, int n, const AdamStep *s)
{
    if (t->grads)
        memcpy(same_place(t->params, w, t->grads), g, (size_t)n * sizeof *g);
    else
        adam_update(w, same_place(t->params, w, t->adam_m), same_place(t->params, w, t->adam_v),
                    g, n, s);
}

/* Phase B for one thread: the batch's gradient of the rows it owns, then Adam on them. */
static void gradients_and_update(Trainer *t, int batch, int thread, int threads,
                                 const AdamStep *s)
{
    Params *p = t->params;
    float g[HIDDEN];

    /* W1 rows p0..p1-1: bucket the batch's nonzeros by pixel (each image's list is sorted,
       so its pixels in this range are one run), then dW1[p] = sum over the bucket of
       x_p * dh[image], in batch order. */
    int p0, p1;
    share(INPUTS, threads, thread, &p0, &p1);
    for (int px = p0; px < p1; px++)
        t->bucket_count[px] = 0;
    for (int b = 0; b < batch; b++) {
        SparseImage x = t->input[b];
        for (int e = lower_bound(x.pixel, x.count, p0); e < x.count && x.pixel[e] < p1; e++) {
            size_t slot = (size_t)x.pixel[e] * t->capacity + t->bucket_count[x.pixel[e]]++;
            t->bucket_image[slot] = (uint16_t)b;
            t->bucket_value[slot] = x.value[e];
        }
    }
    for (int px = p0; px < p1; px++) {
        size_t first = (size_t)px * t->capacity;
        sum_scaled_rows(g, NULL, t->dhidden, t->bucket_image + first, t->bucket_value + first,
                        t->bucket_count[px]);
        apply_row(t, p->w1 + (size_t)px * HIDDEN, g, HIDDEN, s);
    }

    /* W2 rows j0..j1-1: dW2[j] = sum over images of hidden[b][j] * dlogits[b]. */
    int j0, j1;
    share(HIDDEN, threads, thread, &j0, &j1);
    for (int j = j0; j < j1; j++) {
        for (int k = 0; k < OUTPUTS; k++)
            g[k] = 0.0f;
        for (int b = 0; b < batch; b++) {
            float a = t->hidden[(size_t)b * HIDDEN + j];
            for (int k = 0; k < OUTPUTS; k++)
                g[k] += a * t->dlogits[(size_t)b * OUTPUTS + k];
        }
        apply_row(t, p->w2 + j * OUTPUTS, g, OUTPUTS, s);
    }

    /* The biases (small): thread 0. */
    if (thread == 0) {
        for (int j = 0; j < HIDDEN; j++)
            g[j] = 0.0f;
        for (int b = 0; b < batch; b++)
            for (int j = 0; j < HIDDEN; j++)
                g[j] += t->dhidden[(size_t)b * HIDDEN + j];
        apply_row(t, p->b1, g, HIDDEN, s);
        for (int k = 0; k < OUTPUTS; k++)
            g[k] = 0.0f;
        for (int b = 0; b < batch; b++)
            for (int k = 0; k < OUTPUTS; k++)
                g[k] += t->dlogits[(size_t)b * OUTPUTS + k];
        apply_row(t, p->b2, g, OUTPUTS, s);
    }
}

/* One step on the batch images[0..batch-1]; `step` is the global step number (0-based). */
static void train_step(Trainer *t, const int *images, int batch, uint64_t step,
                       const AdamStep *s)
{
#ifdef _OPENMP
#pragma omp parallel
#endif
    {
        int thread = thread_index(), threads = thread_count(), b0, b1;
        share(batch, threads, thread, &b0, &b1);
        for (int b = b0; b < b1; b++)
            image_forward_backward(t, images[b], b, batch,
                                   step * (uint64_t)t->batch_size + (uint64_t)b);
#ifdef _OPENMP
#pragma omp barrier
#endif
        gradients_and_update(t, batch, thread, threads, s);
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
    t.params = params, t.pixels = pixels, t.labels = labels, t.seed = seed;
    t.batch_size = batch_size, t.augment = augment;
    t.dropout_rate = (float)dropout, t.dropout_scale = (float)(1.0 / (1.0 - dropout));
    t.smoothing = (float)smoothing;
    int cap = t.capacity = batch_size < n ? batch_size : n;
    if (augment) {
        t.warped_pixel = allocate((size_t)cap * INPUTS, sizeof(uint16_t));
        t.warped_value = allocate((size_t)cap * INPUTS, sizeof(float));
    } else { /* every image's nonzero pixels, once */
        t.sparse = allocate((size_t)n, sizeof *t.sparse);
        size_t total = 0;
        for (int i = 0; i < n; i++)
            for (int p = 0; p < INPUTS; p++)
                total += pixels[(size_t)i * INPUTS + p] != 0.0f;
        uint16_t *pixel = allocate(total, sizeof *pixel);
        float *value = allocate(total, sizeof *value);
        for (int i = 0; i < n; i++) {
            int count = nonzeros(pixels + (size_t)i * INPUTS, pixel, value);
            t.sparse[i] = (SparseImage){count, pixel, value};
            pixel += count, value += count;
        }
    }
    t.input = allocate((size_t)cap, sizeof *t.input);
    t.hidden = allocate((size_t)cap * HIDDEN, sizeof(float));
    t.dhidden = allocate((size_t)cap * HIDDEN, sizeof(float));
    t.dlogits = allocate((size_t)cap * OUTPUTS, sizeof(float));
    t.loss = allocate((size_t)cap, sizeof(double));
    t.objective = allocate((size_t)cap, sizeof(double));
    t.hit = allocate((size_t)cap, 1);
    t.bucket_count = allocate(INPUTS, sizeof(int));
    t.bucket_image = allocate((size_t)INPUTS * cap, sizeof(uint16_t));
    t.bucket_value = allocate((size_t)INPUTS * cap, sizeof(float));
    return t;
}

/* ---------------------------------------------------------------------------------------- */
/* Evaluation, training loop                                                                  */

/* Floating-point operations (a multiply-add counts 2), as the header comment defines them. */
#define FORWARD_FLOPS(nonzeros) (2 * (uint64_t)(nonzeros) * HIDDEN + 2 * HIDDEN * OUTPUTS + \
                                 4 * OUTPUTS)
#define TRAIN_FLOPS(nonzeros) (4 * (uint64_t)(nonzeros) * HIDDEN + 3 * HIDDEN +               \
                               6 * HIDDEN * OUTPUTS + 7 * OUTPUTS)
#define ADAM_FLOPS ((uint64_t)12 * PARAM_COUNT)

/* Probabilities (if probs) and mean plain cross-entropy / accuracy (if labels) of images,
   dropout off. Images are independent, so any thread may take any of them. */
static void evaluate(const Params *p, const float *pixels, int n, const uint8_t *labels,
                     float *probs, double *loss_out, double *accuracy_out, uint64_t *nnz_out)
{
    double *loss = allocate((size_t)n, sizeof(double));
    int *hit = allocate((size_t)n, sizeof(int)), *nnz = allocate((size_t)n, sizeof(int));
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int i = 0; i < n; i++) {
        uint16_t pixel[INPUTS];
        float value[INPUTS], hidden[HIDDEN], logits[OUTPUTS], pr[OUTPUTS], max;
        SparseImage x = {nonzeros(pixels + (size_t)i * INPUTS, pixel, value), pixel, value};
        forward_hidden(p, x, hidden);
        forward_logits(p, hidden, logits);
        double lse = softmax(logits, pr, &max);
        if (probs)
            memcpy(probs + (size_t)i * OUTPUTS, pr, sizeof pr);
        if (labels) {
            loss[i] = lse - ((double)logits[labels[i]] - max);
            hit[i] = argmax(logits) == labels[i];
        }
        nnz[i] = x.count;
    }
    double loss_sum = 0.0;
    uint64_t hits = 0, nnz_sum = 0;
    for (int i = 0; i < n; i++) {
        if (labels)
            loss_sum += loss[i], hits += (uint64_t)hit[i];
        nnz_sum += (uint64_t)nnz[i];
    }
    if (loss_out)
        *loss_out = loss_sum / n, *accuracy_out = (double)hits / n;
    *nnz_out = nnz_sum;
    free(loss), free(hit), free(nnz);
}

typedef struct {
    const char *images, *labels, *val_images, *val_labels, *out;
    int epochs, batch_size, cosine, restore_best, threads;
    double learning_rate, label_smoothing, rotation, shift, zoom;
    uint64_t seed;
} TrainOptions;

static double learning_rate_at(const TrainOptions *o, uint64_t step, uint64_t total_steps)
{
    if (!o->cosine)
        return o->learning_rate; /* Keras CosineDecay, alpha 0: */
    return o->learning_rate * 0.5 * (1.0 + cos(PI * (double)step / (double)total_steps));
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

    Augment augment = {o->rotation, o->shift, o->zoom};
    int augmenting = o->rotation > 0 || o->shift > 0 || o->zoom > 0;
    Params *params = allocate(1, sizeof(Params)), *best = allocate(1, sizeof(Params));
    Params *m = allocate(1, sizeof(Params)), *v = allocate(1, sizeof(Params));
    init_params(params, o->seed);
    memset(m, 0, sizeof *m), memset(v, 0, sizeof *v);
    Trainer t = make_trainer(params, pixels, labels, n, o->batch_size, o->seed, 0.2,
                             o->label_smoothing, augmenting ? &augment : NULL);
    t.adam_m = m, t.adam_v = v;
    int *order = allocate((size_t)n, sizeof(int));
    uint64_t steps_per_epoch = ((uint64_t)n + o->batch_size - 1) / o->batch_size;
    uint64_t total_steps = steps_per_epoch * o->epochs, step = 0, executed = 0, dense = 0;
    double best_accuracy = -1.0;
    int best_epoch = 0;

    double start = seconds_now();
    for (int epoch = 0; epoch < o->epochs; epoch++) {
        double epoch_start = seconds_now(), loss_sum = 0.0;
        uint64_t hits = 0;
        shuffle(order, n, o->seed, epoch);
        for (int first = 0; first < n; first += o->batch_size, step++) {
            int batch = n - first < o->batch_size ? n - first : o->batch_size;
            AdamStep s = adam_step(learning_rate_at(o, step, total_steps), step);
            train_step(&t, order + first, batch, step, &s);
            for (int b = 0; b < batch; b++) { /* in batch order, so the sums are fixed too */
                loss_sum += t.loss[b], hits += t.hit[b];
                executed += TRAIN_FLOPS(t.input[b].count);
                dense += TRAIN_FLOPS(INPUTS);
            }
            executed += ADAM_FLOPS, dense += ADAM_FLOPS;
        }
        double val_loss = 0.0, val_accuracy = 0.0;
        if (val_pixels) {
            uint64_t nnz;
            evaluate(params, val_pixels, val_n, val_labels, NULL, &val_loss, &val_accuracy,
                     &nnz);
            executed += val_n * FORWARD_FLOPS(0) + 2 * nnz * HIDDEN;
            dense += val_n * FORWARD_FLOPS(INPUTS);
            if (o->restore_best && val_accuracy > best_accuracy)
                best_accuracy = val_accuracy, best_epoch = epoch + 1, *best = *params;
        }
        printf("epoch %d/%d %.1fs loss=%.6f accuracy=%.6f", epoch + 1, o->epochs,
               seconds_now() - epoch_start, loss_sum / n, (double)hits / n);
        if (val_pixels)
            printf(" val_loss=%.6f val_accuracy=%.6f", val_loss, val_accuracy);
        printf("\n");
        fflush(stdout);
    }
    if (o->restore_best && best_epoch != o->epochs) {
        printf("restoring epoch %d: best validation accuracy %.4f\n", best_epoch,
               best_accuracy);
        *params = *best;
    }
    double seconds = seconds_now() - start;
    printf("train: images=%d epochs=%d seconds=%.3f executed_gflop=%.3f dense_gflop=%.3f "
           "gflops=%.2f threads=%d\n", n, o->epochs, seconds, executed * 1e-9, dense * 1e-9,
           executed * 1e-9 / seconds, t.threads_used);
    fflush(stdout);

    float *arrays[4];
    int sizes[4];
    for (int a = 0, count = param_arrays(params, arrays, sizes); a < count; a++)
        for (int i = 0; i < sizes[a]; i++)
            if (!isfinite(arrays[a][i]))
                fail("training diverged (weights not finite); lower --learning-rate; %s not "
                     "written", o->out);
    if (!save_params(o->out, params))
        fail("%s: cannot write the model", o->out);
}

/* ---------------------------------------------------------------------------------------- */
/* Commands and their flags                                                                   */

enum { MAX_FLAGS = 20 };
typedef struct {
    const char *command;
    const char *const *allowed; /* NULL-terminated */
    const char *value[MAX_FLAGS];
} Flags;

static int flag_slot(const Flags *f, const char *name)
{
    for (int i = 0; f->allowed[i]; i++)
        if (strcmp(f->allowed[i], name) == 0)
            return i;
    return -1;
}

static void parse_flags(Flags *f, int argc, char **argv)
{
    for (int i = 0; i < MAX_FLAGS; i++)
        f->value[i] = NULL;
    for (int i = 2; i < argc; i += 2) {
        int slot = flag_slot(f, argv[i]);
        if (slot < 0)
            fail("unknown flag %s for %s", argv[i], f->command);
        if (i + 1 >= argc)
            fail("%s needs a value", argv[i]);
        if (f->value[slot])
            fail("%s given twice", argv[i]);
        f->value[slot] = argv[i + 1];
    }
}

static const char *text_flag(const Flags *f, const char *name, const char *fallback)
{
    const char *v = f->value[flag_slot(f, name)];
    if (!v && !fallback)
        fail("%s: missing %s", f->command, name);
    return v ? v : fallback;
}

static long int_flag(const Flags *f, const char *name, long fallback, long low, long high)
{
    const char *text = f->value[flag_slot(f, name)];
    if (!text)
        return fallback;
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (end == text || *end || errno || (*text < '0' && *text != '-') || *text > '9')
        fail("%s: not an integer: '%s'", name, text);
    if (v < low || v > high)
        fail("%s: %ld is out of range %ld..%ld", name, v, low, high);
    return v;
}

/* A finite number in [low, high] (or [low, high) with high_open; (low, ...] with low_open). */
static double real_flag(const Flags *f, const char *name, double fallback, double low,
                        int low_open, double high, int high_open)
{
    const char *text = f->value[flag_slot(f, name)];
    if (!text)
        return fallback;
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (end == text || *end || errno || !isfinite(v) || isspace((unsigned char)text[0]))
        fail("%s: not a finite number: '%s'", name, text);
    if (v < low || (low_open && v == low) || v > high || (high_open && v == high))
        fail("%s: %s is out of range %c%g, %g%c", name, text, low_open ? '(' : '[', low, high,
             high_open ? ')' : ']');
    return v;
}

static uint64_t seed_flag(const Flags *f)
{
    const char *text = f->value[flag_slot(f, "--seed")];
    if (!text)
        return 42;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (*text < '0' || *text > '9' || *end || errno)
        fail("--seed: not an integer in 0..2^64-1: '%s'", text);
    return (uint64_t)v;
}

static void set_threads(const Flags *f)
{
    int threads = (int)int_flag(f, "--threads", 1, 1, MAX_THREADS);
#ifdef _OPENMP
    omp_set_dynamic(0);
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
}

static void command_train(int argc, char **argv)
{
    static const char *const allowed[] = {
        "--images", "--labels", "--val-images", "--val-labels", "--out", "--epochs",
        "--batch-size", "--learning-rate", "--schedule", "--label-smoothing", "--rotation",
        "--shift", "--zoom", "--restore-best", "--seed", "--threads", NULL};
    Flags f = {"train", allowed, {NULL}};
    parse_flags(&f, argc, argv);
    TrainOptions o;
    o.images = text_flag(&f, "--images", NULL);
    o.labels = text_flag(&f, "--labels", NULL);
    o.out = text_flag(&f, "--out", NULL);
    o.val_images = text_flag(&f, "--val-images", "");
    o.val_labels = text_flag(&f, "--val-labels", "");
    if (!*o.val_images != !*o.val_labels)
        fail("--val-images and --val-labels go together");
    if (!*o.val_images)
        o.val_images = o.val_labels = NULL;
    o.epochs = (int)int_flag(&f, "--epochs", 5, 1, 10000);
    o.batch_size = (int)int_flag(&f, "--batch-size", 32, 1, 65536);
    o.learning_rate = real_flag(&f, "--learning-rate", 0.001, 0, 1, HUGE_VAL, 1);
    const char *schedule = text_flag(&f, "--schedule", "constant");
    if (strcmp(schedule, "constant") != 0 && strcmp(schedule, "cosine") != 0)
        fail("--schedule: '%s'; expected constant or cosine", schedule);
    o.cosine = strcmp(schedule, "cosine") == 0;
    o.label_smoothing = real_flag(&f, "--label-smoothing", 0, 0, 0, 1, 1);
    o.rotation = real_flag(&f, "--rotation", 0, 0, 0, 180, 0);
    o.shift = real_flag(&f, "--shift", 0, 0, 0, 1, 1);
    o.zoom = real_flag(&f, "--zoom", 0, 0, 0, 1, 1);
    o.restore_best = (int)int_flag(&f, "--restore-best", 0, 0, 1);
    if (o.restore_best && !o.val_images)
        fail("--restore-best 1 needs --val-images and --val-labels");
    o.seed = seed_flag(&f);
    set_threads(&f);
    train(&o);
}

static void command_predict(int argc, char **argv)
{
    static const char *const allowed[] = {"--model", "--images", "--out", "--threads", NULL};
    Flags f = {"predict", allowed, {NULL}};
    parse_flags(&f, argc, argv);
    const char *model = text_flag(&f, "--model", NULL), *images = text_flag(&f, "--images", NULL);
    const char *out = text_flag(&f, "--out", NULL);
    set_threads(&f);
    Params *p = allocate(1, sizeof(Params));
    load_params(model, p);
    int n;
    float *pixels = load_images(images, &n);
    check_writable(out);
    float *probs = allocate((size_t)n * OUTPUTS, sizeof(float));
    uint64_t nnz;
    evaluate(p, pixels, n, NULL, probs, NULL, NULL, &nnz);
    size_t size;
    unsigned char *bytes = encode_idx(probs, n, OUTPUTS, 1, &size);
    if (!write_file(out, bytes, size))
        fail("%s: cannot write the predictions", out);
}

static void command_grad(int argc, char **argv)
{
    static const char *const allowed[] = {"--model", "--images", "--labels", "--out", "--mask",
                                          "--seed", "--dropout", "--label-smoothing",
                                          "--threads", NULL};
    Flags f = {"grad", allowed, {NULL}};
    parse_flags(&f, argc, argv);
    const char *model = text_flag(&f, "--model", NULL), *images = text_flag(&f, "--images", NULL);
    const char *labels_path = text_flag(&f, "--labels", NULL), *out = text_flag(&f, "--out", NULL);
    const char *mask_path = text_flag(&f, "--mask", NULL);
    uint64_t seed = seed_flag(&f);
    double dropout = real_flag(&f, "--dropout", 0.2, 0, 0, 1, 1);
    double smoothing = real_flag(&f, "--label-smoothing", 0, 0, 0, 1, 1);
    set_threads(&f);
    Params *p = allocate(1, sizeof(Params)), *grads = allocate(1, sizeof(Params));
    load_params(model, p);
    int n;
    float *pixels = load_images(images, &n);
    uint8_t *labels = load_labels(labels_path, n, images);
    check_writable(out);
    check_writable(mask_path);

    /* All images as one batch, drawn as training step 0 with batch size n. */
    Trainer t = make_trainer(p, pixels, labels, n, n, seed, dropout, smoothing, NULL);
    t.grads = grads;
    t.mask = allocate((size_t)n * HIDDEN, 1);
    int *order = allocate((size_t)n, sizeof(int));
    for (int i = 0; i < n; i++)
        order[i] = i;
    AdamStep unused = adam_step(0.001, 0);
    train_step(&t, order, n, 0, &unused);
    double loss = 0.0;
    for (int b = 0; b < n; b++)
        loss += t.objective[b];

    size_t size;
    unsigned char *bytes = encode_idx(t.mask, n, HIDDEN, 0, &size);
    if (!save_params(out, grads))
        fail("%s: cannot write the gradients", out);
    if (!write_file(mask_path, bytes, size)) {
        remove(out);
        fail("%s: cannot write the dropout mask", mask_path);
    }
    printf("loss=%.9g\n", loss / n);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        fail("usage: mnist_mlp train|predict|grad --flag value ... (see the source's header)");
    if (strcmp(argv[1], "train") == 0)
        command_train(argc, argv);
    else if (strcmp(argv[1], "predict") == 0)
        command_predict(argc, argv);
    else if (strcmp(argv[1], "grad") == 0)
        command_grad(argc, argv);
    else
        fail("unknown command '%s'; expected train, predict or grad", argv[1]);
    return 0;
}
