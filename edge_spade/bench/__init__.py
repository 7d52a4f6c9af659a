"""`edge-spade bench`: latency, CPU time, memory and energy per answer on the user's own machine,
for our full-depth answer, the default SPADE-EXIT answer and llama-cpp-python on the same prompts."""
