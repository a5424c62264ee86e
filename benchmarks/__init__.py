"""Benchmarks, installed as ``vllm_tidar.benchmarks`` (run through ``vllm-tidar``)."""
