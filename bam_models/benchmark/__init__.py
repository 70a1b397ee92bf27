""" Measurement: what BAM and CBAM cost next to their plain trunks (`bam-models benchmark`), the counts and peaks
it is built on, and the shared pieces scripts/gpu_check.py measures with.

- `profiling`: parameter and FLOP counts on the meta device, the peak bytes of CPU tensors a call holds
- `subject`: seeded inputs and a model with its optimizer that takes training steps and inference passes
- `benchmark`: the interleaved, trunk-relative benchmark
- `report`: the machine description, the Markdown tables and the JSON / Markdown files
"""
from .profiling import count_flops, count_params, model_stats, peak_cpu_tensor_bytes
from .report import describe_machine, markdown_table, model_table, write_report
from .subject import Inputs, Subject, create_benchmarked_model
from .benchmark import (
    ALLOCATORS, DEFAULT_FAMILIES, MEASURES, PEERS, BenchmarkSettings, paired_ratio, run_benchmark, trunk_of,
)

__all__ = [
    'ALLOCATORS', 'DEFAULT_FAMILIES', 'MEASURES', 'PEERS', 'BenchmarkSettings', 'Inputs', 'Subject', 'count_flops',
    'count_params', 'create_benchmarked_model', 'describe_machine', 'markdown_table', 'model_stats', 'model_table',
    'paired_ratio', 'peak_cpu_tensor_bytes', 'run_benchmark', 'trunk_of', 'write_report',
]
