//! The arithmetic of reinforcement learning from feedback, on plain slices:
//! advantages (GAE, group-normalised), KL estimators and the adaptive KL
//! controller, the clipped PPO losses and the DPO loss, each with its
//! gradient written by hand. The trainers (PPO, DPO, GRPO) call these on the
//! per-token log-probabilities and values the model computes; keeping the
//! math apart lets every formula be checked on tiny hand-computed cases.

pub mod advantages;
pub mod dpo;
pub mod exchange;
pub mod grpo;
pub mod grpo_data;
pub mod kl;
pub mod ppo;
pub mod ppo_loss;
pub mod prompts;
pub mod reward;
pub mod rollout;
pub mod rule_rewards;
pub mod shares;
