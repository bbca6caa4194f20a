// llama_ref.cpp — llama.cpp's greedy ids, top-2 margins and intermediate tensors for the
// cases of ../shared/models/expected/real-models.json, computed the way those references
// were made, so Tessera's numerics can be compared with llama.cpp's step by step.
//
// A development tool, not part of the CMake build (it links libllama of the llama-cpp-python
// 0.3.36 vendor tree, the tree that made the references). Build (a few minutes, -j2):
//   L=/work/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp; B=/work/llama-build-exact
//   cmake -S $L -B $B -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
//         -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
//   cmake --build $B --target llama -j2
//   g++ -O2 -std=c++17 -I$L/include -I$L/ggml/include ops/llama-ref/llama_ref.cpp \
//       -o /tmp/llama_ref -L$B/bin -lllama -lggml -lggml-base -Wl,-rpath,$B/bin
// Cases file: one line per case, "n_predict id id id ..." (the prompt ids), e.g. from
//   python3 -c 'import json,sys; [print(len(c["ids"]), *c["prompt_ids"]) for c in
//     json.load(open(sys.argv[1]))["models"][sys.argv[2]]["cases"]]' real-models.json NAME
// Run: llama_ref MODEL CASES [--threads 2] [--n-ctx 512] [--fa 1|0|2] [--no-repack]
//        [--case K] [--dump DIR --dump-case K --dump-step S [--filter NAME]]
// Prints "case K ids ..." and "case K margins ..." per case.
// With --fa 1 (the default: flash attention on, n_ctx 512, n_batch/n_ubatch 512, 2
// threads) it reproduces every id and every margin of real-models.json on an AVX-512
// machine; with flash attention off (--fa 0) the margins move by up to 0.7 and ids part.
// --dump writes every graph tensor of one decode step as raw float32 files
// DIR/NNN_NAME_NE0xNE1xNE2xNE3.f32 (ggml order, ne0 fastest).
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <sstream>
#include <fstream>
#include <algorithm>

static std::string g_dump_dir;
static bool g_dump_on = false;
static int g_dump_seq = 0;
static std::string g_filter;

static bool cb(struct ggml_tensor *t, bool ask, void *) {
    if (!g_dump_on) return false;
    if (ask) {
        if (!g_filter.empty() && !strstr(t->name, g_filter.c_str())) return false;
        return true;
    }
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16) return true;
    size_t n = ggml_nelements(t);
    std::vector<float> buf(n);
    // gather with strides
    std::vector<uint8_t> raw(ggml_nbytes(t));
    ggml_backend_tensor_get(t, raw.data(), 0, raw.size());
    size_t k = 0;
    for (int64_t i3 = 0; i3 < t->ne[3]; i3++)
    for (int64_t i2 = 0; i2 < t->ne[2]; i2++)
    for (int64_t i1 = 0; i1 < t->ne[1]; i1++)
    for (int64_t i0 = 0; i0 < t->ne[0]; i0++) {
        size_t off = i0*t->nb[0] + i1*t->nb[1] + i2*t->nb[2] + i3*t->nb[3];
        if (t->type == GGML_TYPE_F32) buf[k++] = *(float *)(raw.data() + off);
        else buf[k++] = ggml_fp16_to_fp32(*(ggml_fp16_t *)(raw.data() + off));
    }
    char path[512];
    snprintf(path, sizeof path, "%s/%03d_%s_%lldx%lldx%lldx%lld.f32", g_dump_dir.c_str(), g_dump_seq++, t->name,
             (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3]);
    for (char *p = path + g_dump_dir.size() + 1; *p; p++) if (*p == '/' || *p == ' ') *p = '_';
    FILE *f = fopen(path, "wb");
    fwrite(buf.data(), 4, n, f);
    fclose(f);
    return true;
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage\n"); return 2; }
    const char *model_path = argv[1];
    const char *cases_path = argv[2];
    int threads = 2, n_ctx = 512, dump_step = -1, dump_case = -1, only_case = -1;
    bool no_repack = false;
    int ubatch = 512;
    int fa = 1;
    for (int i = 3; i < argc; i++) {
        std::string a = argv[i];
        if (a == "--threads") threads = atoi(argv[++i]);
        else if (a == "--n-ctx") n_ctx = atoi(argv[++i]);
        else if (a == "--no-repack") no_repack = true;
        else if (a == "--dump") g_dump_dir = argv[++i];
        else if (a == "--dump-step") dump_step = atoi(argv[++i]);
        else if (a == "--dump-case") dump_case = atoi(argv[++i]);
        else if (a == "--filter") g_filter = argv[++i];
        else if (a == "--case") only_case = atoi(argv[++i]);
        else if (a == "--ubatch") ubatch = atoi(argv[++i]);
        else if (a == "--fa") fa = atoi(argv[++i]);
    }
    llama_backend_init();
    llama_log_set([](enum ggml_log_level, const char *, void *) {}, nullptr);
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.use_extra_bufts = !no_repack;
    llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) { fprintf(stderr, "load failed\n"); return 1; }
    const llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    std::ifstream in(cases_path);
    std::string line;
    int ci = -1;
    while (std::getline(in, line)) {
        if (line.empty()) continue;
        ci++;
        if (only_case >= 0 && ci != only_case) continue;
        std::istringstream ss(line);
        int n_predict; ss >> n_predict;
        std::vector<llama_token> prompt; int x;
        while (ss >> x) prompt.push_back(x);
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = n_ctx; cp.n_batch = 512; cp.n_ubatch = ubatch;
        cp.n_threads = threads; cp.n_threads_batch = threads;
        cp.flash_attn_type = fa == 1 ? LLAMA_FLASH_ATTN_TYPE_ENABLED : fa == 2 ? LLAMA_FLASH_ATTN_TYPE_AUTO : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        cp.cb_eval = cb; cp.cb_eval_user_data = nullptr;
        llama_context *ctx = llama_init_from_model(model, cp);
        if (!ctx) { fprintf(stderr, "ctx failed\n"); return 1; }
        std::vector<llama_token> out;
        std::vector<float> margins;
        int n_past = 0;
        std::vector<llama_token> cur = prompt;
        for (int step = 0; step < n_predict; step++) {
            g_dump_on = !g_dump_dir.empty() && ci == dump_case && step == dump_step;
            llama_batch b = llama_batch_get_one(cur.data(), (int)cur.size());
            if (llama_decode(ctx, b) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
            n_past += cur.size();
            const float *lg = llama_get_logits_ith(ctx, -1);
            int best = 0;
            for (int i = 1; i < n_vocab; i++) if (lg[i] > lg[best]) best = i;
            float second = -1e30f;
            for (int i = 0; i < n_vocab; i++) if (i != best && lg[i] > second) second = lg[i];
            out.push_back(best);
            margins.push_back(lg[best] - second);
            if (g_dump_on) {
                char path[512]; snprintf(path, sizeof path, "%s/logits.f32", g_dump_dir.c_str());
                FILE *f = fopen(path, "wb"); fwrite(lg, 4, n_vocab, f); fclose(f);
            }
            if (llama_vocab_is_eog(vocab, best)) break;
            cur.assign(1, best);
        }
        printf("case %d ids", ci);
        for (auto t : out) printf(" %d", t);
        printf("\ncase %d margins", ci);
        for (auto m : margins) printf(" %.4f", m);
        printf("\n");
        fflush(stdout);
        llama_free(ctx);
    }
    llama_model_free(model);
    return 0;
}
