"""perseus_edge.bench: `perseus bench` (our llama-bench) and `perseus profile`, both torch-free.

    rounds       the tests, one worker per (model, threads), interleaved rounds -> records
    worker       one model at one thread count in its own process, driven over a pipe
    llama        the llama.cpp backend (a .gguf file through llama-cpp-python's low-level API)
    tables       records -> llama-bench's markdown table, JSON, CSV
    prompts      the benchmark's prompt: validation text through the model's tokenizer
    graphinfo    what an exported graph holds (weights by component, cache buffers, decode bytes / FLOPs)
    footprint    memory by component: static from the graph, RSS stages measured in a fresh process
    opprofile    onnxruntime's profiler, summarised by op type and by perseus function body

The research harness (PyTorch baselines, roofline, verdicts, plots) lives in studies/cpu/.
"""
