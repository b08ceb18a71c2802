"""What limits each goal when a run does not meet it: notes keyed by a substring of the goal's name.

Written from the layer-level measurements in ``benchmarks/README.md`` (single thread, CPU time, hundreds of paired
repeats, which a busy machine disturbs far less than 2-thread wall time). Shown under the goals table only for goals
that the run did not meet.
"""

from __future__ import annotations

LIMITS: dict[str, str] = {
    "step time ours/PEFT": (
        "both libraries run the same base-model work; what differs is the adapter's share (a few % of a step), "
        "which ours does with one fused addmm instead of PEFT's matmul, scale and add (layer level, 1 thread: "
        "+2.1 ms per adapted 512x512 layer at 1024 tokens for ours, +2.4 ms for PEFT, over a 10.9 ms frozen "
        "layer). A median above 1.00 with a "
        "paired range that straddles 1.00, few clean rounds or a CPU share well below 1 is the shared machine's "
        "noise, not a measured slowdown; rerun on an idle machine to separate them."
    ),
    "peak RSS ours/PEFT": (
        "peak RSS includes imports and model loading; the 'RSS growth in training' column isolates what the "
        "step itself adds. For QLoRA, ours loads the dense model and then quantizes it in place (the dense "
        "weights are resident once), while transformers quantizes layer by layer as it loads."
    ),
    "step / floor (ours)": (
        "what a LoRA step adds to the floor is the adapter's own arithmetic: six thin matmuls per adapted layer "
        "(one side r=16). They are memory-bound on this CPU (~0.22 ms each at 1024x512 tokens x features, about "
        "half the FLOP rate of a 512x512 matmul), so 16 adapted layers cost ~1.5-2% of a step on an idle "
        "machine, plus the AdamW step over the adapter. A hand-written backward that picks the faster matmul "
        "orientations cut the adapter's share by ~13% with 1 thread but was ~1-2% slower per step with 2 threads "
        "(Python backward between kernels), so it was not kept; the other cuts measured (one matmul for q and v, "
        "which share their input; accumulating the input gradient inside the base layer's GEMM) are ~10% of the "
        "adapter's share each, i.e. ~0.2% of a step."
    ),
    "merged / base latency": (
        "a merged model is the base architecture with other weight values, so any gap is timing noise; see the "
        "paired range."
    ),
    "unmerged overhead": (
        "the unmerged forward adds two thin matmuls per adapted layer (ours adds the second one into the base "
        "layer's output in place, PEFT allocates three more (N, out) tensors); that is the whole overhead, and on "
        "a busy machine, or with only two small q,v layers per block, rounds move it by more than the difference."
    ),
    "adapter file": "the safetensors header (tensor names and shapes) is the only overhead over the raw bytes.",
    "import lightning_lora": "importing torch dominates; the package itself imports no Lightning, PEFT or bitsandbytes.",
}
