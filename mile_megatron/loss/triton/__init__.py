"""The Triton implementation of the vocab-parallel losses: kernels.py (the @triton.jit kernels and their math),
function.py (launchers and the autograd function), layout.py (how the kernels address [..., V] rows in place).
Imported only when a call takes the Triton path (mile_megatron.loss.settings.use_triton)."""
