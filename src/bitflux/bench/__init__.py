"""Benchmarks run on demand (`bitflux bench`); each prints a table and writes JSON under bench/results/."""
