"""The host-side stages, in the order a record travels:

    input JSONL ─ request (parse, validate) ─▶ tokenizer_worker ×N ─▶ ring (shared memory) ─▶ router (several cores)
                                                                                               │
        engine core (engine.core: one process per device, the only code that touches CUDA) ◀───┘
           │ token ids, finish reasons, activations
           ▼
    decoder_worker ×M (ids → text, stop cut; activation_messages) ─▶ writer (the output's one owner) ─▶ results

Each stage runs in its own process (engine.procs starts them); stages.Stages starts them in this order, cores
first, and owns the queues between them; engine.engine.Engine feeds it requests and turns results into records.
"""
