"""The other parameter-efficient methods beside LoRA, one file each: prompt tuning, P-tuning, prefix tuning and
bottleneck adapters, plus :func:`apply_peft` / :func:`plan_peft`, which dispatch on the config's type.

Imports only :mod:`..lora`, :mod:`..errors` and the private helpers; ``io/`` reads and writes their files.
"""
