"""Hand-written Triton kernels: decode attention and K/V writes (attention), the fused sampler (sampler), the
intervention ops (interventions), the LoRA expand (lora). Imported only where Triton and a CUDA device are there."""
