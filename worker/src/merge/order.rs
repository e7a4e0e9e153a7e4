//! The order transformers saves a Llama-family model's tensors in (its
//! `state_dict()` order: modules in registration order). Sharding fills shards
//! in this order, so following it gives the same shard boundaries as
//! `save_pretrained(max_shard_size=...)`.

use std::cmp::Ordering;

/// Within a decoder layer: attention, MLP, then the two norms (the order
/// `LlamaDecoderLayer.__init__` registers them; Qwen2 and Mistral match).
const LAYER_MODULES: [&str; 9] = [
    "self_attn.q_proj.",
    "self_attn.k_proj.",
    "self_attn.v_proj.",
    "self_attn.o_proj.",
    "mlp.gate_proj.",
    "mlp.up_proj.",
    "mlp.down_proj.",
    "input_layernorm.",
    "post_attention_layernorm.",
];

/// (group, layer, module rank, parameter rank): names we do not know sort
/// after the known ones of their group, then by name.
fn key(name: &str) -> (u8, usize, usize, u8) {
    let param = if name.ends_with(".weight") {
        0
    } else if name.ends_with(".bias") {
        1
    } else {
        2
    };
    if name.starts_with("model.embed_tokens.") {
        return (0, 0, 0, param);
    }
    if let Some(rest) = name.strip_prefix("model.layers.") {
        if let Some((n, sub)) = rest.split_once('.') {
            if let Ok(layer) = n.parse::<usize>() {
                let rank = LAYER_MODULES
                    .iter()
                    .position(|m| sub.starts_with(m))
                    .unwrap_or(LAYER_MODULES.len());
                return (1, layer, rank, param);
            }
        }
    }
    if name.starts_with("model.norm.") {
        return (2, 0, 0, param);
    }
    if name.starts_with("model.") {
        return (3, 0, 0, param);
    }
    if name.starts_with("lm_head.") || name.starts_with("score.") {
        return (4, 0, 0, param);
    }
    (5, 0, 0, param)
}

/// Compare two tensor names in transformers' save order.
pub fn save_order(a: &str, b: &str) -> Ordering {
    key(a).cmp(&key(b)).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_names_sort_in_state_dict_order() {
        let mut names = vec![
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.10.self_attn.q_proj.weight",
            "model.layers.2.post_attention_layernorm.weight",
            "model.layers.2.input_layernorm.weight",
            "model.layers.2.mlp.down_proj.weight",
            "model.layers.2.self_attn.q_proj.bias",
            "model.layers.2.self_attn.q_proj.weight",
            "model.embed_tokens.weight",
        ];
        names.sort_by(|a, b| save_order(a, b));
        assert_eq!(
            names,
            [
                "model.embed_tokens.weight",
                "model.layers.2.self_attn.q_proj.weight",
                "model.layers.2.self_attn.q_proj.bias",
                "model.layers.2.mlp.down_proj.weight",
                "model.layers.2.input_layernorm.weight",
                "model.layers.2.post_attention_layernorm.weight",
                "model.layers.10.self_attn.q_proj.weight",
                "model.norm.weight",
                "lm_head.weight",
            ]
        );
    }
}
