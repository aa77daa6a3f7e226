"""The GPU benchmark, `ffnskip bench --gpu` (run): a decode step captured whole on a device
(device_step, with the engine's skip rule run on tensors by device_skips), the workload it runs
(workload: a random-weight Llama of a named shape, the skip patterns, the weight bytes a step
reads), how the step runs (graphs: eagerly, one CUDA graph with IF nodes, or graph segments) and
how it is measured (measure). No service uses it: the engine decodes with ModelRunner.decode."""
