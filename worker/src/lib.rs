//! The worker: the Llama-family model written once against the backend
//! interface, LoRA, data formats, training stages, optimizer, checkpoints.
