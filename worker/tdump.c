/* tdump.c — see tdump.h. */
#include "worker/tdump.h"

#include <stdio.h>
#include <stdlib.h>

bool tsr_tdump_active = false;

static const char *g_dir;
static long g_call_wanted;
static long g_call = -1;
static bool g_init;

void tsr_tdump_begin_call(void)
{
    if (!g_init) {
        g_init = true;
        g_dir = getenv("TSR_DUMP_DIR");
        if (g_dir && !*g_dir) g_dir = NULL;
        const char *cs = getenv("TSR_DUMP_CALL");
        g_call_wanted = cs ? strtol(cs, NULL, 10) : 0;
    }
    if (!g_dir) return;
    g_call++;
    tsr_tdump_active = g_call == g_call_wanted;
}

void tsr_tdump_write(const char *name, int layer, const float *x, size_t n)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s-%d.f32", g_dir, name, layer);
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "tessera: TSR_DUMP_DIR: cannot write %s\n", path);
        return;
    }
    if (fwrite(x, sizeof(float), n, f) != n)
        fprintf(stderr, "tessera: TSR_DUMP_DIR: short write to %s\n", path);
    fclose(f);
}
