"""The defaults a user sees, each in one place with its reason. The API, the CLI and the server
read them from here (sampling defaults live with the sampler, racer's with RacerConfig)."""

N_CTX = 4096  # tokens of context: Spec-Bench's longest dev prompts plus a reply fit; llama.cpp rounds to 256
METHOD = "racer"  # the product; "ar" is plain decoding through the same loop
MAX_TOKENS = 256  # generate and bench: about a screen of text
CHAT_MAX_TOKENS = 512  # chat replies: long answers without running on for ever
# Where greedy verification takes each node's top-k: "backend" inside llama.cpp's graph, "host"
# from full rows; "auto" measures which is faster for the model on this machine (costmodel).
CANDIDATES = "auto"
# Who computes the logits of a multi-row batch (a tree's verification): "native" is racer-local's
# own output layer (output_layer.py), "llama.cpp" llama.cpp's; "auto" measures which is faster
# for the model on this machine where the native one can serve (costmodel).
OUTPUT_LAYER = "auto"
# bench: a prompt whose decode takes less than BENCH_MIN_TIME seconds runs more rounds, up to
# BENCH_MAX_ROUNDS, the fastest kept. Two rounds of one method on one prompt (Qwen2.5-Coder-0.5B, 2
# cores, the 2-round bench of 2026-12-07) were apart by a median 19% (middle half 13-33%) for runs
# under a second and 14% (7-24%) for longer ones; short runs are also the cheapest to repeat: a
# 0.25 s qa prompt then costs 8 rounds, about a minute with the llama.cpp peers.
BENCH_MIN_TIME = 2.0
BENCH_MAX_ROUNDS = 8
