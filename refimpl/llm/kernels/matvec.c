/* y = x @ w for a few rows x, at the speed of reading w once (refimpl.llm.matvec explains why).
 *
 *   x: (rows, n_in), w: (n_in, n_out), y and partial: (rows, n_out), all float32, row-major, contiguous.
 *
 * The rows of w are cut into two halves at `half`, and each half is summed into its own result: the first into
 * y, the second into `partial`; then y += partial. A half is read as one contiguous stream, four rows of w at a
 * time, each quadruple added into every row of y:
 *
 *     y[r, c] += x[r, i] w[i, c] + x[r, i+1] w[i+1, c] + x[r, i+2] w[i+2, c] + x[r, i+3] w[i+3, c]
 *
 * Work is shared out as (half, slice of columns) items: with two threads each streams one half of w, the way the
 * memory delivers fastest; with one thread it does both halves in turn; with more, the columns of each half are
 * shared too. Every output sums the same terms in the same order in all these cases, so a row's result depends
 * neither on the number of threads nor on the other rows. The loops over c are what the compiler vectorizes (no
 * reassociation is needed, so no -ffast-math).
 */
#include <omp.h>

/* Columns of a quadruple of w's rows taken at a time: 4 x 1024 floats (16 KB) are read from memory for the first
 * row of x and from L1 for the others (4 whole rows of a wide w, such as the 3072 columns of SmolLM2's gate and
 * up projections, fill L1, and every row of x re-read them from L2). The order of the sums is the same for every
 * CHUNK. */
#define CHUNK 1024

/* out[r, c0:c1] = sum over i in [i0, i1) of x[r, i] w[i, c0:c1], in order of i */
static void sum_rows(const float *x, const float *w, float *out, long rows, long n_in, long n_out, long i0,
                     long i1, long c0, long c1) {
    for (long r = 0; r < rows; r++)
        for (long c = c0; c < c1; c++) out[r * n_out + c] = 0.0f;
    long i = i0;
    for (; i + 4 <= i1; i += 4) {
        const float *w0 = w + i * n_out, *w1 = w0 + n_out, *w2 = w1 + n_out, *w3 = w2 + n_out;
        for (long cc = c0; cc < c1; cc += CHUNK) { /* CHUNK columns of the quadruple stay in L1 for every row */
            const long ce = cc + CHUNK < c1 ? cc + CHUNK : c1;
            for (long r = 0; r < rows; r++) {
                const float *xr = x + r * n_in + i;
                const float x0 = xr[0], x1 = xr[1], x2 = xr[2], x3 = xr[3];
                float *o = out + r * n_out;
                for (long c = cc; c < ce; c++) o[c] += x0 * w0[c] + x1 * w1[c] + x2 * w2[c] + x3 * w3[c];
            }
        }
    }
    for (; i < i1; i++) { /* the last (i1 - i0) % 4 rows of w */
        const float *w0 = w + i * n_out;
        for (long r = 0; r < rows; r++) {
            const float x0 = x[r * n_in + i];
            float *o = out + r * n_out;
            for (long c = c0; c < c1; c++) o[c] += x0 * w0[c];
        }
    }
}

/* [start, end) of slice s of n_slices over n columns, in whole 64-byte lines */
static void slice(long n, long s, long n_slices, long *start, long *end) {
    long per = ((n + n_slices - 1) / n_slices + 15) / 16 * 16;
    *start = s * per < n ? s * per : n;
    *end = *start + per < n ? *start + per : n;
}

void matvec(const float *x, const float *w, float *y, float *partial, long rows, long n_in, long n_out,
            int n_threads) {
    const long half = n_in / 2 / 4 * 4;           /* the first half of w's rows: a whole number of quadruples */
    const long n_slices = (n_threads + 1) / 2;    /* column slices per half */
#pragma omp parallel num_threads(n_threads)
    {
#pragma omp for schedule(static)
        for (long item = 0; item < 2 * n_slices; item++) {
            long part = item / n_slices, c0, c1;
            slice(n_out, item % n_slices, n_slices, &c0, &c1);
            if (part == 0)
                sum_rows(x, w, y, rows, n_in, n_out, 0, half, c0, c1);
            else
                sum_rows(x, w, partial, rows, n_in, n_out, half, n_in, c0, c1);
        } /* (the loop ends at a barrier: both halves are done) */
        long c0, c1;
        slice(n_out, omp_get_thread_num(), omp_get_num_threads(), &c0, &c1);
        for (long r = 0; r < rows; r++)
            for (long c = c0; c < c1; c++) y[r * n_out + c] += partial[r * n_out + c];
    }
}
