"""perseus_edge.bench: `perseus bench` (our llama-bench) and `perseus profile`.

    harness      subjects (exports, quantized folders, random checkpoints) -> timing groups -> analysis -> report
    worker       one backend / variant / thread count in its own process, driven over a pipe
    prompts      the benchmark's prompt: validation text through the model's tokenizer
    graphinfo    what an exported graph holds (weights by component, cache buffers, decode bytes / FLOPs)
    roofline     the machine's measured peaks and the roofline bound of a decode step
    footprint    memory by component: static from the graph, RSS stages measured in a fresh process
    opprofile    onnxruntime's profiler, summarised by op type and by perseus function body
    report       bench.json, README.md (tables, verdicts), plots
    gpu_reference  PyTorch eager / torch.compile on CUDA + logits parity (CPU side runs anywhere)
    commands     the CLI

Results: studies/results/cpu/. Design and method: bench/README.md.
"""
