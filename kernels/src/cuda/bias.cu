// bias kernels (to be written)
