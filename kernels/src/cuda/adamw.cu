// adamw kernels (to be written)
