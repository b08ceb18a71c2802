"""Side-by-side benchmarks of lightning-lora and HF PEFT, on the same model and inputs, in the same run.

Run ``python -m benchmarks.run --quick`` (or ``--full``, ``--smoke``); results go to ``benchmarks/results/``.
Every measured configuration runs in its own worker process (clean peak RSS), and the parent steps the workers of
one comparison in lockstep, alternating their order, so that ours and PEFT share the same time window on a noisy,
shared machine. See ``benchmarks/README.md``.
"""
