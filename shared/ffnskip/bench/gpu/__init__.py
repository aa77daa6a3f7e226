"""What scripts/gpu_bench.py benches on a GPU, importable from the installed package: the workload
(`workload`: a random-weight Llama of a named shape, the skip patterns, the weight bytes a step
reads) and how the engine's device step runs (`graphs`: eagerly, one CUDA graph with IF nodes, or
graph segments)."""
