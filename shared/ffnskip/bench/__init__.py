"""Benchmarking: the in-process engine bench (`inprocess`, its rows in `configs` and its table in
`report`, its llama.cpp rows through llama-cpp-python in `inprocess_peer`), the service bench
against a running decoder or gateway (`service`, its timed calls in `calls`, llama.cpp's server beside
it in `service_peer`, which runs it through `llama_server`), the GGUF files both peers read
(`gguf_export`), the gateway load generator (`load`), the decode-step profiler (`step_profile`)
and the GPU bench (`gpu`: a capturable decode step, its workload and graphs; `ffnskip bench --gpu`). The command line
that reads their flags is ffnskip.cli.bench."""
