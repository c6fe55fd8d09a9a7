/* y = x @ w for a few rows x, at the speed of reading w once (refimpl.llm.matvec explains why).
 *
 *   x: (rows, n_in), w: (n_in, n_out), y: (rows, n_out), all float32, row-major, contiguous.
 *
 * Thread t of n_threads owns the columns [c0, c1) of y and of w. It walks the rows of w four at a time; each
 * quadruple of rows is read once, as four contiguous streams, and added into every row of y:
 *
 *     y[r, c] += x[r, i] w[i, c] + x[r, i+1] w[i+1, c] + x[r, i+2] w[i+2, c] + x[r, i+3] w[i+3, c]
 *
 * The loop over c is what the compiler vectorizes (no reassociation is needed, so no -ffast-math): each y[r, c]
 * sums its terms in the order i = 0, 1, 2, ... whatever the number of rows or threads, so a row's result does
 * not depend on the other rows in the batch or on the thread count.
 */
#include <omp.h>

void matvec(const float *x, const float *w, float *y, long rows, long n_in, long n_out, int n_threads) {
#pragma omp parallel num_threads(n_threads)
    {
        int n_t = omp_get_num_threads(), t = omp_get_thread_num();
        long per_thread = ((n_out + n_t - 1) / n_t + 15) / 16 * 16; /* whole 64-byte lines per thread */
        long c0 = t * per_thread < n_out ? t * per_thread : n_out;
        long c1 = c0 + per_thread < n_out ? c0 + per_thread : n_out;
        for (long r = 0; r < rows; r++)
            for (long c = c0; c < c1; c++) y[r * n_out + c] = 0.0f;
        long i = 0;
        for (; i + 4 <= n_in; i += 4) {
            const float *w0 = w + i * n_out, *w1 = w0 + n_out, *w2 = w1 + n_out, *w3 = w2 + n_out;
            for (long r = 0; r < rows; r++) {
                const float *xr = x + r * n_in + i;
                const float x0 = xr[0], x1 = xr[1], x2 = xr[2], x3 = xr[3];
                float *yr = y + r * n_out;
                for (long c = c0; c < c1; c++) yr[c] += x0 * w0[c] + x1 * w1[c] + x2 * w2[c] + x3 * w3[c];
            }
        }
        for (; i < n_in; i++) { /* the last n_in % 4 rows of w */
            const float *w0 = w + i * n_out;
            for (long r = 0; r < rows; r++) {
                const float x0 = x[r * n_in + i];
                float *yr = y + r * n_out;
                for (long c = c0; c < c1; c++) yr[c] += x0 * w0[c];
            }
        }
    }
}
