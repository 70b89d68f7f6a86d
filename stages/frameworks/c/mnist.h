/*
 * mnist.h: what every C program here shares (the fast mnist_mlp.c and mnist_cnn.c beside it,
 * and the plain ones in reference/): errors and memory, threads, counter-based randomness, idx
 * files, the augmentation map, Adam's step size and the command-line flags, in plain C (the
 * fast programs' vector code is in vector.h). Included once by each program, after it defines
 * PROGRAM (its name, for error lines); every function is static, so each program is still
 * one translation unit.
 */
#ifndef MNIST_H
#define MNIST_H
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

enum { SIDE = 28, INPUTS = SIDE * SIDE, CLASSES = 10 };
enum { MAX_IMAGES = 1000000, MAX_BATCH = 65536, MAX_THREADS = 256 };
static const double PI = 3.14159265358979323846;

/* ---------------------------------------------------------------------------------------- */
/* Errors, memory, clock, threads                                                             */

static _Noreturn void fail(const char *format, ...)
{
    va_list args;
    fflush(stdout);
    fputs(PROGRAM ": error: ", stderr);
    va_start(args, format);
    vfprintf(stderr, format, args);
    va_end(args);
    fputc('\n', stderr);
    exit(1);
}

/* count * size bytes, aligned to a 64-byte cache line. */
static void *allocate(size_t count, size_t size)
{
    if (size && count > (SIZE_MAX - 64) / size)
        fail("out of memory (%zu x %zu bytes)", count, size);
    void *p = aligned_alloc(64, (count * size + 64) / 64 * 64);
    if (!p)
        fail("out of memory (%zu bytes)", count * size);
    return p;
}

static double seconds_now(void)
{
    struct timespec t;
    timespec_get(&t, TIME_UTC);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

#ifdef _OPENMP
#define OMP(directive) _Pragma(directive)
static inline int thread_index(void) { return omp_get_thread_num(); }
static inline int thread_count(void) { return omp_get_num_threads(); }
#else
#define OMP(directive)
static inline int thread_index(void) { return 0; }
static inline int thread_count(void) { return 1; }
#endif

/* Part `part` of `parts` near-equal contiguous shares of 0..n-1: [*begin, *end). */
static inline void share(int n, int parts, int part, int *begin, int *end)
{
    *begin = (int)((int64_t)n * part / parts);
    *end = (int)((int64_t)n * (part + 1) / parts);
}

/* ---------------------------------------------------------------------------------------- */
/* Randomness                                                                                 */

enum { STREAM_INIT = 1, STREAM_SHUFFLE = 2, STREAM_DROPOUT = 3, STREAM_AUGMENT = 4 };
#define GOLDEN 0x9E3779B97F4A7C15u

static uint64_t mix64(uint64_t z) /* splitmix64's output function */
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

/* hash(seed, stream, counter) = random_bits(stream_key(seed, stream), counter): output number
   `counter` of a splitmix64 sequence that starts at the key. The key is made once per stream,
   so each random number costs one mix. */
static uint64_t stream_key(uint64_t seed, uint64_t stream)
{
    return mix64(mix64(seed + GOLDEN) ^ stream);
}

static inline uint64_t random_bits(uint64_t key, uint64_t counter)
{
    return mix64(key + (counter + 1) * GOLDEN);
}

static inline float uniform01(uint64_t bits) { return (float)(bits >> 40) * 0x1p-24f; }

/* Epoch `epoch`'s order of the n training images, Fisher-Yates driven by a sequential
   splitmix64 generator (the modulo's bias is below n / 2^64). */
static void shuffle(int *order, int n, uint64_t seed, int epoch)
{
    uint64_t state = random_bits(stream_key(seed, STREAM_SHUFFLE), (uint64_t)epoch);
    for (int i = 0; i < n; i++)
        order[i] = i;
    for (int i = n - 1; i > 0; i--) {
        state += GOLDEN;
        int j = (int)(mix64(state) % (uint64_t)(i + 1)), swap = order[i];
        order[i] = order[j], order[j] = swap;
    }
}

/* ---------------------------------------------------------------------------------------- */
/* Files                                                                                      */

/* 32-bit values, byte by byte, so that files do not depend on the host's byte order. */
static uint32_t get_be32(const unsigned char *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}
static uint32_t get_le32(const unsigned char *b)
{
    return (uint32_t)b[3] << 24 | (uint32_t)b[2] << 16 | (uint32_t)b[1] << 8 | b[0];
}
static void put_32(unsigned char *b, uint32_t v, int big_endian)
{
    for (int i = 0; i < 4; i++)
        b[big_endian ? 3 - i : i] = (unsigned char)(v >> 8 * i);
}
static uint32_t float_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Opens a file to read and measures it, so nothing is allocated from an unchecked header. */
static FILE *open_input(const char *path, long *size)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        fail("%s: cannot open (%s)", path, strerror(errno));
    if (fseek(f, 0, SEEK_END) != 0 || (*size = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0)
        fail("%s: cannot measure (not a regular file?)", path);
    return f;
}

static void read_exact(FILE *f, void *buffer, size_t bytes, const char *path)
{
    if (fread(buffer, 1, bytes, f) != bytes)
        fail("%s: read error", path);
}

/* The payload of an idx file: `magic`, N (1..MAX_IMAGES) items of `item_dims` (the dimensions
   after the first, given in `dims`) of `type_bytes`-byte values, the file exactly that long. */
static void *read_idx(const char *path, uint32_t magic, const char *what, int item_dims,
                      const uint32_t *dims, size_t type_bytes, int *count)
{
    long size;
    FILE *f = open_input(path, &size);
    unsigned char head[16];
    size_t head_bytes = 8 + 4 * (size_t)item_dims;
    if (size < (long)head_bytes)
        fail("%s: %ld bytes, too short for an idx header", path, size);
    read_exact(f, head, head_bytes, path);
    if (get_be32(head) != magic)
        fail("%s: idx magic 0x%08lX, expected 0x%08lX (%s)", path,
             (unsigned long)get_be32(head), (unsigned long)magic, what);
    uint32_t n = get_be32(head + 4);
    if (n < 1 || n > MAX_IMAGES)
        fail("%s: header says %lu items, expected 1 to %d", path, (unsigned long)n, MAX_IMAGES);
    uint64_t bytes = n * (uint64_t)type_bytes;
    for (int d = 0; d < item_dims; d++) {
        if (get_be32(head + 8 + 4 * d) != dims[d])
            fail("%s: dimension %d is %lu, expected %lu (%s)", path, d + 2,
                 (unsigned long)get_be32(head + 8 + 4 * d), (unsigned long)dims[d], what);
        bytes *= dims[d];
    }
    if ((uint64_t)size != head_bytes + bytes)
        fail("%s: %ld bytes, but its header implies %llu", path, size,
             (unsigned long long)(head_bytes + bytes));
    void *payload = allocate((size_t)bytes, 1);
    read_exact(f, payload, (size_t)bytes, path);
    fclose(f);
    *count = (int)n;
    return payload;
}

/* N x 28 x 28 big-endian float32 images -> N * 784 floats, all finite. */
static float *load_images(const char *path, int *count)
{
    static const uint32_t dims[2] = {SIDE, SIDE};
    float *pixels = read_idx(path, 0x00000D03, "float32 images N x 28 x 28", 2, dims, 4, count);
    const unsigned char *raw = (const unsigned char *)pixels; /* converted in place */
    for (size_t i = 0; i < (size_t)*count * INPUTS; i++)
        if (!isfinite(pixels[i] = bits_float(get_be32(raw + 4 * i))))
            fail("%s: pixel %zu of image %zu is not a finite number", path, i % INPUTS,
                 i / INPUTS);
    return pixels;
}

static uint8_t *load_labels(const char *path, int image_count, const char *images_path)
{
    int count;
    uint8_t *labels = read_idx(path, 0x00000801, "uint8 labels", 0, NULL, 1, &count);
    if (count != image_count)
        fail("%s: %d labels for the %d images of %s", path, count, image_count, images_path);
    for (int i = 0; i < count; i++)
        if (labels[i] > 9)
            fail("%s: label %d of image %d; labels are 0 to 9", path, labels[i], i);
    return labels;
}

/* Fails now, before any work, if `path` cannot be written; an existing file is kept as is. */
static void check_writable(const char *path)
{
    FILE *f = fopen(path, "rb");
    int existed = f != NULL;
    if (f)
        fclose(f);
    if (!(f = fopen(path, existed ? "r+b" : "wb")))
        fail("%s: cannot write (%s)", path, strerror(errno));
    fclose(f);
    if (!existed)
        remove(path);
}

/* Writes the whole file: into PATH.partial beside it, then renamed over PATH, so that PATH is
   either the file it was or the whole new one, never a part (a run stopped midway leaves
   PATH.partial behind). On any failure removes PATH.partial and returns 0. */
static int write_file(const char *path, const unsigned char *bytes, size_t size)
{
    size_t length = strlen(path);
    char *partial = allocate(length + sizeof ".partial", 1);
    memcpy(partial, path, length);
    memcpy(partial + length, ".partial", sizeof ".partial");
    FILE *f = fopen(partial, "wb");
    int ok = f != NULL && fwrite(bytes, 1, size, f) == size;
    if (f != NULL && fclose(f) != 0)
        ok = 0;
    if (ok && rename(partial, path) != 0)
        ok = 0;
    if (!ok && f != NULL)
        remove(partial);
    free(partial);
    return ok;
}

/* An idx file of n rows of `width` values, float32 (big-endian) or uint8. */
static int write_idx(const char *path, const void *values, int n, int width, int is_float)
{
    size_t count = (size_t)n * width, size = 12 + count * (is_float ? 4 : 1);
    unsigned char *out = allocate(size, 1);
    put_32(out, is_float ? 0x00000D02 : 0x00000802, 1);
    put_32(out + 4, (uint32_t)n, 1), put_32(out + 8, (uint32_t)width, 1);
    for (size_t i = 0; i < count; i++)
        if (is_float)
            put_32(out + 12 + 4 * i, float_bits(((const float *)values)[i]), 1);
        else
            out[12 + i] = ((const uint8_t *)values)[i];
    int ok = write_file(path, out, size);
    free(out);
    return ok;
}

/* ---------------------------------------------------------------------------------------- */
/* Augmentation                                                                               */

/* A random warp: a rotation, zoom and shift folded into one affine map, drawn from five
   uniform numbers (counters draw * 5 + k of the AUGMENT stream). Output pixel (x column, y row)
   samples the input at (m[0] x + m[1] y + m[2], m[3] x + m[4] y + m[5]), bilinearly;
   neighbours outside the image count as 0. */
typedef struct { double rotation, shift, zoom; } Augment;

static void affine_map(const Augment *aug, uint64_t key, uint64_t draw, float m[6])
{
    double u[5];
    for (int k = 0; k < 5; k++)
        u[k] = 2.0 * uniform01(random_bits(key, draw * 5 + (uint64_t)k)) - 1.0;
    double angle = u[0] * aug->rotation * PI / 180.0, c = cos(angle), s = sin(angle);
    double sx = 1.0 + u[1] * aug->zoom, sy = 1.0 + u[2] * aug->zoom;
    double mx = u[3] * aug->shift * SIDE, my = u[4] * aug->shift * SIDE, centre = 13.5;
    double a0 = c / sx, a1 = -s / sx, b0 = s / sy, b1 = c / sy;
    m[0] = (float)a0, m[1] = (float)a1, m[2] = (float)(centre - (a0 + a1) * centre - mx);
    m[3] = (float)b0, m[4] = (float)b1, m[5] = (float)(centre - (b0 + b1) * centre - my);
}

/* The warped image's pixel (x, y). */
static inline float warp_pixel(const float *image, const float m[6], int x, int y)
{
    float px = m[0] * (float)x + m[1] * (float)y + m[2];
    float py = m[3] * (float)x + m[4] * (float)y + m[5];
    if (!(px > -1.0f && px < SIDE && py > -1.0f && py < SIDE))
        return 0.0f; /* all four neighbours outside (or NaN) */
    float x0 = floorf(px), y0 = floorf(py), fx = px - x0, fy = py - y0, v[4];
    for (int i = 0; i < 4; i++) { /* (x0,y0) (x0+1,y0) (x0,y0+1) (x0+1,y0+1) */
        int xi = (int)x0 + (i & 1), yi = (int)y0 + (i >> 1);
        v[i] = xi >= 0 && xi < SIDE && yi >= 0 && yi < SIDE ? image[yi * SIDE + xi] : 0;
    }
    float top = (1.0f - fx) * v[0] + fx * v[1], bottom = (1.0f - fx) * v[2] + fx * v[3];
    return (1.0f - fy) * top + fy * bottom;
}

/* ---------------------------------------------------------------------------------------- */
/* Adam and the learning rate                                                                 */

typedef struct { float lr_t, one_minus_beta1, one_minus_beta2, epsilon; } AdamStep;

/* The learning rate of step `step` of `total`: constant, or Keras' CosineDecay (alpha 0). */
static double learning_rate_at(double base, int cosine, uint64_t step, uint64_t total)
{
    return cosine ? base * 0.5 * (1.0 + cos(PI * (double)step / (double)total)) : base;
}

/* Keras 3's Adam at step `step` (0-based): lr_t = lr(step) sqrt(1 - beta2^t) / (1 - beta1^t)
   with t = step + 1, in double, rounded once. */
static AdamStep adam_step(double learning_rate, uint64_t step)
{
    double t = (double)step + 1.0;
    AdamStep s = {(float)(learning_rate * sqrt(1.0 - pow(0.999, t)) / (1.0 - pow(0.9, t))),
                  (float)(1.0 - 0.9), (float)(1.0 - 0.999), 1e-7f};
    return s;
}

/* ---------------------------------------------------------------------------------------- */
/* Flags                                                                                      */

typedef struct {
    const char *command;
    const char *const *names; /* the flags it takes, NULL-terminated */
    const char *values[20];   /* as given, or NULL */
} Flags;

static const char **flag(Flags *f, const char *name)
{
    for (int i = 0; f->names[i]; i++)
        if (strcmp(f->names[i], name) == 0)
            return &f->values[i];
    return NULL;
}

static void parse_flags(Flags *f, int argc, char **argv)
{
    for (int i = 2; i < argc; i += 2) {
        const char **value = flag(f, argv[i]);
        if (!value)
            fail("unknown flag %s for %s", argv[i], f->command);
        if (i + 1 >= argc)
            fail("%s needs a value", argv[i]);
        if (*value)
            fail("%s given twice", argv[i]);
        *value = argv[i + 1];
    }
}

static const char *text_flag(Flags *f, const char *name, const char *fallback)
{
    const char *v = *flag(f, name);
    if (!v && !fallback)
        fail("%s needs %s", f->command, name);
    return v ? v : fallback;
}

/* A decimal integer in low..high (the seed: any 64-bit value). */
static uint64_t int_flag(Flags *f, const char *name, uint64_t fallback, uint64_t low,
                         uint64_t high)
{
    const char *text = *flag(f, name);
    if (!text)
        return fallback;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (!isdigit((unsigned char)text[0]) || *end || errno)
        fail("%s: not a non-negative integer: '%s'", name, text);
    if (v < low || v > high)
        fail("%s: %s is out of range %llu..%llu", name, text, (unsigned long long)low,
             (unsigned long long)high);
    return v;
}

/* A finite number; `ok` is its range check, `range` that range in words. */
static double real_flag(Flags *f, const char *name, double fallback, int (*ok)(double),
                        const char *range)
{
    const char *text = *flag(f, name);
    if (!text)
        return fallback;
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (end == text || isspace((unsigned char)text[0]) || *end || errno || !isfinite(v))
        fail("%s: not a finite number: '%s'", name, text);
    if (!ok(v))
        fail("%s: %s is out of range %s", name, text, range);
    return v;
}
static int positive(double v) { return v > 0; }
static int fraction(double v) { return v >= 0 && v < 1; }
static int degrees(double v) { return v >= 0 && v <= 180; }

static void set_threads(Flags *f)
{
    int threads = (int)int_flag(f, "--threads", 1, 1, MAX_THREADS);
#ifdef _OPENMP
    omp_set_dynamic(0);
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
}

/* train's options. `recipe` holds the program's defaults (its shipped recipe), `max_batch`
   the largest batch it takes; --ema is read where the program lists it among its flags. */
typedef struct {
    const char *images, *labels, *val_images, *val_labels, *out;
    int epochs, batch_size, cosine, restore_best;
    double learning_rate, label_smoothing, ema;
    Augment augment;
    uint64_t seed;
} TrainOptions;

static TrainOptions train_options(Flags *f, const TrainOptions *recipe, int max_batch)
{
    TrainOptions o = *recipe;
    o.images = text_flag(f, "--images", NULL), o.labels = text_flag(f, "--labels", NULL);
    o.out = text_flag(f, "--out", NULL);
    o.val_images = *flag(f, "--val-images"), o.val_labels = *flag(f, "--val-labels");
    if (!o.val_images != !o.val_labels)
        fail("--val-images and --val-labels go together");
    o.epochs = (int)int_flag(f, "--epochs", (uint64_t)recipe->epochs, 1, 10000);
    o.batch_size = (int)int_flag(f, "--batch-size", (uint64_t)recipe->batch_size, 1,
                                 (uint64_t)max_batch);
    o.learning_rate = real_flag(f, "--learning-rate", recipe->learning_rate, positive,
                                "(0, inf)");
    const char *schedule = text_flag(f, "--schedule", recipe->cosine ? "cosine" : "constant");
    if (strcmp(schedule, "constant") != 0 && strcmp(schedule, "cosine") != 0)
        fail("--schedule: '%s'; expected constant or cosine", schedule);
    o.cosine = strcmp(schedule, "cosine") == 0;
    o.label_smoothing = real_flag(f, "--label-smoothing", recipe->label_smoothing, fraction,
                                  "[0, 1)");
    o.augment.rotation = real_flag(f, "--rotation", recipe->augment.rotation, degrees,
                                   "[0, 180]");
    o.augment.shift = real_flag(f, "--shift", recipe->augment.shift, fraction, "[0, 1)");
    o.augment.zoom = real_flag(f, "--zoom", recipe->augment.zoom, fraction, "[0, 1)");
    o.restore_best = (int)int_flag(f, "--restore-best", (uint64_t)recipe->restore_best, 0, 1);
    if (o.restore_best && !o.val_images)
        fail("--restore-best 1 needs --val-images and --val-labels");
    if (flag(f, "--ema"))
        o.ema = real_flag(f, "--ema", recipe->ema, fraction, "[0, 1)");
    o.seed = int_flag(f, "--seed", recipe->seed, 0, UINT64_MAX);
    set_threads(f);
    return o;
}

#endif
