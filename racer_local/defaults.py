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
