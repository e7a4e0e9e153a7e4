// lora kernels (to be written)
