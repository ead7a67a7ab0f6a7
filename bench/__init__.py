"""Microbenchmarks for layernorm_ext (``python bench/bench_layernorm.py --help``)."""
