// Test helper for tests/test_export_gguf_llama_cpp.py (compiled there against the llama.cpp build under test).
//
// Usage: llama_cpp_probe MODEL.gguf N_PREDICT < messages
// stdin: one message per line, "role<TAB>content" with "\n" written as the two characters \ and n.
// The chat is formatted by llama.cpp itself (llama_chat_apply_template with the GGUF's own chat template, generation
// prompt added), tokenized as llama.cpp does for a chat (BOS per the GGUF, special tokens parsed), then decoded
// greedily with an f32 KV cache and flash attention off. Prints:
//   PROMPT <the formatted text, with \n escaped>
//   IDS <prompt token ids>
//   LOGITS <the first step's full logit vector>
//   GREEDY <up to N_PREDICT generated ids, stopping after an end-of-generation token>
#include "llama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet(enum ggml_log_level level, const char * text, void * user) {
    (void) user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static char * unescape(char * s) {
    char * w = s;
    for (char * r = s; *r; r++) {
        if (r[0] == '\\' && r[1] == 'n') { *w++ = '\n'; r++; }
        else if (r[0] == '\\' && r[1] == '\\') { *w++ = '\\'; r++; }
        else *w++ = *r;
    }
    *w = 0;
    return s;
}

int main(int argc, char ** argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s MODEL.gguf N_PREDICT < messages\n", argv[0]); return 2; }
    int n_predict = atoi(argv[2]);
    llama_log_set(quiet, NULL);
    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const struct llama_vocab * vocab = llama_model_get_vocab(model);

    struct llama_chat_message msgs[64];
    int n_msg = 0;
    static char line[1 << 16];
    while (n_msg < 64 && fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        char * tab = strchr(line, '\t');
        if (!tab) continue;
        *tab = 0;
        msgs[n_msg].role = strdup(line);
        msgs[n_msg].content = strdup(unescape(tab + 1));
        n_msg++;
    }
    const char * tmpl = llama_model_chat_template(model, NULL);
    static char text[1 << 18];
    int n_text = llama_chat_apply_template(tmpl, msgs, n_msg, true, text, sizeof text);
    if (n_text < 0 || n_text >= (int) sizeof text) { fprintf(stderr, "chat template not applied\n"); return 1; }
    text[n_text] = 0;
    printf("PROMPT ");
    for (int i = 0; i < n_text; i++) {
        if (text[i] == '\n') fputs("\\n", stdout);
        else if (text[i] == '\\') fputs("\\\\", stdout);
        else putchar(text[i]);
    }
    printf("\n");

    llama_token ids[8192];
    int n_ids = llama_tokenize(vocab, text, n_text, ids, 8192, true, true);
    if (n_ids < 0) { fprintf(stderr, "prompt too long\n"); return 1; }
    printf("IDS");
    for (int i = 0; i < n_ids; i++) printf(" %d", ids[i]);
    printf("\n");

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ids + n_predict + 8;
    cp.n_batch = cp.n_ctx;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context\n"); return 1; }

    const int n_vocab = llama_vocab_n_tokens(vocab);
    struct llama_batch batch = llama_batch_get_one(ids, n_ids);
    llama_token next;
    llama_token greedy[4096];
    int n_greedy = 0;
    for (int step = 0; step < n_predict && step < 4096; step++) {
        if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "decode failed\n"); return 1; }
        const float * logits = llama_get_logits_ith(ctx, -1);
        if (step == 0) {
            printf("LOGITS");
            for (int v = 0; v < n_vocab; v++) printf(" %.9g", logits[v]);
            printf("\n");
        }
        next = 0;
        for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[next]) next = v;
        greedy[n_greedy++] = next;
        if (llama_vocab_is_eog(vocab, next)) break;
        batch = llama_batch_get_one(&next, 1);
    }
    printf("GREEDY");
    for (int i = 0; i < n_greedy; i++) printf(" %d", greedy[i]);
    printf("\n");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
