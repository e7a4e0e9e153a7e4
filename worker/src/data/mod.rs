//! Data formats: reading MedicalGPT training files and turning them into
//! token blocks for the training stages.
//!
//! `pretrain`: the PT stage's `.txt` / `.json` / `.jsonl` text corpora,
//! EOS-separated packing into `block_size` blocks, and the train/validation split.
//!
//! `reward`: the RM stage's preference pairs (MedicalGPT's three formats).

pub mod pretrain;
pub mod reward;
