"""Measuring tools: speed and precision benchmarks, the accelerator check, memory estimates."""
