"""Benchmarking: the engine bench (`engine`) and its report (`report`), the service
bench against a running decoder (`service`), the llama.cpp peer (`peer`), the gateway
load generator (`load`) and the decode-step profiler (`step_profile`)."""
