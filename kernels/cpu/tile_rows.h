/* Register tiles keep their accumulators in named variables, one set per row of x: an array of
 * them goes through the stack on every step (panel_gemm.c measured twelve stores per k, the
 * tile's limit). ROWS_R(X) expands X(0) .. X(R-1), so one macro body declares, updates or stores
 * a tile of R rows. */
#ifndef PAGEDSERVE_TILE_ROWS_H
#define PAGEDSERVE_TILE_ROWS_H
#define ROWS_1(X) X(0)
#define ROWS_2(X) ROWS_1(X) X(1)
#define ROWS_3(X) ROWS_2(X) X(2)
#define ROWS_4(X) ROWS_3(X) X(3)
#define ROWS_5(X) ROWS_4(X) X(4)
#define ROWS_6(X) ROWS_5(X) X(5)
#define ROWS_7(X) ROWS_6(X) X(6)
#define ROWS_8(X) ROWS_7(X) X(7)
#define ROWS_9(X) ROWS_8(X) X(8)
#define ROWS_10(X) ROWS_9(X) X(9)
#define ROWS_11(X) ROWS_10(X) X(10)
#define ROWS_12(X) ROWS_11(X) X(11)
#endif
