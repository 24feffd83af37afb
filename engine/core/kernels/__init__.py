"""Hand-written Triton kernels: decode attention and K/V writes (attention), the fused sampler (sampler). Imported
only where Triton and a CUDA device are there."""
