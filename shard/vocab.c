/*
 * vocab.c — SPM and byte-level BPE tokenizers built from GGUF metadata (see vocab.h).
 *
 * The algorithms follow llama.cpp's src/llama-vocab.cpp and src/unicode.cpp closely,
 * because the reference token ids were produced by llama.cpp and every small deviation
 * (which special tokens are cut out first, how the pre-tokenizer keeps unmatched text,
 * which merge wins a tie) changes ids:
 *
 *   - special-token partition: the text is cut at every occurrence of each special token,
 *     longest token text first (tokenizer_st_partition);
 *   - SPM: UTF-8 characters are symbols; adjacent pairs whose concatenation is a token go
 *     into a max-heap by token score (ties: leftmost); the best pair is merged and its new
 *     neighbours are proposed, until the heap is empty; symbols that are not tokens are
 *     emitted as <0xNN> byte tokens;
 *   - BPE: the pre-tokenizer regexes split the text, one after the other, and the parts a
 *     regex does not match are kept as words of their own (unicode_regex_split_stl); every
 *     word is byte-encoded (GPT-2 byte->unicode table) and merged lowest merge rank first.
 *
 * Regexes run on PCRE2 (UTF + UCP) instead of llama.cpp's std::regex + hand-written
 * matchers; both implement the same patterns. Two details make them agree: every pattern
 * is matched against one fragment at a time (so `$` and `(?!\S)` see the fragment end), and
 * `\s` is widened with U+0085, which llama.cpp counts as whitespace and PCRE2 10.42 does not.
 * Input for the BPE path is first made well-formed UTF-8 (one U+FFFD per ill-formed byte,
 * as llama.cpp's unicode_cpts_from_utf8 does) so PCRE2 can skip its own validity checks,
 * which would otherwise re-scan the whole subject at every match (quadratic).
 */
#include "shard/vocab.h"

#include "kernels/util.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_REGEX        8
#define MAX_TOKENS       (1 << 26) /* sanity bound on the vocabulary size */
#define REPLACEMENT_CHAR "\xEF\xBF\xBD"

/* ------------------------------------------------------------------------------------ */
/* UTF-8                                                                                */

/* Sequence length announced by a lead byte, as llama.cpp's unicode_len_utf8 (continuation
 * and invalid bytes count as 1). Used to cut symbols exactly where llama.cpp cuts them. */
static size_t utf8_lead_len(uint8_t c)
{
    static const uint8_t lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lookup[c >> 4];
}

/* Classify the bytes at s[0..n) (n >= 1) per Unicode table 3-7:
 *   1  a well-formed character of *len bytes;
 *   0  a valid but incomplete prefix (all n bytes), more bytes needed;
 *  -1  ill-formed: *len is the maximal subpart to replace with one U+FFFD (>= 1). */
static int utf8_check(const uint8_t *s, size_t n, size_t *len)
{
    uint8_t b0 = s[0], lo = 0x80, hi = 0xBF;
    size_t need;
    if (b0 < 0x80) {
        *len = 1;
        return 1;
    }
    if (b0 >= 0xC2 && b0 <= 0xDF) {
        need = 1;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
        need = 2;
        if (b0 == 0xE0) lo = 0xA0;
        if (b0 == 0xED) hi = 0x9F; /* no surrogates */
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
        need = 3;
        if (b0 == 0xF0) lo = 0x90;
        if (b0 == 0xF4) hi = 0x8F; /* <= U+10FFFF */
    } else {
        *len = 1;
        return -1;
    }
    for (size_t k = 1; k <= need; k++) {
        if (k >= n) {
            *len = k;
            return 0;
        }
        uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
        if (s[k] < l || s[k] > h) {
            *len = k;
            return -1;
        }
    }
    *len = need + 1;
    return 1;
}

/* Lax decoder used only to read token texts (they come from the file): returns the code
 * point at s and its length; ill-formed bytes decode to U+FFFD, one byte each. */
static uint32_t utf8_decode(const uint8_t *s, size_t n, size_t *len)
{
    if (utf8_check(s, n, len) != 1) {
        *len = 1;
        return 0xFFFD;
    }
    switch (*len) {
    case 1:
        return s[0];
    case 2:
        return ((uint32_t)(s[0] & 0x1F) << 6) | (s[1] & 0x3F);
    case 3:
        return ((uint32_t)(s[0] & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
    default:
        return ((uint32_t)(s[0] & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
               ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
    }
}

static size_t utf8_encode(uint32_t cp, char *out)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* ------------------------------------------------------------------------------------ */
/* GPT-2 byte <-> unicode table: printable Latin-1 bytes stand for themselves, the other  */
/* 68 bytes are mapped in order to U+0100.. so that every byte is a visible character.    */

static uint32_t byte_to_cp(uint8_t b)
{
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE)) return b;
    uint32_t n = 0;
    for (uint32_t c = 0; c < b; c++)
        if (!((c >= 0x21 && c <= 0x7E) || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE))) n++;
    return 256 + n;
}

/* ------------------------------------------------------------------------------------ */
/* string tables and hash maps                                                          */

/* Strings stored back to back in one arena, each NUL-terminated. */
typedef struct {
    char *data;
    size_t used, cap;
    uint32_t *off, *len;
    uint32_t n;
} strtab;

static void strtab_free(strtab *t)
{
    free(t->data);
    free(t->off);
    free(t->len);
    memset(t, 0, sizeof *t);
}

static int strtab_init(strtab *t, uint32_t n, size_t bytes_hint)
{
    memset(t, 0, sizeof *t);
    t->off = malloc((n ? n : 1) * sizeof *t->off);
    t->len = malloc((n ? n : 1) * sizeof *t->len);
    t->cap = bytes_hint + 16;
    t->data = malloc(t->cap);
    if (!t->off || !t->len || !t->data) {
        strtab_free(t);
        return TSR_VOCAB_ERR_NOMEM;
    }
    return 0;
}

/* Append string i (the caller appends in index order). */
static int strtab_add(strtab *t, const char *s, size_t len)
{
    if (len > UINT32_MAX - 1 || t->used + len + 1 > UINT32_MAX) return TSR_VOCAB_ERR_FORMAT;
    if (t->used + len + 1 > t->cap) {
        size_t cap = t->cap * 2;
        while (cap < t->used + len + 1) cap *= 2;
        char *p = realloc(t->data, cap);
        if (!p) return TSR_VOCAB_ERR_NOMEM;
        t->data = p;
        t->cap = cap;
    }
    memcpy(t->data + t->used, s, len);
    t->data[t->used + len] = 0;
    t->off[t->n] = (uint32_t)t->used;
    t->len[t->n] = (uint32_t)len;
    t->used += len + 1;
    t->n++;
    return 0;
}

static uint32_t hash_bytes(const void *p, size_t n)
{
    const uint8_t *s = p;
    uint64_t h = 1469598103934665603ull; /* FNV-1a 64 */
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ull;
    return (uint32_t)(h ^ (h >> 32));
}

/* Open-addressing map from the strings of a strtab to their index. */
typedef struct {
    uint32_t *slot; /* index + 1, 0 = empty */
    uint32_t *hash;
    uint32_t mask;
} strmap;

static void strmap_free(strmap *m)
{
    free(m->slot);
    free(m->hash);
    memset(m, 0, sizeof *m);
}

static int strmap_init(strmap *m, uint32_t n)
{
    uint32_t cap = 16;
    while (cap < 2u * n) cap *= 2;
    m->slot = calloc(cap, sizeof *m->slot);
    m->hash = calloc(cap, sizeof *m->hash);
    m->mask = cap - 1;
    if (!m->slot || !m->hash) {
        strmap_free(m);
        return TSR_VOCAB_ERR_NOMEM;
    }
    return 0;
}

static int64_t strmap_find(const strmap *m, const strtab *t, const char *key, size_t len,
                           uint32_t h)
{
    for (uint32_t i = h & m->mask;; i = (i + 1) & m->mask) {
        uint32_t s = m->slot[i];
        if (!s) return -1;
        if (m->hash[i] == h && t->len[s - 1] == len &&
            memcmp(t->data + t->off[s - 1], key, len) == 0)
            return s - 1;
    }
}

/* Insert string `idx` of t; returns the index already holding the same text, or -1. */
static int64_t strmap_insert(strmap *m, const strtab *t, uint32_t idx)
{
    const char *key = t->data + t->off[idx];
    uint32_t len = t->len[idx], h = hash_bytes(key, len);
    for (uint32_t i = h & m->mask;; i = (i + 1) & m->mask) {
        uint32_t s = m->slot[i];
        if (!s) {
            m->slot[i] = idx + 1;
            m->hash[i] = h;
            return -1;
        }
        if (m->hash[i] == h && t->len[s - 1] == len &&
            memcmp(t->data + t->off[s - 1], key, len) == 0)
            return s - 1;
    }
}

/* ------------------------------------------------------------------------------------ */
/* pre-tokenizers (regex lists from llama.cpp's llm_tokenizer_bpe)                       */

#define RX_GPT2         "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
#define RX_CONTRACTIONS "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#define RX_LLAMA3                                                                                  \
    RX_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"   \
                    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RX_QWEN2                                                                                   \
    RX_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"        \
                    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RX_QWEN35                                                                                  \
    RX_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?[\\p{L}\\p{M}]+|\\p{N}| ?[^\\s\\p{L}\\p{M}\\p{N}]+"    \
                    "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
/* CJK ranges of the deepseek pre-tokenizers: 一-龥, U+0800-一, 가-U+D7FF. */
#define RX_DEEPSEEK_CJK "[\\x{4E00}-\\x{9FA5}\\x{0800}-\\x{4E00}\\x{AC00}-\\x{D7FF}]+"
/* deepseek-llm's cased-letter class, spelled with code points instead of literals. */
#define RX_DEEPSEEK_LETTERS                                                                        \
    "\\s?[A-Za-z\\x{B5}\\x{C0}-\\x{D6}\\x{D8}-\\x{F6}\\x{F8}-\\x{1BA}\\x{1BC}-\\x{1BF}"            \
    "\\x{1C4}-\\x{293}\\x{295}-\\x{2AF}\\x{370}-\\x{373}\\x{376}-\\x{377}\\x{37B}-\\x{37D}"        \
    "\\x{37F}\\x{386}\\x{388}-\\x{38A}\\x{38C}\\x{38E}-\\x{3A1}\\x{3A3}-\\x{3F5}"                  \
    "\\x{3F7}-\\x{481}\\x{48A}-\\x{52F}\\x{531}-\\x{556}\\x{10A0}-\\x{10C5}\\x{13A0}-\\x{13F5}"    \
    "\\x{13F8}-\\x{13FD}\\x{1C90}-\\x{1CBA}\\x{1CBD}-\\x{1CBF}\\x{1D00}-\\x{1D2B}"                 \
    "\\x{1D6B}-\\x{1D77}\\x{1D79}-\\x{1D9A}\\x{1E00}-\\x{1F15}\\x{1F18}-\\x{1F1D}"                 \
    "\\x{1F20}-\\x{1F45}\\x{1F48}-\\x{1F4D}\\x{1F50}-\\x{1F57}\\x{1F59}\\x{1F5B}\\x{1F5D}"         \
    "\\x{1F5F}-\\x{1F7D}\\x{1F80}-\\x{1FB4}\\x{1FB6}-\\x{1FBC}\\x{1FBE}\\x{1FC2}-\\x{1FC4}"        \
    "\\x{1FC6}-\\x{1FCC}\\x{1FD0}-\\x{1FD3}\\x{1FD6}-\\x{1FDB}\\x{1FE0}-\\x{1FEC}"                 \
    "\\x{1FF2}-\\x{1FF4}\\x{1FF6}-\\x{1FFC}\\x{2102}\\x{2107}\\x{210A}-\\x{2113}\\x{2115}"         \
    "\\x{2119}-\\x{211D}\\x{2124}\\x{2126}\\x{2128}\\x{212A}-\\x{212D}\\x{212F}-\\x{2134}"         \
    "\\x{2139}\\x{213C}-\\x{213F}\\x{2145}-\\x{2149}\\x{214E}\\x{2183}-\\x{2184}"                  \
    "\\x{2C00}-\\x{2C7B}\\x{2C7E}-\\x{2CE4}\\x{2CEB}-\\x{2CEE}\\x{2CF2}-\\x{2CF3}"                 \
    "\\x{A640}-\\x{A66D}\\x{A680}-\\x{A69B}\\x{A722}-\\x{A76F}\\x{A771}-\\x{A787}"                 \
    "\\x{A78B}-\\x{A78E}\\x{AB70}-\\x{ABBF}\\x{FB00}-\\x{FB06}\\x{FB13}-\\x{FB17}"                 \
    "\\x{FF21}-\\x{FF3A}\\x{FF41}-\\x{FF5A}\\x{10400}-\\x{1044F}\\x{104B0}-\\x{104D3}"             \
    "\\x{104D8}-\\x{104FB}\\x{10C80}-\\x{10CB2}\\x{10CC0}-\\x{10CF2}\\x{118A0}-\\x{118DF}"         \
    "\\x{1E900}-\\x{1E943}]+"

typedef enum {
    PRE_DEFAULT,
    PRE_GPT2,
    PRE_LLAMA3,
    PRE_QWEN2,
    PRE_QWEN35,
    PRE_DEEPSEEK_LLM,
    PRE_DEEPSEEK_CODER,
    PRE_DEEPSEEK3,
    PRE_FALCON,
    PRE_STARCODER,
    PRE_COUNT
} pre_kind;

static const char *const k_pre_regex[PRE_COUNT][MAX_REGEX] = {
    [PRE_DEFAULT] = {"[\\p{P}\\$\\+<=>\\^~\\|]+", RX_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"},
    [PRE_GPT2] = {RX_GPT2},
    [PRE_LLAMA3] = {RX_LLAMA3},
    [PRE_QWEN2] = {RX_QWEN2},
    [PRE_QWEN35] = {RX_QWEN35},
    [PRE_DEEPSEEK_LLM] = {"[\r\n]", RX_DEEPSEEK_LETTERS,
                          "\\s?[!-/:-~\\x{FF01}-\\x{FF0F}\\x{FF1A}-\\x{FF5E}\\x{2018}-\\x{201F}"
                          "\\x{3000}-\\x{3002}]+",
                          "\\s+$", RX_DEEPSEEK_CJK, "\\p{N}+"},
    [PRE_DEEPSEEK_CODER] = {"[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", RX_DEEPSEEK_CJK, "\\p{N}"},
    [PRE_DEEPSEEK3] = {"\\p{N}{1,3}",
                       "[\\x{4E00}-\\x{9FA5}\\x{3040}-\\x{309F}\\x{30A0}-\\x{30FF}]+",
                       "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}"
                       "\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|"
                       "\\s+"},
    [PRE_FALCON] = {"[\\p{P}\\$\\+<=>\\^~\\|`]+", RX_GPT2, "[0-9][0-9][0-9]"},
    [PRE_STARCODER] = {"\\p{N}", RX_GPT2},
};

#define PRE_IGNORE_MERGES 1u /* a word that is itself a token skips the merges */
#define PRE_ADD_BOS       2u /* the family adds BOS unless add_bos_token says otherwise */
#define PRE_NO_BOS        4u /* the family has no default BOS */

/* `tokenizer.ggml.pre` values, as llama.cpp maps them. */
static const struct {
    const char *name;
    pre_kind kind;
    uint32_t flags;
} k_pre_names[] = {
    {"default", PRE_DEFAULT, 0},
    {"llama3", PRE_LLAMA3, PRE_IGNORE_MERGES | PRE_ADD_BOS},
    {"llama-v3", PRE_LLAMA3, PRE_IGNORE_MERGES | PRE_ADD_BOS},
    {"llama-bpe", PRE_LLAMA3, PRE_IGNORE_MERGES | PRE_ADD_BOS},
    {"falcon3", PRE_LLAMA3, PRE_IGNORE_MERGES | PRE_ADD_BOS},
    {"falcon-h1", PRE_LLAMA3, PRE_IGNORE_MERGES | PRE_ADD_BOS},
    {"pixtral", PRE_LLAMA3, PRE_IGNORE_MERGES | PRE_ADD_BOS},
    {"midm-2.0", PRE_LLAMA3, PRE_IGNORE_MERGES | PRE_ADD_BOS},
    {"lfm2", PRE_LLAMA3, PRE_IGNORE_MERGES | PRE_ADD_BOS},
    {"dbrx", PRE_LLAMA3, 0},
    {"smaug-bpe", PRE_LLAMA3, 0},
    {"chatglm-bpe", PRE_LLAMA3, PRE_NO_BOS},
    {"glm4", PRE_LLAMA3, PRE_NO_BOS},
    {"deepseek-llm", PRE_DEEPSEEK_LLM, 0},
    {"deepseek-coder", PRE_DEEPSEEK_CODER, 0},
    {"deepseek-v3", PRE_DEEPSEEK3, 0},
    {"falcon", PRE_FALCON, 0},
    {"gpt-2", PRE_GPT2, 0},
    {"mpt", PRE_GPT2, 0},
    {"olmo", PRE_GPT2, 0},
    {"jais", PRE_GPT2, 0},
    {"phi-2", PRE_GPT2, 0},
    {"jina-es", PRE_GPT2, 0},
    {"jina-de", PRE_GPT2, 0},
    {"jina-v1-en", PRE_GPT2, 0},
    {"jina-v2-es", PRE_GPT2, 0},
    {"jina-v2-de", PRE_GPT2, 0},
    {"jina-v2-code", PRE_GPT2, 0},
    {"roberta-bpe", PRE_GPT2, 0},
    {"gigachat", PRE_GPT2, 0},
    {"a.x-4.0", PRE_GPT2, 0},
    {"mellum", PRE_GPT2, 0},
    {"modern-bert", PRE_GPT2, 0},
    {"exaone4", PRE_GPT2, 0},
    {"starcoder", PRE_STARCODER, 0},
    {"refact", PRE_STARCODER, 0},
    {"command-r", PRE_STARCODER, 0},
    {"smollm", PRE_STARCODER, 0},
    {"codeshell", PRE_STARCODER, 0},
    {"exaone", PRE_STARCODER, 0},
    {"minerva-7b", PRE_STARCODER, 0},
    {"qwen2", PRE_QWEN2, 0},
    {"deepseek-r1-qwen", PRE_QWEN2, 0},
    {"kormo", PRE_QWEN2, 0},
    {"megrez", PRE_QWEN2, 0},
    {"stablelm2", PRE_QWEN2, 0},
    {"hunyuan", PRE_QWEN2, 0},
    {"qwen35", PRE_QWEN35, 0},
};

/* Rewrite a llama.cpp pattern for PCRE2: `\s` also matches U+0085 (llama.cpp's whitespace
 * table has it, PCRE2 10.42's UCP \s does not). Returns a malloc'd string or NULL. */
static char *rx_rewrite(const char *src)
{
    size_t n = strlen(src), o = 0;
    char *out = malloc(n * 4 + 1); /* each "\s" grows to at most 12 bytes */
    if (!out) return NULL;
    bool in_class = false;
    for (size_t i = 0; i < n; i++) {
        char c = src[i];
        if (c == '\\' && i + 1 < n) {
            char e = src[i + 1];
            const char *rep = NULL;
            if (e == 's') rep = in_class ? "\\s\\x{85}" : "[\\s\\x{85}]";
            if (e == 'S' && !in_class) rep = "[^\\s\\x{85}]";
            if (rep) {
                memcpy(out + o, rep, strlen(rep));
                o += strlen(rep);
            } else {
                out[o++] = c;
                out[o++] = e;
            }
            i++;
            continue;
        }
        if (c == '[' && !in_class) {
            in_class = true;
        } else if (c == ']' && in_class) {
            in_class = false;
        }
        out[o++] = c;
    }
    out[o] = 0;
    return out;
}

/* ------------------------------------------------------------------------------------ */
/* the vocabulary                                                                       */

struct tsr_vocab {
    tsr_vocab_type type;
    int32_t n_tokens;
    strtab tok; /* token texts as in the file */
    strmap tok_map;
    float *score;
    uint32_t *attr;
    uint8_t *eog;
    int32_t *eog_ids; /* the ids with eog[id] set, ascending */
    uint32_t n_eog;
    strtab merge; /* BPE merges "left right", index = rank */
    strmap merge_map;
    strtab piece; /* token_to_piece(id, render_special = true) */
    uint32_t max_piece_len;
    int32_t *special; /* partition candidates: control/user-defined/unknown, longest first */
    uint32_t n_special;
    int32_t byte_tok[256]; /* SPM: id of <0xNN>, or TSR_TOKEN_NULL */
    char byte_enc[256][3]; /* BPE: UTF-8 of the byte's GPT-2 character (1-2 bytes) */
    uint8_t byte_enc_len[256];
    int32_t bos, eos, eot, eom, unk, sep, pad;
    bool add_bos, add_eos, add_space_prefix, ignore_merges;
    char pre[64];
    pcre2_code *re[MAX_REGEX];
    uint32_t n_re;
};

void tsr_vocab_free(tsr_vocab *v)
{
    if (!v) return;
    strtab_free(&v->tok);
    strmap_free(&v->tok_map);
    free(v->score);
    free(v->attr);
    free(v->eog);
    free(v->eog_ids);
    strtab_free(&v->merge);
    strmap_free(&v->merge_map);
    strtab_free(&v->piece);
    free(v->special);
    for (uint32_t i = 0; i < v->n_re; i++) pcre2_code_free(v->re[i]);
    free(v);
}

static int32_t find_token(const tsr_vocab *v, const char *s, size_t len)
{
    return (int32_t)strmap_find(&v->tok_map, &v->tok, s, len, hash_bytes(s, len));
}

/* ---- metadata helpers ---- */

static const char *vtype_name(const tsr_gguf *g, int64_t idx)
{
    tsr_gguf_vtype t = tsr_gguf_kv_type(g, idx);
    if (t == TSR_GGUF_ARRAY) {
        tsr_gguf_vtype et;
        uint64_t n;
        if (tsr_gguf_kv_arr(g, idx, &et, &n)) {
            static _Thread_local char buf[64];
            snprintf(buf, sizeof buf, "array of %s", tsr_gguf_vtype_name(et));
            return buf;
        }
    }
    return tsr_gguf_vtype_name(t);
}

/* Optional string key: *present false when absent; error when it has another type. */
static int read_opt_str(const tsr_gguf *g, const char *key, tsr_gguf_str *out, bool *present,
                        char *err, size_t err_len)
{
    int64_t idx = tsr_gguf_find_key(g, key);
    *present = idx >= 0;
    if (idx < 0) return 0;
    if (!tsr_gguf_kv_str(g, idx, out))
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT, "%s has type %s, expected a string",
                        key, vtype_name(g, idx));
    return 0;
}

static int read_opt_bool(const tsr_gguf *g, const char *key, bool *out, char *err, size_t err_len)
{
    int64_t idx = tsr_gguf_find_key(g, key), v;
    if (idx < 0) return 0;
    if (tsr_gguf_kv_type(g, idx) != TSR_GGUF_BOOL || !tsr_gguf_kv_int(g, idx, &v))
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT, "%s has type %s, expected a bool", key,
                        vtype_name(g, idx));
    *out = v != 0;
    return 0;
}

/* Special token id key: absent keeps *id; -1 / 0xFFFFFFFF mean "none"; another id outside
 * the vocabulary is an error (llama.cpp only warns; a wrong BOS silently corrupts every
 * prompt, so Tessera refuses the file). */
static int read_special_id(const tsr_gguf *g, const char *key, int32_t n_tokens, int32_t *id,
                           char *err, size_t err_len)
{
    int64_t idx = tsr_gguf_find_key(g, key), v;
    if (idx < 0) return 0;
    if (tsr_gguf_kv_type(g, idx) == TSR_GGUF_BOOL || !tsr_gguf_kv_int(g, idx, &v))
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT, "%s has type %s, expected an integer",
                        key, vtype_name(g, idx));
    if (v == -1 || v == (int64_t)UINT32_MAX) {
        *id = TSR_TOKEN_NULL;
        return 0;
    }
    if (v < 0 || v >= n_tokens)
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                        "%s = %lld is outside the vocabulary (%d tokens)", key, (long long)v,
                        (int)n_tokens);
    *id = (int32_t)v;
    return 0;
}

/* Array key of any element type check: returns its index or -1 when absent. */
static int find_array(const tsr_gguf *g, const char *key, tsr_gguf_vtype *et, uint64_t *n,
                      int64_t *idx, char *err, size_t err_len)
{
    *idx = tsr_gguf_find_key(g, key);
    if (*idx < 0) return 0;
    if (!tsr_gguf_kv_arr(g, *idx, et, n))
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT, "%s has type %s, expected an array",
                        key, vtype_name(g, *idx));
    return 0;
}

static bool str_eq(const char *a, size_t alen, const char *b)
{
    return alen == strlen(b) && memcmp(a, b, alen) == 0;
}

/* ---- token attributes from texts (llama.cpp's "auto-detect special tokens by text") ---- */

static const char *const k_eot_texts[] = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<\xEF\xBD\x9C"
    "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>", /* DeepSeek */
    "[EOT]",                                              /* Kimi-K2 */
    "<end_of_utterance>",                                 /* SmolDocling */
    NULL};
static const char *const k_eom_texts[] = {"<|eom_id|>", NULL};
static const char *const k_fim_pre_texts[] = {"<|fim_prefix|>",
                                              "<fim-prefix>",
                                              "<fim_prefix>",
                                              "<\xEF\xBD\x9C"
                                              "fim\xE2\x96\x81"
                                              "begin\xEF\xBD\x9C>",
                                              "<PRE>",
                                              "\xE2\x96\x81<PRE>",
                                              NULL};
static const char *const k_fim_suf_texts[] = {"<|fim_suffix|>",
                                              "<fim-suffix>",
                                              "<fim_suffix>",
                                              "<\xEF\xBD\x9C"
                                              "fim\xE2\x96\x81"
                                              "hole\xEF\xBD\x9C>",
                                              "<SUF>",
                                              "\xE2\x96\x81<SUF>",
                                              NULL};
static const char *const k_fim_mid_texts[] = {"<|fim_middle|>",
                                              "<fim-middle>",
                                              "<fim_middle>",
                                              "<\xEF\xBD\x9C"
                                              "fim\xE2\x96\x81"
                                              "end\xEF\xBD\x9C>",
                                              "<MID>",
                                              "\xE2\x96\x81<MID>",
                                              NULL};
static const char *const k_fim_pad_texts[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>",
                                              NULL};
static const char *const k_fim_rep_texts[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>",
                                              "<REPO>",       "<reponame>",    NULL};
static const char *const k_fim_sep_texts[] = {"<|file_sep|>", NULL};
/* Tokens that end generation whatever the metadata says (llama.cpp's special_eog_ids). */
static const char *const k_eog_texts[] = {"<|eot_id|>",
                                          "<|im_end|>",
                                          "<|end|>",
                                          "<|return|>",
                                          "<|call|>", /* o200k_harmony */
                                          "<|flush|>",
                                          "<|calls|>", /* solar-open */
                                          "<end_of_turn>",
                                          "<|endoftext|>",
                                          "</s>", /* paddleocr */
                                          "<|eom_id|>",
                                          "<EOT>",
                                          "_<EOT>",
                                          "[EOT]",
                                          "[EOS]", /* Kimi-K2 */
                                          "<|end_of_text|>",
                                          "<end_of_utterance>", /* SmolDocling */
                                          "<eos>",
                                          "<turn|>",
                                          "<|tool_response>", /* Gemma 4 */
                                          NULL};

/* Lowest id whose text is in `texts`, or TSR_TOKEN_NULL. */
static int32_t find_any(const tsr_vocab *v, const char *const *texts)
{
    int32_t best = TSR_TOKEN_NULL;
    for (; *texts; texts++) {
        int32_t id = find_token(v, *texts, strlen(*texts));
        if (id >= 0 && (best < 0 || id < best)) best = id;
    }
    return best;
}

/* Mark the found token CONTROL (llama.cpp overrides the type of such tokens). */
static void mark_control(tsr_vocab *v, int32_t id)
{
    if (id >= 0) v->attr[id] |= TSR_VOCAB_ATTR_CONTROL;
}

static int detect_special_tokens(tsr_vocab *v)
{
    if (v->eot < 0) {
        v->eot = find_any(v, k_eot_texts);
        mark_control(v, v->eot);
    }
    if (v->eom < 0) {
        v->eom = find_any(v, k_eom_texts);
        mark_control(v, v->eom);
    }
    const char *const *fim[] = {k_fim_pre_texts, k_fim_suf_texts, k_fim_mid_texts,
                                k_fim_pad_texts, k_fim_rep_texts, k_fim_sep_texts};
    for (int k = 0; k < 6; k++) {
        int32_t id = find_any(v, fim[k]);
        mark_control(v, id);
        if (k >= 3 && id >= 0) v->eog[id] = 1; /* FIM pad/repo/sep end generation */
    }
    for (const char *const *t = k_eog_texts; *t; t++) {
        int32_t id = find_token(v, *t, strlen(*t));
        if (id >= 0) {
            v->eog[id] = 1;
            mark_control(v, id);
        }
    }
    if (v->eos >= 0) v->eog[v->eos] = 1;
    if (v->eot >= 0) v->eog[v->eot] = 1;
    if (v->eom >= 0) v->eog[v->eom] = 1;

    /* llama.cpp's two exceptions: with <|return|> and <|call|> (gpt-oss), or <|calls|>
     * and <|flush|> (solar-open), <|end|> ends a message, not the generation; with
     * <|tool_response> (Gemma 4), </s> is ordinary text. */
    int32_t ret = find_token(v, "<|return|>", 10), call = find_token(v, "<|call|>", 8),
            calls = find_token(v, "<|calls|>", 9), flush = find_token(v, "<|flush|>", 9),
            end = find_token(v, "<|end|>", 7);
    bool has_call = (call >= 0 && v->eog[call]) || (calls >= 0 && v->eog[calls]);
    if (end >= 0 && v->eog[end] &&
        ((ret >= 0 && v->eog[ret] && has_call) || (has_call && flush >= 0 && v->eog[flush]))) {
        v->eog[end] = 0;
        v->attr[end] = TSR_VOCAB_ATTR_USER_DEFINED;
    }
    int32_t tool = find_token(v, "<|tool_response>", 16), s_end = find_token(v, "</s>", 4);
    if (tool >= 0 && v->eog[tool] && s_end >= 0 && v->eog[s_end]) {
        v->eog[s_end] = 0;
        v->attr[s_end] = TSR_VOCAB_ATTR_NORMAL;
    }
    v->n_eog = 0;
    for (int32_t i = 0; i < v->n_tokens; i++)
        if (v->eog[i]) v->n_eog++;
    v->eog_ids = malloc((v->n_eog ? v->n_eog : 1) * sizeof *v->eog_ids);
    if (!v->eog_ids) return TSR_VOCAB_ERR_NOMEM;
    v->n_eog = 0;
    for (int32_t i = 0; i < v->n_tokens; i++)
        if (v->eog[i]) v->eog_ids[v->n_eog++] = i;
    return 0;
}

/* Sort order of the partition candidates: longest text first, then lowest id. */
static _Thread_local const tsr_vocab *t_sort_vocab;

static int special_cmp(const void *a, const void *b)
{
    const tsr_vocab *v = t_sort_vocab;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint32_t lx = v->tok.len[x], ly = v->tok.len[y];
    if (lx != ly) return lx > ly ? -1 : 1;
    return x < y ? -1 : x > y;
}

/* ---- pieces ---- */

/* Growable byte buffer. */
typedef struct {
    char *a;
    size_t n, cap;
} bbuf;

static int bbuf_reserve(bbuf *b, size_t extra)
{
    if (b->n + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra) cap *= 2;
    char *p = realloc(b->a, cap);
    if (!p) return TSR_VOCAB_ERR_NOMEM;
    b->a = p;
    b->cap = cap;
    return 0;
}

static int bbuf_add(bbuf *b, const void *s, size_t n)
{
    if (bbuf_reserve(b, n)) return TSR_VOCAB_ERR_NOMEM;
    if (n) memcpy(b->a + b->n, s, n);
    b->n += n;
    return 0;
}

/* The text token `id` renders to (llama.cpp token_to_piece with special = true), built in
 * `tmp`. cp_byte maps a GPT-2 byte character (code point < 0x144) back to its byte. */
static int build_piece(tsr_vocab *v, int32_t id, const int16_t *cp_byte, bbuf *tmp)
{
    const char *t = v->tok.data + v->tok.off[id];
    size_t tl = v->tok.len[id];
    uint32_t a = v->attr[id];
    int rc = 0;
    tmp->n = 0;
    if (a & (TSR_VOCAB_ATTR_UNKNOWN | TSR_VOCAB_ATTR_CONTROL | TSR_VOCAB_ATTR_USER_DEFINED))
        return strtab_add(&v->piece, t, tl);
    if (a & TSR_VOCAB_ATTR_NORMAL) {
        if (v->type == TSR_VOCAB_SPM) {
            for (size_t i = 0; i < tl && rc == 0; i++) {
                if (i + 2 < tl && memcmp(t + i, "\xE2\x96\x81", 3) == 0) {
                    rc = bbuf_add(tmp, " ", 1);
                    i += 2;
                } else {
                    rc = bbuf_add(tmp, t + i, 1);
                }
            }
            return rc ? rc : strtab_add(&v->piece, tmp->a, tmp->n);
        }
        /* BPE: every character stands for one byte; llama.cpp renders a character
         * outside the table as "[UNK_BYTE_0x<hex>" + token text + "]" */
        for (size_t i = 0; i < tl && rc == 0;) {
            size_t cl;
            uint32_t cp = utf8_decode((const uint8_t *)t + i, tl - i, &cl);
            if (cp < 0x144 && cp_byte[cp] >= 0) {
                char b = (char)cp_byte[cp];
                rc = bbuf_add(tmp, &b, 1);
            } else {
                char u[4], hex[16];
                size_t ul = utf8_encode(cp, u);
                rc = bbuf_add(tmp, "[UNK_BYTE_0x", 12);
                for (size_t k = 0; k < ul && rc == 0; k++) {
                    snprintf(hex, sizeof hex, "%02x", (uint8_t)u[k]);
                    rc = bbuf_add(tmp, hex, 2);
                }
                if (rc == 0) rc = bbuf_add(tmp, t, tl);
                if (rc == 0) rc = bbuf_add(tmp, "]", 1);
            }
            i += cl;
        }
        return rc ? rc : strtab_add(&v->piece, tmp->a, tmp->n);
    }
    if (a & TSR_VOCAB_ATTR_BYTE) {
        unsigned b;
        char c;
        if (tl == 6 && sscanf(t, "<0x%2x>", &b) == 1) {
            c = (char)b;
            return strtab_add(&v->piece, &c, 1);
        }
        return strtab_add(&v->piece, t, tl); /* malformed byte token: show it as is */
    }
    return strtab_add(&v->piece, "", 0); /* UNDEFINED / UNUSED render nothing */
}

static int build_pieces(tsr_vocab *v)
{
    int16_t cp_byte[0x144];
    for (int i = 0; i < 0x144; i++) cp_byte[i] = -1;
    for (int b = 0; b < 256; b++) cp_byte[byte_to_cp((uint8_t)b)] = (int16_t)b;
    bbuf tmp = {0};
    int rc = strtab_init(&v->piece, (uint32_t)v->n_tokens, v->tok.used);
    for (int32_t i = 0; rc == 0 && i < v->n_tokens; i++) {
        rc = build_piece(v, i, cp_byte, &tmp);
        if (rc == 0 && v->piece.len[i] > v->max_piece_len) v->max_piece_len = v->piece.len[i];
    }
    free(tmp.a);
    return rc;
}

/* ---- load ---- */

static int load_tokens(tsr_vocab *v, const tsr_gguf *g, char *err, size_t err_len)
{
    tsr_gguf_vtype et;
    uint64_t n;
    int64_t idx;
    int rc = find_array(g, "tokenizer.ggml.tokens", &et, &n, &idx, err, err_len);
    if (rc) return rc;
    if (idx < 0)
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT, "tokenizer.ggml.tokens is missing");
    if (et != TSR_GGUF_STRING)
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                        "tokenizer.ggml.tokens has type %s, expected an array of string",
                        vtype_name(g, idx));
    if (n == 0 || n > MAX_TOKENS)
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                        "tokenizer.ggml.tokens has %llu entries (expected 1..%d)",
                        (unsigned long long)n, MAX_TOKENS);
    v->n_tokens = (int32_t)n;

    size_t bytes = 0;
    for (uint64_t i = 0; i < n; i++) {
        tsr_gguf_str s;
        if (!tsr_gguf_arr_str(g, idx, i, &s))
            return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                            "tokenizer.ggml.tokens[%llu] unreadable", (unsigned long long)i);
        bytes += s.len + 1;
    }
    rc = strtab_init(&v->tok, (uint32_t)n, bytes + 32 * 8);
    if (rc)
        return tsr_fail(err, err_len, rc, "out of memory for %llu tokens", (unsigned long long)n);
    for (uint64_t i = 0; i < n && rc == 0; i++) {
        tsr_gguf_str s;
        tsr_gguf_arr_str(g, idx, i, &s);
        if (s.len == 0) { /* llama.cpp names empty tokens so that they stay unique */
            char name[32];
            int l = snprintf(name, sizeof name, "[EMPTY_%llu]", (unsigned long long)i);
            rc = strtab_add(&v->tok, name, (size_t)l);
        } else {
            rc = strtab_add(&v->tok, s.ptr, s.len);
        }
    }
    if (rc) return tsr_fail(err, err_len, rc, "tokenizer.ggml.tokens: too large");

    rc = strmap_init(&v->tok_map, (uint32_t)n);
    if (rc) return tsr_fail(err, err_len, rc, "out of memory for the token map");
    for (uint32_t i = 0; i < (uint32_t)n; i++) {
        int64_t dup = strmap_insert(&v->tok_map, &v->tok, i);
        if (dup >= 0)
            return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                            "duplicate token in tokenizer.ggml.tokens: '%.64s' has ids %lld and %u",
                            v->tok.data + v->tok.off[i], (long long)dup, i);
    }

    /* scores: float (or int32) per token; absent = 0 */
    v->score = calloc(n, sizeof *v->score);
    v->attr = malloc(n * sizeof *v->attr);
    v->eog = calloc(n, 1);
    if (!v->score || !v->attr || !v->eog)
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_NOMEM, "out of memory");
    uint64_t m;
    rc = find_array(g, "tokenizer.ggml.scores", &et, &m, &idx, err, err_len);
    if (rc) return rc;
    if (idx >= 0) {
        bool is_float = et == TSR_GGUF_FLOAT32 || et == TSR_GGUF_FLOAT64;
        if (!is_float && et != TSR_GGUF_INT32)
            return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                            "tokenizer.ggml.scores has type %s, expected an array of float32",
                            vtype_name(g, idx));
        if (m < n)
            return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                            "tokenizer.ggml.scores has %llu entries for %llu tokens",
                            (unsigned long long)m, (unsigned long long)n);
        for (uint64_t i = 0; i < n; i++) {
            double d = 0;
            int64_t k = 0;
            if (is_float ? !tsr_gguf_arr_float(g, idx, i, &d) : !tsr_gguf_arr_int(g, idx, i, &k))
                return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                                "tokenizer.ggml.scores[%llu] unreadable", (unsigned long long)i);
            v->score[i] = is_float ? (float)d : (float)k;
        }
    }

    /* token types -> attributes; absent = all NORMAL */
    rc = find_array(g, "tokenizer.ggml.token_type", &et, &m, &idx, err, err_len);
    if (rc) return rc;
    if (idx >= 0) {
        if (et == TSR_GGUF_STRING || et == TSR_GGUF_ARRAY || et == TSR_GGUF_FLOAT32 ||
            et == TSR_GGUF_FLOAT64 || et == TSR_GGUF_BOOL)
            return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                            "tokenizer.ggml.token_type has type %s, expected an array of int32",
                            vtype_name(g, idx));
        if (m < n)
            return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                            "tokenizer.ggml.token_type has %llu entries for %llu tokens",
                            (unsigned long long)m, (unsigned long long)n);
    }
    for (uint64_t i = 0; i < n; i++) {
        int64_t t = 1;
        if (idx >= 0 && !tsr_gguf_arr_int(g, idx, i, &t))
            return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                            "tokenizer.ggml.token_type[%llu] unreadable", (unsigned long long)i);
        switch (t) {
        case 1:
            v->attr[i] = TSR_VOCAB_ATTR_NORMAL;
            break;
        case 2:
            v->attr[i] = TSR_VOCAB_ATTR_UNKNOWN;
            break;
        case 3:
            v->attr[i] = TSR_VOCAB_ATTR_CONTROL;
            break;
        case 4:
            v->attr[i] = TSR_VOCAB_ATTR_USER_DEFINED;
            break;
        case 5:
            v->attr[i] = TSR_VOCAB_ATTR_UNUSED;
            break;
        case 6:
            v->attr[i] = TSR_VOCAB_ATTR_BYTE;
            break;
        default:
            v->attr[i] = TSR_VOCAB_ATTR_UNDEFINED;
            break;
        }
    }
    return 0;
}

static int load_merges(tsr_vocab *v, const tsr_gguf *g, char *err, size_t err_len)
{
    tsr_gguf_vtype et;
    uint64_t n;
    int64_t idx;
    int rc = find_array(g, "tokenizer.ggml.merges", &et, &n, &idx, err, err_len);
    if (rc) return rc;
    if (idx < 0)
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                        "tokenizer.ggml.merges is missing (required by a gpt2 tokenizer)");
    if (et != TSR_GGUF_STRING)
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                        "tokenizer.ggml.merges has type %s, expected an array of string",
                        vtype_name(g, idx));
    if (n > MAX_TOKENS * 4ull)
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                        "tokenizer.ggml.merges has %llu entries", (unsigned long long)n);
    size_t bytes = 0;
    for (uint64_t i = 0; i < n; i++) {
        tsr_gguf_str s;
        if (!tsr_gguf_arr_str(g, idx, i, &s))
            return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                            "tokenizer.ggml.merges[%llu] unreadable", (unsigned long long)i);
        bytes += s.len + 1;
    }
    rc = strtab_init(&v->merge, (uint32_t)n, bytes);
    if (!rc) rc = strmap_init(&v->merge_map, (uint32_t)n);
    if (rc)
        return tsr_fail(err, err_len, rc, "out of memory for %llu merges", (unsigned long long)n);
    for (uint64_t i = 0; i < n; i++) {
        tsr_gguf_str s;
        tsr_gguf_arr_str(g, idx, i, &s);
        rc = strtab_add(&v->merge, s.ptr, s.len);
        if (rc) return tsr_fail(err, err_len, rc, "tokenizer.ggml.merges: too large");
        /* a repeated merge keeps its first (best) rank, as llama.cpp's emplace does */
        (void)strmap_insert(&v->merge_map, &v->merge, (uint32_t)i);
    }
    return 0;
}

static int compile_regexes(tsr_vocab *v, pre_kind kind, char *err, size_t err_len)
{
    for (int i = 0; i < MAX_REGEX && k_pre_regex[kind][i]; i++) {
        char *pat = rx_rewrite(k_pre_regex[kind][i]);
        if (!pat) return tsr_fail(err, err_len, TSR_VOCAB_ERR_NOMEM, "out of memory");
        int ec;
        PCRE2_SIZE eo;
        pcre2_code *re =
            pcre2_compile((PCRE2_SPTR)pat, PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY, &ec, &eo, NULL);
        free(pat);
        if (!re) {
            PCRE2_UCHAR msg[128];
            pcre2_get_error_message(ec, msg, sizeof msg);
            return tsr_fail(err, err_len, TSR_VOCAB_ERR_INTERNAL,
                            "pre-tokenizer '%s' regex %d: %s at offset %zu", v->pre, i, (char *)msg,
                            (size_t)eo);
        }
        (void)pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* the interpreter is the fallback */
        v->re[v->n_re++] = re;
    }
    return 0;
}

int tsr_vocab_load(const tsr_gguf *g, tsr_vocab **out, char *err, size_t err_len)
{
    if (err && err_len) err[0] = 0;
    if (!out) return tsr_fail(err, err_len, TSR_VOCAB_ERR_ARG, "out is NULL");
    *out = NULL;
    if (!g) return tsr_fail(err, err_len, TSR_VOCAB_ERR_ARG, "gguf is NULL");

    tsr_vocab *v = calloc(1, sizeof *v);
    if (!v) return tsr_fail(err, err_len, TSR_VOCAB_ERR_NOMEM, "out of memory");
    int rc;
    tsr_gguf_str s;
    bool present;
    pre_kind kind = PRE_DEFAULT;
    uint32_t pre_flags = 0;

    /* model type and its defaults (llama.cpp llama_vocab::impl::load) */
    rc = read_opt_str(g, "tokenizer.ggml.model", &s, &present, err, err_len);
    if (rc) goto fail_free;
    if (!present) {
        rc = tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT, "tokenizer.ggml.model is missing");
        goto fail_free;
    }
    if (str_eq(s.ptr, s.len, "llama")) {
        v->type = TSR_VOCAB_SPM;
        v->bos = 1, v->eos = 2, v->unk = 0;
        v->add_bos = true, v->add_space_prefix = true;
    } else if (str_eq(s.ptr, s.len, "gpt2")) {
        v->type = TSR_VOCAB_BPE;
        v->bos = 11, v->eos = 11, v->unk = TSR_TOKEN_NULL;
    } else if (str_eq(s.ptr, s.len, "no_vocab") || str_eq(s.ptr, s.len, "none")) {
        rc = tsr_fail(err, err_len, TSR_VOCAB_ERR_UNSUPPORTED,
                      "the model has no vocabulary "
                      "(tokenizer.ggml.model = '%.*s')",
                      (int)s.len, s.ptr);
        goto fail_free;
    } else {
        rc = tsr_fail(
            err, err_len, TSR_VOCAB_ERR_UNSUPPORTED,
            "tokenizer.ggml.model '%.*s' is not supported (only 'llama' = SentencePiece and "
            "'gpt2' = byte-level BPE)",
            (int)(s.len > 64 ? 64 : s.len), s.ptr);
        goto fail_free;
    }
    v->eot = v->eom = v->sep = v->pad = TSR_TOKEN_NULL;
    snprintf(v->pre, sizeof v->pre, "default");

    if (v->type == TSR_VOCAB_BPE) {
        rc = read_opt_str(g, "tokenizer.ggml.pre", &s, &present, err, err_len);
        if (rc) goto fail_free;
        if (present) {
            size_t k, nn = sizeof k_pre_names / sizeof k_pre_names[0];
            for (k = 0; k < nn && !str_eq(s.ptr, s.len, k_pre_names[k].name); k++) {
            }
            if (k == nn) {
                rc = tsr_fail(err, err_len, TSR_VOCAB_ERR_UNSUPPORTED,
                              "unknown pre-tokenizer tokenizer.ggml.pre = '%.*s'",
                              (int)(s.len > 64 ? 64 : s.len), s.ptr);
                goto fail_free;
            }
            kind = k_pre_names[k].kind;
            pre_flags = k_pre_names[k].flags;
            snprintf(v->pre, sizeof v->pre, "%s", k_pre_names[k].name);
        }
        v->ignore_merges = pre_flags & PRE_IGNORE_MERGES;
        if (pre_flags & PRE_ADD_BOS) v->add_bos = true;
        if (pre_flags & PRE_NO_BOS) v->bos = TSR_TOKEN_NULL;
    }
    rc = read_opt_bool(g, "tokenizer.ggml.add_space_prefix", &v->add_space_prefix, err, err_len);
    if (rc) goto fail_free;

    rc = load_tokens(v, g, err, err_len);
    if (rc) goto fail_free;
    if (v->type == TSR_VOCAB_BPE) {
        rc = load_merges(v, g, err, err_len);
        if (rc) goto fail_free;
    }

    /* special ids: defaults outside the vocabulary are dropped, keys must be valid */
    int32_t *ids[] = {&v->bos, &v->eos, &v->unk};
    for (int i = 0; i < 3; i++)
        if (*ids[i] >= v->n_tokens) *ids[i] = TSR_TOKEN_NULL;
    static const char *const keys[] = {
        "tokenizer.ggml.bos_token_id",     "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",     "tokenizer.ggml.eom_token_id",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.seperator_token_id",
        "tokenizer.ggml.padding_token_id"};
    int32_t *dst[] = {&v->bos, &v->eos, &v->eot, &v->eom, &v->unk, &v->sep, &v->pad};
    for (int i = 0; i < 7; i++) {
        rc = read_special_id(g, keys[i], v->n_tokens, dst[i], err, err_len);
        if (rc) goto fail_free;
    }
    rc = read_opt_bool(g, "tokenizer.ggml.add_bos_token", &v->add_bos, err, err_len);
    if (rc) goto fail_free;
    rc = read_opt_bool(g, "tokenizer.ggml.add_eos_token", &v->add_eos, err, err_len);
    if (rc) goto fail_free;
    if (v->add_bos && v->bos < 0) {
        rc = tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                      "tokenizer.ggml.add_bos_token is true but there is no BOS token");
        goto fail_free;
    }
    if (v->add_eos && v->eos < 0) {
        rc = tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                      "tokenizer.ggml.add_eos_token is true but there is no EOS token");
        goto fail_free;
    }

    rc = detect_special_tokens(v);
    if (rc) {
        rc = tsr_fail(err, err_len, rc, "out of memory");
        goto fail_free;
    }

    /* partition candidates, longest first */
    v->special = malloc((size_t)v->n_tokens * sizeof *v->special);
    if (!v->special) {
        rc = tsr_fail(err, err_len, TSR_VOCAB_ERR_NOMEM, "out of memory");
        goto fail_free;
    }
    for (int32_t i = 0; i < v->n_tokens; i++)
        if (v->attr[i] &
            (TSR_VOCAB_ATTR_CONTROL | TSR_VOCAB_ATTR_USER_DEFINED | TSR_VOCAB_ATTR_UNKNOWN))
            v->special[v->n_special++] = i;
    t_sort_vocab = v;
    qsort(v->special, v->n_special, sizeof *v->special, special_cmp);
    t_sort_vocab = NULL;

    /* Phi-3 special tokens swallow the whitespace after them (llama.cpp sets this by
     * model name because the GGUF has no per-token strip flags). */
    rc = read_opt_str(g, "general.name", &s, &present, err, err_len);
    if (rc) goto fail_free;
    if (present) {
        char name[128];
        size_t l = s.len < sizeof name - 1 ? s.len : sizeof name - 1;
        for (size_t i = 0; i < l; i++) name[i] = (char)tolower((unsigned char)s.ptr[i]);
        name[l] = 0;
        if (strstr(name, "phi-3") || strstr(name, "phi3")) {
            for (uint32_t i = 0; i < v->n_special; i++)
                v->attr[v->special[i]] |= TSR_VOCAB_ATTR_RSTRIP;
            int32_t id = find_token(v, "</s>", 4);
            if (id >= 0) v->attr[id] |= TSR_VOCAB_ATTR_RSTRIP;
            const char *keep[] = {"<unk>", "<s>", "<|endoftext|>"};
            for (int i = 0; i < 3; i++) {
                id = find_token(v, keep[i], strlen(keep[i]));
                if (id >= 0) v->attr[id] &= ~TSR_VOCAB_ATTR_RSTRIP;
            }
        }
    }

    if (v->type == TSR_VOCAB_SPM) {
        for (int b = 0; b < 256; b++) {
            char name[8];
            snprintf(name, sizeof name, "<0x%02X>", b);
            v->byte_tok[b] = find_token(v, name, 6);
            if (v->byte_tok[b] < 0) {
                char c = (char)b;
                v->byte_tok[b] = find_token(v, &c, 1);
            }
        }
    } else {
        for (int b = 0; b < 256; b++)
            v->byte_enc_len[b] = (uint8_t)utf8_encode(byte_to_cp((uint8_t)b), v->byte_enc[b]);
        rc = compile_regexes(v, kind, err, err_len);
        if (rc) goto fail_free;
    }

    rc = build_pieces(v);
    if (rc) {
        rc = tsr_fail(err, err_len, rc, "out of memory for the token pieces");
        goto fail_free;
    }
    *out = v;
    return 0;

fail_free:
    tsr_vocab_free(v);
    return rc;
}

/* ------------------------------------------------------------------------------------ */
/* accessors                                                                            */

static bool valid_id(const tsr_vocab *v, int32_t id)
{
    return v && id >= 0 && id < v->n_tokens;
}

tsr_vocab_type tsr_vocab_type_of(const tsr_vocab *v)
{
    return v->type;
}
const char *tsr_vocab_pre(const tsr_vocab *v)
{
    return v->pre;
}
int32_t tsr_vocab_n_tokens(const tsr_vocab *v)
{
    return v->n_tokens;
}
int32_t tsr_vocab_bos(const tsr_vocab *v)
{
    return v->bos;
}
int32_t tsr_vocab_eos(const tsr_vocab *v)
{
    return v->eos;
}
int32_t tsr_vocab_pad(const tsr_vocab *v)
{
    return v->pad;
}
bool tsr_vocab_add_bos(const tsr_vocab *v)
{
    return v->add_bos;
}
bool tsr_vocab_add_eos(const tsr_vocab *v)
{
    return v->add_eos;
}

bool tsr_vocab_is_eog(const tsr_vocab *v, int32_t id)
{
    return valid_id(v, id) && v->eog[id];
}

size_t tsr_vocab_eog_ids(const tsr_vocab *v, const int32_t **ids)
{
    if (ids) *ids = v ? v->eog_ids : NULL;
    return v ? v->n_eog : 0;
}

bool tsr_vocab_is_control(const tsr_vocab *v, int32_t id)
{
    return valid_id(v, id) && (v->attr[id] & TSR_VOCAB_ATTR_CONTROL);
}

const char *tsr_vocab_token_text(const tsr_vocab *v, int32_t id, size_t *len)
{
    if (!valid_id(v, id)) {
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = v->tok.len[id];
    return v->tok.data + v->tok.off[id];
}

int32_t tsr_vocab_find(const tsr_vocab *v, const char *text, size_t len)
{
    if (!v || (!text && len)) return TSR_TOKEN_NULL;
    return find_token(v, text ? text : "", len);
}

/* ------------------------------------------------------------------------------------ */
/* tokenize                                                                             */

typedef struct {
    int32_t *a;
    size_t n, cap;
} ivec;

static int ivec_push(ivec *v, int32_t x)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        int32_t *p = realloc(v->a, cap * sizeof *p);
        if (!p) return TSR_VOCAB_ERR_NOMEM;
        v->a = p;
        v->cap = cap;
    }
    v->a[v->n++] = x;
    return 0;
}

/* A piece of the input: raw text [off, off+len) or an already-decided token. */
typedef struct {
    int32_t id; /* TSR_TOKEN_NULL for raw text */
    size_t off, len;
} frag;

typedef struct {
    frag *a;
    size_t n, cap;
} fvec;

static int fvec_push(fvec *v, int32_t id, size_t off, size_t len)
{
    if (v->n == v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 16;
        frag *p = realloc(v->a, cap * sizeof *p);
        if (!p) return TSR_VOCAB_ERR_NOMEM;
        v->a = p;
        v->cap = cap;
    }
    v->a[v->n++] = (frag){id, off, len};
    return 0;
}

/* Symbols and candidate pairs of the SPM/BPE merge loops. Symbol text is the byte range
 * [off, off+n) of the word; merging moves the right symbol's bytes into the left one. */
typedef struct {
    int32_t prev, next;
    uint32_t off, n;
} sym;

typedef struct {
    int32_t left, right;
    float score;  /* SPM: higher first */
    int32_t rank; /* BPE: lower first */
    uint32_t size;
} bigram;

typedef struct {
    const tsr_vocab *v;
    ivec out;
    sym *syms;
    size_t n_syms, cap_syms;
    bigram *heap;
    size_t n_heap, cap_heap;
    bbuf key;   /* BPE merge key "left right" */
    bbuf word;  /* SPM text / BPE byte-encoded word */
    bbuf clean; /* BPE: the fragment as well-formed UTF-8 */
    fvec frags, frags2;
    fvec spans, spans2; /* pre-tokenizer pieces (id unused) */
    pcre2_match_data *md;
} tok_ctx;

static void ctx_free(tok_ctx *c)
{
    free(c->out.a);
    free(c->syms);
    free(c->heap);
    free(c->key.a);
    free(c->word.a);
    free(c->clean.a);
    free(c->frags.a);
    free(c->frags2.a);
    free(c->spans.a);
    free(c->spans2.a);
    if (c->md) pcre2_match_data_free(c->md);
}

static bool bigram_before(const bigram *a, const bigram *b, bool spm)
{
    if (spm) {
        if (a->score != b->score) return a->score > b->score;
    } else if (a->rank != b->rank) {
        return a->rank < b->rank;
    }
    return a->left < b->left;
}

static int heap_push(tok_ctx *c, bigram b, bool spm)
{
    if (c->n_heap == c->cap_heap) {
        size_t cap = c->cap_heap ? c->cap_heap * 2 : 64;
        bigram *p = realloc(c->heap, cap * sizeof *p);
        if (!p) return TSR_VOCAB_ERR_NOMEM;
        c->heap = p;
        c->cap_heap = cap;
    }
    size_t i = c->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!bigram_before(&b, &c->heap[parent], spm)) break;
        c->heap[i] = c->heap[parent];
        i = parent;
    }
    c->heap[i] = b;
    return 0;
}

static bigram heap_pop(tok_ctx *c, bool spm)
{
    bigram top = c->heap[0], last = c->heap[--c->n_heap];
    size_t i = 0, n = c->n_heap;
    for (;;) {
        size_t l = 2 * i + 1, best = i;
        const bigram *bb = &last;
        if (l < n && bigram_before(&c->heap[l], bb, spm)) best = l, bb = &c->heap[l];
        if (l + 1 < n && bigram_before(&c->heap[l + 1], bb, spm)) best = l + 1;
        if (best == i) break;
        c->heap[i] = c->heap[best];
        i = best;
    }
    if (n) c->heap[i] = last;
    return top;
}

/* Split word[0..len) into symbols, one per UTF-8 character (llama.cpp's cut). */
static int make_symbols(tok_ctx *c, const char *w, size_t len)
{
    if (len + 1 > c->cap_syms) {
        size_t cap = len + 1;
        sym *p = realloc(c->syms, cap * sizeof *p);
        if (!p) return TSR_VOCAB_ERR_NOMEM;
        c->syms = p;
        c->cap_syms = cap;
    }
    c->n_syms = 0;
    for (size_t off = 0; off < len;) {
        size_t n = utf8_lead_len((uint8_t)w[off]);
        if (n > len - off) n = len - off;
        int32_t i = (int32_t)c->n_syms++;
        c->syms[i] = (sym){i - 1, off + n == len ? -1 : i + 1, (uint32_t)off, (uint32_t)n};
        off += n;
    }
    return 0;
}

/* ---- SPM ---- */

static int spm_try_add(tok_ctx *c, int32_t left, int32_t right)
{
    if (left < 0 || right < 0) return 0;
    const sym *l = &c->syms[left], *r = &c->syms[right];
    uint32_t size = l->n + r->n;
    int32_t id = find_token(c->v, c->word.a + l->off, size);
    if (id < 0) return 0;
    return heap_push(c, (bigram){left, right, c->v->score[id], 0, size}, true);
}

static int spm_emit_bytes(tok_ctx *c, const char *s, size_t n, char *err, size_t err_len)
{
    for (size_t j = 0; j < n; j++) {
        int32_t id = c->v->byte_tok[(uint8_t)s[j]];
        if (id < 0) id = c->v->unk;
        if (id < 0)
            return tsr_fail(err, err_len, TSR_VOCAB_ERR_FORMAT,
                            "byte 0x%02X has no token and the vocabulary has no <unk>",
                            (uint8_t)s[j]);
        if (ivec_push(&c->out, id)) return TSR_VOCAB_ERR_NOMEM;
    }
    return 0;
}

/* llm_tokenizer_spm_session::tokenize over c->word. */
static int spm_tokenize(tok_ctx *c, char *err, size_t err_len)
{
    int rc = make_symbols(c, c->word.a, c->word.n);
    if (rc) return rc;
    c->n_heap = 0;
    for (int32_t i = 1; i < (int32_t)c->n_syms; i++)
        if ((rc = spm_try_add(c, i - 1, i))) return rc;
    while (c->n_heap) {
        bigram b = heap_pop(c, true);
        sym *l = &c->syms[b.left], *r = &c->syms[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue; /* stale */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) c->syms[r->next].prev = b.left;
        if ((rc = spm_try_add(c, l->prev, b.left))) return rc;
        if ((rc = spm_try_add(c, b.left, l->next))) return rc;
    }
    /* A symbol that is not a token is a single character (merged symbols always are
     * tokens), so llama.cpp's rev_merge re-segmentation reduces to byte fallback. */
    for (int32_t i = c->n_syms ? 0 : -1; i != -1; i = c->syms[i].next) {
        const sym *s = &c->syms[i];
        int32_t id = find_token(c->v, c->word.a + s->off, s->n);
        if (id >= 0) {
            if (ivec_push(&c->out, id)) return TSR_VOCAB_ERR_NOMEM;
        } else if ((rc = spm_emit_bytes(c, c->word.a + s->off, s->n, err, err_len))) {
            return rc;
        }
    }
    return 0;
}

/* ---- BPE ---- */

static int32_t merge_rank(tok_ctx *c, const sym *l, const sym *r)
{
    const char *w = c->word.a;
    c->key.n = 0;
    if (bbuf_reserve(&c->key, l->n + r->n + 1)) return -2;
    memcpy(c->key.a, w + l->off, l->n);
    c->key.a[l->n] = ' ';
    memcpy(c->key.a + l->n + 1, w + r->off, r->n);
    size_t kl = l->n + 1 + r->n;
    return (int32_t)strmap_find(&c->v->merge_map, &c->v->merge, c->key.a, kl,
                                hash_bytes(c->key.a, kl));
}

static int bpe_try_add(tok_ctx *c, int32_t left, int32_t right)
{
    if (left < 0 || right < 0) return 0;
    const sym *l = &c->syms[left], *r = &c->syms[right];
    int32_t rank = merge_rank(c, l, r);
    if (rank == -2) return TSR_VOCAB_ERR_NOMEM;
    if (rank < 0) return 0;
    return heap_push(c, (bigram){left, right, 0.0f, rank, l->n + r->n}, false);
}

/* llm_tokenizer_bpe_session::tokenize for one byte-encoded word in c->word. */
static int bpe_word(tok_ctx *c)
{
    const tsr_vocab *v = c->v;
    int rc;
    if (v->ignore_merges) {
        int32_t id = find_token(v, c->word.a, c->word.n);
        if (id >= 0) return ivec_push(&c->out, id);
    }
    if ((rc = make_symbols(c, c->word.a, c->word.n))) return rc;
    c->n_heap = 0;
    for (int32_t i = 1; i < (int32_t)c->n_syms; i++)
        if ((rc = bpe_try_add(c, i - 1, i))) return rc;
    while (c->n_heap) {
        bigram b = heap_pop(c, false);
        sym *l = &c->syms[b.left], *r = &c->syms[b.right];
        /* both alive and still the same two texts (sizes only grow) */
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size) continue;
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0) c->syms[r->next].prev = b.left;
        if ((rc = bpe_try_add(c, l->prev, b.left))) return rc;
        if ((rc = bpe_try_add(c, b.left, l->next))) return rc;
    }
    for (int32_t i = c->n_syms ? 0 : -1; i != -1; i = c->syms[i].next) {
        const sym *s = &c->syms[i];
        const char *t = c->word.a + s->off;
        int32_t id = find_token(v, t, s->n);
        if (id >= 0) {
            if (ivec_push(&c->out, id)) return TSR_VOCAB_ERR_NOMEM;
            continue;
        }
        /* llama.cpp's fallback: look up each byte of the symbol as a 1-byte token */
        for (uint32_t j = 0; j < s->n; j++) {
            id = find_token(v, t + j, 1);
            if (id >= 0 && ivec_push(&c->out, id)) return TSR_VOCAB_ERR_NOMEM;
        }
    }
    return 0;
}

/* Split c->clean into words with the pre-tokenizer regexes, one after the other; text a
 * regex leaves unmatched stays a word of its own. Result in c->spans. */
static int pretokenize(tok_ctx *c, char *err, size_t err_len)
{
    const tsr_vocab *v = c->v;
    const char *text = c->clean.a;
    c->spans.n = 0;
    if (fvec_push(&c->spans, 0, 0, c->clean.n)) return TSR_VOCAB_ERR_NOMEM;
    for (uint32_t r = 0; r < v->n_re; r++) {
        c->spans2.n = 0;
        for (size_t k = 0; k < c->spans.n; k++) {
            size_t base = c->spans.a[k].off, len = c->spans.a[k].len, pos = 0, last = 0;
            while (pos < len) {
                int m = pcre2_match(v->re[r], (PCRE2_SPTR)(text + base), len, pos,
                                    PCRE2_NO_UTF_CHECK, c->md, NULL);
                if (m == PCRE2_ERROR_NOMATCH) break;
                if (m < 0) {
                    PCRE2_UCHAR msg[128];
                    pcre2_get_error_message(m, msg, sizeof msg);
                    return tsr_fail(err, err_len, TSR_VOCAB_ERR_INTERNAL,
                                    "pre-tokenizer regex %u failed: %s", r, (char *)msg);
                }
                PCRE2_SIZE *ov = pcre2_get_ovector_pointer(c->md);
                size_t ms = ov[0], me = ov[1];
                if (me <= ms) { /* empty match: not a word; look further */
                    size_t cl = utf8_lead_len((uint8_t)text[base + ms]);
                    pos = ms + (cl < len - ms ? cl : len - ms);
                    continue;
                }
                if (ms > last && fvec_push(&c->spans2, 0, base + last, ms - last))
                    return TSR_VOCAB_ERR_NOMEM;
                if (fvec_push(&c->spans2, 0, base + ms, me - ms)) return TSR_VOCAB_ERR_NOMEM;
                last = pos = me;
            }
            if (last < len && fvec_push(&c->spans2, 0, base + last, len - last))
                return TSR_VOCAB_ERR_NOMEM;
        }
        fvec t = c->spans;
        c->spans = c->spans2;
        c->spans2 = t;
    }
    return 0;
}

static int bpe_fragment(tok_ctx *c, const char *s, size_t n, char *err, size_t err_len)
{
    /* well-formed UTF-8, one U+FFFD per ill-formed byte (llama.cpp unicode_cpts_from_utf8) */
    c->clean.n = 0;
    if (bbuf_reserve(&c->clean, n * 3)) return TSR_VOCAB_ERR_NOMEM;
    for (size_t i = 0; i < n;) {
        size_t l;
        if (utf8_check((const uint8_t *)s + i, n - i, &l) == 1) {
            memcpy(c->clean.a + c->clean.n, s + i, l);
            c->clean.n += l;
            i += l;
        } else {
            for (size_t k = 0; k < l; k++) {
                memcpy(c->clean.a + c->clean.n, REPLACEMENT_CHAR, 3);
                c->clean.n += 3;
            }
            i += l;
        }
    }
    int rc = pretokenize(c, err, err_len);
    if (rc) return rc;
    for (size_t k = 0; k < c->spans.n; k++) {
        const uint8_t *w = (const uint8_t *)c->clean.a + c->spans.a[k].off;
        size_t wl = c->spans.a[k].len;
        c->word.n = 0;
        if (bbuf_reserve(&c->word, wl * 2)) return TSR_VOCAB_ERR_NOMEM;
        for (size_t i = 0; i < wl; i++) {
            memcpy(c->word.a + c->word.n, c->v->byte_enc[w[i]], c->v->byte_enc_len[w[i]]);
            c->word.n += c->v->byte_enc_len[w[i]];
        }
        if ((rc = bpe_word(c))) return rc;
    }
    return 0;
}

/* ---- special tokens ---- */

/* tokenizer_st_partition: cut every occurrence of each special token out of the raw
 * fragments, longest token first. */
static int partition(tok_ctx *c, const char *text, bool parse_special)
{
    const tsr_vocab *v = c->v;
    for (uint32_t k = 0; k < v->n_special; k++) {
        int32_t id = v->special[k];
        uint32_t a = v->attr[id];
        if (!parse_special && (a & (TSR_VOCAB_ATTR_CONTROL | TSR_VOCAB_ATTR_UNKNOWN))) continue;
        const char *t = v->tok.data + v->tok.off[id];
        size_t tl = v->tok.len[id];
        bool any = false;
        for (size_t f = 0; f < c->frags.n && !any; f++)
            any = c->frags.a[f].id < 0 && c->frags.a[f].len >= tl &&
                  memmem(text + c->frags.a[f].off, c->frags.a[f].len, t, tl);
        if (!any) continue;
        c->frags2.n = 0;
        for (size_t f = 0; f < c->frags.n; f++) {
            frag fr = c->frags.a[f];
            if (fr.id >= 0) {
                if (fvec_push(&c->frags2, fr.id, 0, 0)) return TSR_VOCAB_ERR_NOMEM;
                continue;
            }
            size_t base = fr.off, blen = fr.len;
            while (blen > 0) {
                const char *m = memmem(text + base, blen, t, tl);
                if (!m) {
                    if (fvec_push(&c->frags2, TSR_TOKEN_NULL, base, blen))
                        return TSR_VOCAB_ERR_NOMEM;
                    break;
                }
                size_t mo = (size_t)(m - text), left = mo - base;
                if (a & TSR_VOCAB_ATTR_LSTRIP)
                    while (left > 0 && isspace((unsigned char)text[base + left - 1])) left--;
                if (left > 0 && fvec_push(&c->frags2, TSR_TOKEN_NULL, base, left))
                    return TSR_VOCAB_ERR_NOMEM;
                if (fvec_push(&c->frags2, id, 0, 0)) return TSR_VOCAB_ERR_NOMEM;
                size_t roff = mo + tl, rlen = base + blen - roff;
                if (a & TSR_VOCAB_ATTR_RSTRIP)
                    while (rlen > 0 && isspace((unsigned char)text[roff])) roff++, rlen--;
                base = roff;
                blen = rlen;
            }
        }
        fvec tmp = c->frags;
        c->frags = c->frags2;
        c->frags2 = tmp;
    }
    return 0;
}

int tsr_vocab_tokenize(const tsr_vocab *v, const char *text, size_t len, bool add_special,
                       bool parse_special, int32_t **ids, size_t *n_ids, char *err, size_t err_len)
{
    if (err && err_len) err[0] = 0;
    if (!ids || !n_ids) return tsr_fail(err, err_len, TSR_VOCAB_ERR_ARG, "ids or n_ids is NULL");
    *ids = NULL;
    *n_ids = 0;
    if (!v || (!text && len))
        return tsr_fail(err, err_len, TSR_VOCAB_ERR_ARG, "vocab or text is NULL");

    tok_ctx c = {.v = v};
    int rc = 0;
    if (len > 0 && (rc = fvec_push(&c.frags, TSR_TOKEN_NULL, 0, len))) goto nomem;
    if (len > 0 && (rc = partition(&c, text, parse_special))) goto nomem;
    if (add_special && v->add_bos && (rc = ivec_push(&c.out, v->bos))) goto nomem;

    if (v->type == TSR_VOCAB_SPM) {
        bool prev_special = true; /* the text start counts as "after a special token" */
        for (size_t f = 0; f < c.frags.n; f++) {
            const frag *fr = &c.frags.a[f];
            if (fr->id >= 0) {
                if ((rc = ivec_push(&c.out, fr->id))) goto nomem;
                prev_special = true;
                continue;
            }
            /* space prefix, then every ' ' -> U+2581 */
            c.word.n = 0;
            if ((rc = bbuf_reserve(&c.word, 3 * (fr->len + 1)))) goto nomem;
            const char *s = text + fr->off;
            if (v->add_space_prefix && prev_special) {
                memcpy(c.word.a, "\xE2\x96\x81", 3);
                c.word.n = 3;
            }
            for (size_t i = 0; i < fr->len; i++) {
                if (s[i] == ' ') {
                    memcpy(c.word.a + c.word.n, "\xE2\x96\x81", 3);
                    c.word.n += 3;
                } else {
                    c.word.a[c.word.n++] = s[i];
                }
            }
            if ((rc = spm_tokenize(&c, err, err_len))) goto out;
            prev_special = false;
        }
    } else {
        c.md = pcre2_match_data_create(4, NULL);
        if (!c.md) {
            rc = TSR_VOCAB_ERR_NOMEM;
            goto nomem;
        }
        for (size_t f = 0; f < c.frags.n; f++) {
            const frag *fr = &c.frags.a[f];
            if (fr->id >= 0) {
                if ((rc = ivec_push(&c.out, fr->id))) goto nomem;
                continue;
            }
            if ((rc = bpe_fragment(&c, text + fr->off, fr->len, err, err_len))) goto out;
        }
    }
    if (add_special && v->add_eos && (rc = ivec_push(&c.out, v->eos))) goto nomem;

    *ids = c.out.a;
    *n_ids = c.out.n;
    c.out.a = NULL;
    if (!*n_ids) {
        free(*ids);
        *ids = NULL;
    }
    ctx_free(&c);
    return 0;

nomem:
    rc = tsr_fail(err, err_len, TSR_VOCAB_ERR_NOMEM, "out of memory while tokenizing %zu bytes",
                  len);
out:
    if (err && err_len && !err[0]) tsr_fail(err, err_len, rc, "tokenize failed (%d)", rc);
    ctx_free(&c);
    return rc;
}

/* ------------------------------------------------------------------------------------ */
/* detokenize                                                                           */

int32_t tsr_vocab_token_to_piece(const tsr_vocab *v, int32_t id, char *buf, size_t cap,
                                 bool render_special)
{
    if (!valid_id(v, id)) return TSR_VOCAB_ERR_ARG;
    if (!render_special && (v->attr[id] & (TSR_VOCAB_ATTR_UNKNOWN | TSR_VOCAB_ATTR_CONTROL)))
        return 0;
    uint32_t n = v->piece.len[id];
    if (n <= cap && n) {
        if (!buf) return TSR_VOCAB_ERR_ARG;
        memcpy(buf, v->piece.data + v->piece.off[id], n);
    }
    return (int32_t)n;
}

int tsr_detok_init(tsr_detok *d, const tsr_vocab *v, uint32_t flags)
{
    memset(d, 0, sizeof *d);
    if (!v) return TSR_VOCAB_ERR_ARG;
    d->v = v;
    d->flags = flags;
    /* input (pending + piece) then output: each input byte becomes at most 3 bytes */
    size_t in = (size_t)v->max_piece_len + 4;
    d->cap = in * 4;
    d->buf = malloc(d->cap);
    return d->buf ? 0 : TSR_VOCAB_ERR_NOMEM;
}

void tsr_detok_free(tsr_detok *d)
{
    if (!d) return;
    free(d->buf);
    memset(d, 0, sizeof *d);
}

void tsr_detok_reset(tsr_detok *d)
{
    d->started = false;
    d->n_pending = 0;
}

int tsr_detok_push(tsr_detok *d, int32_t id, const char **text, size_t *len)
{
    *text = "";
    *len = 0;
    const tsr_vocab *v = d->v;
    if (!valid_id(v, id)) return TSR_VOCAB_ERR_ARG;
    const char *p = v->piece.data + v->piece.off[id];
    size_t pl = v->piece.len[id];
    if (!(d->flags & TSR_DETOK_RENDER_SPECIAL) &&
        (v->attr[id] & (TSR_VOCAB_ATTR_UNKNOWN | TSR_VOCAB_ATTR_CONTROL)))
        pl = 0;
    if (pl == 0) return 0;
    if (!d->started) {
        d->started = true;
        if ((d->flags & TSR_DETOK_STRIP_LEADING_SPACE) && v->add_space_prefix && p[0] == ' ') {
            p++;
            pl--;
        }
    }
    size_t in_cap = (size_t)v->max_piece_len + 4;
    uint8_t *in = (uint8_t *)d->buf;
    char *out = d->buf + in_cap;
    size_t n = d->n_pending, o = 0;
    memcpy(in, d->pending, n);
    memcpy(in + n, p, pl);
    n += pl;
    d->n_pending = 0;
    for (size_t i = 0; i < n;) {
        size_t l;
        int r = utf8_check(in + i, n - i, &l);
        if (r == 1) {
            memcpy(out + o, in + i, l);
            o += l;
        } else if (r == 0) { /* incomplete tail: wait for the next piece */
            memcpy(d->pending, in + i, l);
            d->n_pending = (uint32_t)l;
        } else {
            memcpy(out + o, REPLACEMENT_CHAR, 3);
            o += 3;
        }
        i += l;
    }
    *text = out;
    *len = o;
    return 0;
}

int tsr_detok_flush(tsr_detok *d, const char **text, size_t *len)
{
    *text = "";
    *len = 0;
    if (d->n_pending) {
        *text = REPLACEMENT_CHAR;
        *len = 3;
    }
    tsr_detok_reset(d);
    return 0;
}

int tsr_vocab_detokenize(const tsr_vocab *v, const int32_t *ids, size_t n, uint32_t flags,
                         char **out, size_t *out_len)
{
    *out = NULL;
    if (out_len) *out_len = 0;
    if (!v || (!ids && n)) return TSR_VOCAB_ERR_ARG;
    tsr_detok d;
    bbuf b = {0};
    int rc = tsr_detok_init(&d, v, flags);
    if (rc) return rc;
    const char *t;
    size_t tl;
    for (size_t i = 0; i < n && rc == 0; i++) {
        rc = tsr_detok_push(&d, ids[i], &t, &tl);
        if (rc == 0) rc = bbuf_add(&b, t, tl);
    }
    if (rc == 0) rc = tsr_detok_flush(&d, &t, &tl);
    if (rc == 0) rc = bbuf_add(&b, t, tl);
    if (rc == 0) rc = bbuf_add(&b, "", 1);
    tsr_detok_free(&d);
    if (rc) {
        free(b.a);
        return rc;
    }
    *out = b.a;
    if (out_len) *out_len = b.n - 1;
    return 0;
}
