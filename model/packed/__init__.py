"""Packed ternary inference: the 2-bit / 1.6-bit code formats (`packing`), the packed BitLinear (`packed_linear`),
packed models and their heads (`packed_model`), packed folders (`packed_checkpoint`) and the kernels
they run on (`kernels/`: AVX2 / AVX-512 VNNI / AVX-VNNI CPU code, Triton, plain PyTorch)."""
