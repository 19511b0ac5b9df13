/* Intel AMX (tile configuration, tile loads/stores, tdpbf16ps, tdpbusd) in plain C, for running
 * autotune's AMX kernels on CPUs without AMX: the tests register gemm_cpu's tile intrinsics with
 * calls to these functions instead of the instructions (conftest.amx_target), so the kernels'
 * tiling, weight packing and tensorization are checked on any x86-64. Semantics after the Intel
 * SDM's pseudo-code: a thread's 8 tiles of up to 16 rows x 64 bytes, shaped by the last
 * ldtilecfg (palette 1: bytes per row of tile t at 16 + 2t, rows at 48 + t); bf16 products
 * accumulated in float32, u8 x s8 quads in int32. The tile state is per thread, like the
 * hardware's, so parallel kernels work. Built by the fixture with the system C compiler. */
#include <stdint.h>
#include <string.h>

static __thread uint8_t tiles[8][16][64];
static __thread uint16_t colsb[8];
static __thread uint8_t rows[8];

void autotune_amx_ldtilecfg(const uint8_t *cfg) {
    for (int t = 0; t < 8; t++) {
        memcpy(&colsb[t], cfg + 16 + 2 * t, 2);
        rows[t] = cfg[48 + t];
    }
}

void autotune_amx_tilezero(uint8_t t) { memset(tiles[t], 0, sizeof tiles[t]); }

void autotune_amx_tileloadd64(uint8_t t, const uint8_t *base, int64_t stride) {
    memset(tiles[t], 0, sizeof tiles[t]);
    for (int r = 0; r < rows[t]; r++) memcpy(tiles[t][r], base + r * stride, colsb[t]);
}

void autotune_amx_tilestored64(uint8_t t, uint8_t *base, int64_t stride) {
    for (int r = 0; r < rows[t]; r++) memcpy(base + r * stride, tiles[t][r], colsb[t]);
}

void autotune_amx_tilerelease(void) { memset(rows, 0, sizeof rows); }

static float bf16(const uint8_t *p) {
    uint32_t bits = (uint32_t)(p[0] | (p[1] << 8)) << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* C[m][n] += sum over k of A[m][2k..2k+1] . B[k][2n..2n+1] (bf16 pairs, float32 accumulation) */
void autotune_amx_tdpbf16ps(uint8_t c, uint8_t a, uint8_t b) {
    for (int m = 0; m < rows[c]; m++)
        for (int n = 0; n < colsb[c] / 4; n++) {
            float acc;
            memcpy(&acc, &tiles[c][m][4 * n], 4);
            for (int k = 0; k < colsb[a] / 4; k++) {
                acc += bf16(&tiles[a][m][4 * k]) * bf16(&tiles[b][k][4 * n]);
                acc += bf16(&tiles[a][m][4 * k + 2]) * bf16(&tiles[b][k][4 * n + 2]);
            }
            memcpy(&tiles[c][m][4 * n], &acc, 4);
        }
}

/* C[m][n] += sum over k of A[m][4k..4k+3] (uint8) . B[k][4n..4n+3] (int8), in int32 */
void autotune_amx_tdpbusd(uint8_t c, uint8_t a, uint8_t b) {
    for (int m = 0; m < rows[c]; m++)
        for (int n = 0; n < colsb[c] / 4; n++) {
            int32_t acc;
            memcpy(&acc, &tiles[c][m][4 * n], 4);
            for (int k = 0; k < colsb[a] / 4; k++)
                for (int i = 0; i < 4; i++)
                    acc += (int32_t)tiles[a][m][4 * k + i] * (int32_t)(int8_t)tiles[b][k][4 * n + i];
            memcpy(&tiles[c][m][4 * n], &acc, 4);
        }
}
