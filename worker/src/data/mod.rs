//! Data formats: reading MedicalGPT training files and turning them into
//! token blocks for the training stages.
//!
//! `pretrain`: the PT stage's `.txt` / `.json` / `.jsonl` text corpora,
//! EOS-separated packing into `block_size` blocks, and the train/validation split.
//! `chat`: SFT conversations (ShareGPT / Alpaca files), checked and normalised.
//! `template`: MedicalGPT's named chat templates and Jinja `chat_template`s.
//! `sft`: conversations → input_ids/labels with prompt masking.
//!
//! `reward`: the RM stage's preference pairs (MedicalGPT's three formats).

pub mod chat;
pub mod pretrain;
pub mod reward;
pub mod sft;
pub mod template;
