"""The parts of ``benchmarks/overhead.py`` (its CLI and results format are documented there and in
benchmarks/README.md):

* :mod:`.config`: models, methods, defaults and the descriptions written into the JSON;
* :mod:`.models`: the benchmark models, their samples and batches, the floor's loss;
* :mod:`.methods`: one function per timed method, in the dict ``PROVIDERS``;
* :mod:`.official`: the official LoRA-DA schedule, re-enacted step by step;
* :mod:`.runner`: one timed run (warm-up, peak memory), the child-process worker, the alternation;
* :mod:`.report`: summary statistics, the Markdown table and the plot.
"""
