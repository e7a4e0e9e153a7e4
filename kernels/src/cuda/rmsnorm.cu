// rmsnorm kernels (to be written)
