"""Benchmarks that ship with msfused: the workloads of WORKLOADS.md, the floor, and the runner behind
``python -m msfused bench``.

    workloads  the workload table, and build(): naive and fused modules with identical weights, an input
    floor      the device's read, write and matmul rates; bytes read, written and FLOPs per workload; the floor
    timing     timing on CPU (perf_counter) and CUDA (events), interleaved; peak memory of one call
    runner     the matrix workload x mode x dtype x implementation, as plain result dicts
    report     the text table, JSON, and the chart of times against the floor (matplotlib, optional)
    cli        python -m msfused bench
"""
